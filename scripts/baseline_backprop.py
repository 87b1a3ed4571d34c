"""Reference only: the same 3 x 1000 ReLU network trained end to end with backprop.

Gives the backprop row of the README's comparison table (FF, CFF and UFF are fedff's own
commands). Same data loader, batch size and epochs as the FF configs; Adam, cross-entropy.

    python scripts/baseline_backprop.py --dataset mnist --epochs 10 --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from fedff.data.datasets import load_dataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="mnist", choices=("mnist", "fashion-mnist", "digits"))
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--hidden", default="1000,1000,1000")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("runs/baseline_backprop.json"))
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    ds = load_dataset(args.dataset, args.data_dir)
    widths = [ds.features, *map(int, args.hidden.split(","))]
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(widths[-1], ds.num_classes))
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs)
    start = time.perf_counter()
    for _ in tqdm(range(args.epochs), desc=f"backprop {args.dataset}", unit="epoch"):
        for idx in torch.randperm(ds.train_x.shape[0]).split(args.batch_size):
            loss = F.cross_entropy(model(ds.train_x[idx]), ds.train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        error = float((model(ds.test_x).argmax(1) != ds.test_y).float().mean())
    result = {"dataset": args.dataset, "hidden": widths[1:], "epochs": args.epochs,
              "test_error": error, "train_seconds": seconds}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
