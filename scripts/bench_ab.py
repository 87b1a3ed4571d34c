"""Step time of two source trees in one process, block by block: an A/B of the engine.

Both trees' `fedff` are imported into this process (the old one's modules are set aside
under their own objects before the new one is imported), the same variant is built from
each, and timed blocks of training steps alternate between them (old, new, then new,
old, ...). On a shared, noisy machine this pairs every old block with a new block taken
seconds apart, which separate runs minutes apart cannot. Prints, per variant, the median
new/old samples/s ratio and its range, and writes JSON.

    git worktree add /tmp/old <commit>
    python scripts/bench_ab.py --old /tmp/old --data-dir ../shared/data --threads 2
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "ff-hard (3x1000)": [],
    "ff-random (3x1000)": ["train.negatives=random"],
    "cff-all (3x1000)": ["model.collaboration=all"],
    "ff-unsupervised (3x1000)": ["train.algorithm=unsupervised", "train.negatives=hybrid",
                                 "train.classify=head"],
}


def import_tree(tree: Path) -> dict[str, ModuleType]:
    """fedff's config, data and network modules from `tree`, as separate objects."""
    for name in [m for m in sys.modules if m == "fedff" or m.startswith("fedff.")]:
        del sys.modules[name]
    sys.path.insert(0, str(tree))
    try:
        names = {"config": "fedff.config", "datasets": "fedff.data.datasets"}
        mods = {k: importlib.import_module(v) for k, v in names.items()}
        for where in ("fedff.ff.network", "fedff.engine.network"):  # old layout, new layout
            try:
                mods["network"] = importlib.import_module(where)
                break
            except ImportError:
                continue
        loaded = [m for n, m in sys.modules.items() if n.startswith("fedff.")
                  and getattr(m, "__file__", None)]
        for mod in loaded:
            if not Path(mod.__file__).resolve().is_relative_to(tree):
                raise SystemExit(f"{mod.__name__} came from {mod.__file__}, not {tree}")
        return mods
    finally:
        sys.path.remove(str(tree))


def stepper(mods: dict[str, ModuleType], overrides: list[str], x: torch.Tensor,
            y: torch.Tensor):
    cfg = mods["config"].load("mnist-ff-3x1000", overrides)
    net_mod = mods["network"]
    net = net_mod.FFNetwork(cfg, net_mod.InputSpec(784, (28, 28), 10))
    b, n = cfg.train.batch_size, x.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    cursor = 0

    def step() -> None:
        nonlocal cursor
        idx = order[cursor:cursor + b]
        cursor = (cursor + b) % (n - b)
        net.train_batch(x[idx], y[idx])
    return step, b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", type=Path, required=True)
    ap.add_argument("--new", type=Path, default=REPO)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--blocks", type=int, default=12, help="timed blocks per tree")
    ap.add_argument("--steps", type=int, default=20, help="steps per block")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", default="bench_ab.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    trees = {"old": import_tree(a.old.resolve()), "new": import_tree(a.new.resolve())}
    ds = trees["new"]["datasets"].load_dataset("mnist", a.data_dir)
    rows = {}
    print(f"{'variant':<26}{'old/s':>8}{'new/s':>8}{'new/old':>9}  range")
    for name in a.variants:
        steps = {side: stepper(m, VARIANTS[name], ds.train_x, ds.train_y)
                 for side, m in trees.items()}
        for step, _ in steps.values():  # warm-up
            for _ in range(5):
                step()
        rates: dict[str, list[float]] = {"old": [], "new": []}
        for block in range(a.blocks):
            for side in (("old", "new") if block % 2 == 0 else ("new", "old")):
                step, batch = steps[side]
                start = time.perf_counter()
                for _ in range(a.steps):
                    step()
                rates[side].append(a.steps * batch / (time.perf_counter() - start))
        ratios = [n / o for n, o in zip(rates["new"], rates["old"])]
        rows[name] = {**rates, "ratios": ratios, "median_ratio": statistics.median(ratios)}
        print(f"{name:<26}{statistics.median(rates['old']):>8.0f}"
              f"{statistics.median(rates['new']):>8.0f}{statistics.median(ratios):>9.3f}  "
              f"{min(ratios):.3f}-{max(ratios):.3f}", flush=True)
    Path(a.out).write_text(json.dumps({"old": str(a.old), "new": str(a.new),
                                       "threads": a.threads, "blocks": a.blocks,
                                       "steps": a.steps, "rows": rows}, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
