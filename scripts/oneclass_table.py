"""The one-vs-rest table: a one-class config trained once per normal class (and per
objective), AUROC per class and the mean over classes, beside Deep SVDD's published
figures (Ruff et al. 2018, MNIST one-class Deep SVDD).

    python scripts/oneclass_table.py --config mnist-oneclass --data-dir ../shared/data \
        --objectives hb-svdd sb-svdd ls-svdd goodness goodness-softplus --out runs/oc-table

Each run is `fedff train` (its own folder under --out: metrics, checkpoint, ROC and score
plots), or with --backprop the same config trained end to end by backprop
(scripts/baseline_oneclass.py, for reference); finished runs are skipped, so an
interrupted table resumes. Writes results.json, table.md and auroc_per_class.png under
--out, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))  # baseline_oneclass beside this script

from fedff import config as config_mod  # noqa: E402
from fedff.report import write_json  # noqa: E402
from fedff.train import TrainingDiverged, run  # noqa: E402

DEEP_SVDD_MNIST = [98.0, 99.7, 91.7, 91.9, 94.9, 88.5, 98.3, 94.6, 93.9, 96.5]  # mean 94.8


def train_one(args: argparse.Namespace, objective: str, k: int) -> dict:
    out = args.out / objective / f"class{k}"
    if (out / "metrics.json").exists():
        done = json.loads((out / "metrics.json").read_text())
        if done["epochs"] == done["config"]["train"]["epochs"]:
            return done
    overrides = [f"model.objective={objective}", f"oneclass.normal={k}",
                 f"train.threads={args.threads}", *args.overrides]
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir}")
    cfg = config_mod.load(args.config, overrides)
    try:
        if args.backprop:
            from baseline_oneclass import train_backprop

            return train_backprop(cfg, out)
        return run(cfg, out, show_progress=False)
    except TrainingDiverged as e:  # a row of the table, not the end of it
        print(f"{objective}, class {k}: {e}", file=sys.stderr)
        return {"auroc": None, "average_precision": None, "f1": None, "epochs": "diverged",
                "train_seconds": 0.0}


def mean_auroc(runs: list[dict]) -> float | None:
    """The mean over classes; None if any class diverged (no mean of a partial row)."""
    if any(r["auroc"] is None for r in runs):
        return None
    return sum(r["auroc"] for r in runs) / len(runs)


def table(results: dict[str, list[dict]], dataset: str) -> str:
    classes = len(next(iter(results.values())))
    head = "| objective | " + " | ".join(str(k) for k in range(classes)) + \
        " | mean | epochs | wall s (median per class) |"
    lines = [head, "|" + " --- |" * (classes + 4)]
    for objective, runs in results.items():
        cells = ["diverged" if r["auroc"] is None else f"{100 * r['auroc']:.1f}" for r in runs]
        trained = [r for r in runs if r["auroc"] is not None]
        seconds = sorted(r["train_seconds"] for r in trained) or [0.0]
        name = f"{objective} (backprop)" if runs[0].get("trainer") == "backprop" else objective
        mean = mean_auroc(runs)
        lines.append(f"| {name} | {' | '.join(cells)} | "
                     f"**{'-' if mean is None else f'{100 * mean:.2f}'}** | "
                     f"{trained[0]['epochs'] if trained else '-'} | "
                     f"{seconds[len(seconds) // 2]:.0f} |")
    if dataset == "mnist":
        lines.append("| Deep SVDD (Ruff et al. 2018) | " +
                     " | ".join(f"{a:.1f}" for a in DEEP_SVDD_MNIST) + " | 94.8 | | |")
    return "\n".join(lines)


def plot(results: dict[str, list[dict]], dataset: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for objective, runs in results.items():
        ax.plot([r["class"] for r in runs if r["auroc"] is not None],
                [100 * r["auroc"] for r in runs if r["auroc"] is not None], marker="o",
                label=objective)
    if dataset == "mnist":
        ax.plot(range(10), DEEP_SVDD_MNIST, marker="x", linestyle=":", color="black",
                label="Deep SVDD (published)")
    ax.set_xlabel("normal class")
    ax.set_ylabel("test AUROC (%)")
    ax.set_xticks(range(len(next(iter(results.values())))))
    ax.grid(True, alpha=0.3)
    ax.set_title(f"one-vs-rest, {dataset}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="mnist-oneclass")
    p.add_argument("--objectives", nargs="+", default=["hb-svdd"])
    p.add_argument("--classes", nargs="+", type=int, default=list(range(10)))
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    p.add_argument("--data-dir", default="")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--backprop", action="store_true",
                   help="train end to end by backprop instead (reference only)")
    p.add_argument("--out", type=Path, default=Path("runs/oneclass-table"))
    args = p.parse_args(argv)
    dataset = config_mod.load(args.config, args.overrides).data.dataset
    jobs = [(o, k) for o in args.objectives for k in args.classes]
    results: dict[str, list[dict]] = {o: [] for o in args.objectives}
    started = time.perf_counter()
    for objective, k in tqdm(jobs, desc="one-vs-rest runs", unit="run", dynamic_ncols=True):
        summary = train_one(args, objective, k)
        results[objective].append({"class": k, "auroc": summary["auroc"],
                                   "average_precision": summary["average_precision"],
                                   "f1": summary["f1"], "epochs": summary["epochs"],
                                   "trainer": summary.get("trainer", "ff"),
                                   "train_seconds": summary["train_seconds"]})
    text = table(results, dataset)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(text + "\n")
    write_json(args.out / "results.json", {
        "config": args.config, "overrides": args.overrides, "dataset": dataset,
        "wall_seconds": time.perf_counter() - started,
        "results": results,
        "mean_auroc": {o: mean_auroc(rs) for o, rs in results.items()}})
    plot(results, dataset, args.out / "auroc_per_class.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
