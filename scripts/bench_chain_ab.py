"""Worker code of two source trees, side by side: two live chains, epochs alternated.

One driver (this tree) trains two chains of K local workers at once, one running the
old tree's `fedff worker` and one the new tree's (each started with its tree on
PYTHONPATH), alternating whole epochs between them (old, new, then new, old, ...); the
chain not training is idle. Prints the median new/old samples/s ratio with its range and
writes JSON. The wire protocol must be the same in both trees.

    git worktree add /tmp/old <commit>
    python scripts/bench_chain_ab.py --old /tmp/old --workers 2 --pairs 6 \\
        --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fedff import config
from fedff.data.datasets import load_dataset
from fedff.engine.network import InputSpec
from fedff.pipeline.driver import Pipeline
from fedff.pipeline.launcher import LocalChain
from fedff.train import train_epoch

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", type=Path, required=True)
    ap.add_argument("--new", type=Path, default=REPO)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=6, help="timed epochs per chain")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--train-limit", type=int, default=20000)
    ap.add_argument("--out", default="bench_chain_ab.json")
    a = ap.parse_args()
    torch.set_num_threads(1)
    ds = load_dataset("mnist", a.data_dir, train_limit=a.train_limit, test_limit=100)
    cfg = config.load("mnist-ff-3x1000", ["train.negatives=random"])
    spec = InputSpec(ds.features, ds.image_shape, ds.num_classes)
    rates: dict[str, list[float]] = {"old": [], "new": []}
    saved_path = os.environ.get("PYTHONPATH")
    with tempfile.TemporaryDirectory() as tmp:
        chains, pipes = {}, {}
        for side, tree in (("old", a.old), ("new", a.new)):
            os.environ["PYTHONPATH"] = str(tree.resolve())  # the workers' fedff
            chains[side] = LocalChain(a.workers, Path(tmp) / side, threads=1).__enter__()
            pipes[side] = Pipeline(cfg, spec, chains[side].addresses)
        if saved_path is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = saved_path
        try:
            for side in rates:
                train_epoch(pipes[side], ds, 0, show=False)  # warm-up
            for i in range(a.pairs):
                for side in (("old", "new") if i % 2 == 0 else ("new", "old")):
                    start = time.perf_counter()
                    train_epoch(pipes[side], ds, 1 + i, show=False)
                    rates[side].append(ds.train_x.shape[0] / (time.perf_counter() - start))
                print(f"pair {i + 1}/{a.pairs}: old {rates['old'][-1]:.0f}/s, "
                      f"new {rates['new'][-1]:.0f}/s", flush=True)
        finally:
            for side in pipes:
                pipes[side].close()
                chains[side].__exit__(None, None, None)
    ratios = [n / o for n, o in zip(rates["new"], rates["old"])]
    print(f"{a.workers} workers: median samples/s old {statistics.median(rates['old']):.0f}, "
          f"new {statistics.median(rates['new']):.0f}, new/old "
          f"{statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f})")
    Path(a.out).write_text(json.dumps({"old": str(a.old), "new": str(a.new),
                                       "workers": a.workers, **rates, "ratios": ratios,
                                       "median_ratio": statistics.median(ratios)}, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
