"""Reference only: the same ReLU networks trained end to end with backprop.

Gives the backprop rows of the README's comparison tables (FF, CFF, UFF and PEPITA are
fedff's own commands). Same data loader; cross-entropy.
- `--recipe adam` (default): the FF nets (3 x 1000 with biases), Adam, cosine schedule.
- `--recipe pepita`: PEPITA's nets and schedule (no biases, He-uniform init, dropout 0.1
  before the ReLU, SGD lr 0.1 momentum 0.9, batch 64, lr x0.1 at epochs 60 and 90).

    python scripts/baseline_backprop.py --dataset mnist --epochs 10 --data-dir ../shared/data
    python scripts/baseline_backprop.py --recipe pepita --hidden 1024 --epochs 100 \
        --data-dir ../shared/data
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
    ap.add_argument("--recipe", default="adam", choices=("adam", "pepita"))
    ap.add_argument("--hidden", default="1000,1000,1000")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, help="default: 100 (adam), 64 (pepita)")
    ap.add_argument("--lr", type=float, help="default: 1e-3 (adam), 0.1 (pepita)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("runs/baseline_backprop.json"))
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    ds = load_dataset(args.dataset, args.data_dir)
    widths = [ds.features, *map(int, args.hidden.split(","))]
    pep = args.recipe == "pepita"
    batch = args.batch_size or (64 if pep else 100)
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b, bias=not pep), *([nn.Dropout(0.1)] if pep else []),
                   nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(widths[-1], ds.num_classes, bias=not pep))
    if pep:
        for m in model:
            if isinstance(m, nn.Linear):
                bound = (6.0 / m.in_features) ** 0.5
                nn.init.uniform_(m.weight, -bound, bound)
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=args.lr or 0.1,
                                                     momentum=0.9)
        sched: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.MultiStepLR(
            opt, [60, 90], 0.1)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=args.lr or 1e-3)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs)
    start = time.perf_counter()
    for _ in tqdm(range(args.epochs), desc=f"backprop {args.dataset}", unit="epoch"):
        model.train()
        for idx in torch.randperm(ds.train_x.shape[0]).split(batch):
            loss = F.cross_entropy(model(ds.train_x[idx]), ds.train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        error = float((model(ds.test_x).argmax(1) != ds.test_y).float().mean())
    result = {"dataset": args.dataset, "recipe": args.recipe, "hidden": widths[1:],
              "epochs": args.epochs,
              "test_error": error, "train_seconds": seconds}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
