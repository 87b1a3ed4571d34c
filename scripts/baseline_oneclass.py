"""Reference only: one-class networks trained end to end with backprop (Deep SVDD's way).

The same config, data, layers (normalised input, Linear with bias, ReLU), initialisation,
loss, centre/radius rule, SGD and scoring as `fedff train` with train.algorithm =
"oneclass"; the one difference is the gradient: the network's loss (the last layer's,
or the sum over layers with oneclass.score = "sum") flows back through every layer,
where one-class FF trains each layer on its own loss. Writes `fedff train`'s
metrics.json, so scripts/oneclass_table.py --backprop tabulates it beside FF.

    python scripts/baseline_oneclass.py --config mnist-oneclass --set oneclass.normal=3 \
        --data-dir ../shared/data --out runs/bp-oc3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fedff import config as config_mod
from fedff.config import Config
from fedff.engine.network import FFNetwork, InputSpec
from fedff.oneclass.metrics import oneclass_metrics
from fedff.report import write_json
from fedff.train import load_data


def train_backprop(cfg: Config, out: Path) -> dict[str, Any]:
    """Trains cfg's one-class network end to end; writes and returns metrics.json."""
    torch.manual_seed(cfg.train.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    ds = load_data(cfg)
    net = FFNetwork(cfg, InputSpec(ds.features, ds.image_shape, ds.num_classes))
    params = [p for layer in net.layers for p in layer.module.parameters()]
    o = cfg.optim
    opt = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    history, started = [], time.perf_counter()
    for epoch in range(cfg.train.epochs):
        net.set_epoch(epoch)
        order = torch.randperm(ds.train_x.shape[0], generator=generator)
        for idx in order.split(cfg.train.batch_size):
            h, losses = ds.train_x[idx], []
            for layer in net.layers:
                h = layer.activity(h)[1]
                if epoch == 0:
                    layer.batch_statistics(h.detach())
                losses.append(layer.loss_and_grad(h)[0].mean())
                layer.accumulate(h.detach())
            loss = losses[-1] if cfg.oneclass.score == "last" else torch.stack(losses).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.end_epoch()
        history.append({"epoch": epoch + 1, "train_loss": float(loss),
                        "train_seconds": time.perf_counter() - started,
                        **oneclass_metrics(net, ds)})
    summary = {"config": cfg.to_dict(), "dataset": ds.name, "trainer": "backprop",
               "epochs": len(history), "train_seconds": history[-1]["train_seconds"],
               **{k: history[-1][k] for k in ("auroc", "average_precision", "f1", "accuracy",
                                               "threshold", "test_error")},
               "history": history}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="mnist-oneclass")
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    p.add_argument("--data-dir", default="")
    p.add_argument("--out", type=Path, default=Path("runs/baseline_oneclass"))
    args = p.parse_args(argv)
    overrides = [*args.overrides, *([f"data.data_dir={args.data_dir}"] if args.data_dir else [])]
    summary = train_backprop(config_mod.load(args.config, overrides), args.out)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("config", "history")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
