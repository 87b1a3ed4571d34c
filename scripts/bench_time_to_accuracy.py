"""Time to accuracy: wall time and epochs until a named config's validation error first
drops to a target, and the test error of the model at that moment.

The validation split is held out of the training set (--validation images, the same for
every config and seed; the model never trains on them); the test set is only scored at
the moment the target is reached and at the end of the schedule. Training time excludes
evaluation. Each config runs its own schedule (train.epochs) unless --max-epochs cuts it;
`--stop-at-target` ends a run as soon as the target is reached. Medians over --seeds;
prints a table, writes JSON, and plots validation error against wall time. `--merge`
makes one table and plot of runs made as separate processes (a search on several cores).

    python scripts/bench_time_to_accuracy.py --data-dir ../shared/data \
        --configs mnist-ff-3x1000 mnist-ff-3x1000-short@optim.lr=0.02 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from fedff import config
from fedff.engine.evaluate import evaluate
from fedff.train import apply_threads, build_network, load_data, train_epoch

ERROR_KEY = {"goodness": "error_goodness", "head": "error_head"}


def split(ds, validation: int):
    """(train without the validation images, validation as the 'test' set): a fixed
    permutation, so every config and seed sees the same split."""
    order = torch.randperm(ds.train_x.shape[0], generator=torch.Generator().manual_seed(1234))
    held, kept = order[:validation], order[validation:]
    return (replace(ds, train_x=ds.train_x[kept], train_y=ds.train_y[kept]),
            ds.train_x[held], ds.train_y[held])


def one_run(name: str, overrides: list[str], seed: int, args, keep=lambda run: None) -> dict:
    """One config and seed; `keep(run so far)` after every epoch, so an interrupted
    search keeps the curve of the run it was in."""
    cfg = config.load(name, [*overrides, f"train.seed={seed}", f"train.threads={args.threads}",
                             *([f"data.data_dir={args.data_dir}"] if args.data_dir else [])])
    apply_threads(cfg)
    ds = load_data(cfg)
    train, val_x, val_y = split(ds, args.validation)
    net = build_network(cfg, train, torch.device("cpu"))
    key = ERROR_KEY[cfg.train.classify]
    epochs = min(cfg.train.epochs, args.max_epochs or cfg.train.epochs)
    curve, seconds, reached = [], 0.0, None
    for epoch in tqdm(range(epochs), desc=f"{name} seed {seed}", unit="epoch"):
        started = time.perf_counter()
        train_epoch(net, train, epoch, show=False)
        seconds += time.perf_counter() - started
        net.epoch = epoch + 1
        errors = evaluate(net, val_x, val_y)
        val = float(errors[key])
        curve.append({"epoch": epoch + 1, "seconds": seconds, "val_error": val,
                      **{k: float(errors[k]) for k in ERROR_KEY.values() if k in errors}})
        keep({"config": name, "overrides": overrides, "seed": seed, "curve": curve,
              "unfinished": True})
        if reached is None and val <= args.target:
            test = float(evaluate(net, ds.test_x, ds.test_y)[key])
            reached = {"epoch": epoch + 1, "seconds": seconds, "val_error": val,
                       "test_error": test}
            if args.stop_at_target:
                break
    final = None
    if len(curve) == cfg.train.epochs:  # the whole schedule ran
        final = {"epochs": len(curve), "seconds": seconds,
                 "test_error": float(evaluate(net, ds.test_x, ds.test_y)[key])}
    return {"config": name, "overrides": overrides, "seed": seed, "reached": reached,
            "final": final, "curve": curve, "torch_threads": torch.get_num_threads()}


def median_of(runs: list[dict], part: str, key: str) -> float | None:
    values = [r[part][key] for r in runs if r[part] is not None]
    return statistics.median(values) if len(values) == len(runs) else None


def summarize(runs: list[dict], target: float) -> list[dict]:
    rows = []
    for label in dict.fromkeys(r["label"] for r in runs):
        mine = [r for r in runs if r["label"] == label]
        rows.append({"label": label, "seeds": [r["seed"] for r in mine],
                     "epoch_to_target": median_of(mine, "reached", "epoch"),
                     "seconds_to_target": median_of(mine, "reached", "seconds"),
                     "test_error_at_target": median_of(mine, "reached", "test_error"),
                     "final_test_error": median_of(mine, "final", "test_error"),
                     "final_seconds": median_of(mine, "final", "seconds"),
                     "best_val_error": statistics.median(
                         min(c["val_error"] for c in r["curve"]) for r in mine)})
    print(f"\ntarget: validation error <= {100 * target:.2f} %  (medians over seeds)")
    print(f"{'config':<44}{'epoch':>7}{'time s':>9}{'test %':>8}{'final %':>9}"
          f"{'final s':>9}{'best val %':>11}")

    def fmt(v, scale=1.0, spec=".0f"):
        return "-" if v is None else format(v * scale, spec)

    for r in rows:
        print(f"{r['label']:<44}{fmt(r['epoch_to_target']):>7}"
              f"{fmt(r['seconds_to_target']):>9}{fmt(r['test_error_at_target'], 100, '.2f'):>8}"
              f"{fmt(r['final_test_error'], 100, '.2f'):>9}{fmt(r['final_seconds']):>9}"
              f"{fmt(r['best_val_error'], 100, '.2f'):>11}")
    return rows


def plot(runs: list[dict], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {}
    for r in runs:
        color = colors.setdefault(r["label"], f"C{len(colors)}")
        ax.plot([c["seconds"] for c in r["curve"]], [100 * c["val_error"] for c in r["curve"]],
                color=color, alpha=0.8, label=r["label"] if r["seed"] == r["first_seed"] else None)
    ax.axhline(100 * target, color="k", ls="--", lw=0.8, label=f"target {100 * target:.2f} %")
    ax.set_xlabel("training wall time (s)")
    ax.set_ylabel("validation error (%)")
    ax.set_ylim(0, max(5.0, 100 * target * 3))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def merged(paths: list[Path]) -> list[dict]:
    """Every finished run in the files, labelled as they were."""
    runs = []
    for path in paths:
        for run in json.loads(path.read_text())["runs"]:
            if not run.get("unfinished"):
                run.setdefault("label", "@".join([run["config"], *run["overrides"]]))
                run.setdefault("first_seed", run["seed"])
                runs.append(run)
    if not runs:
        raise SystemExit(f"no finished run in {', '.join(map(str, paths))}")
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--configs", nargs="+", default=["mnist-ff-3x1000"],
                    help="named configs; NAME@key=value@key=value adds overrides to one")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--target", type=float, default=0.015, help="validation error (fraction)")
    ap.add_argument("--validation", type=int, default=10_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-epochs", type=int, default=0, help="cut every schedule here")
    ap.add_argument("--stop-at-target", action="store_true")
    ap.add_argument("--out", default="bench_time_to_accuracy.json")
    ap.add_argument("--merge", nargs="+", type=Path, default=[],
                    help="train nothing: one table and plot of the runs in these JSON files "
                         "(a search run as separate processes)")
    args = ap.parse_args()
    runs = merged(args.merge) if args.merge else []
    for spec in [] if args.merge else args.configs:
        name, *overrides = spec.split("@")
        for seed in (int(s) for s in args.seeds.split(",")):
            def keep(partial: dict) -> None:
                Path(args.out).write_text(json.dumps(
                    {"target": args.target, "runs": [*runs, partial]}, indent=2))
            run = one_run(name, overrides, seed, args, keep)
            run["label"], run["first_seed"] = spec, int(args.seeds.split(",")[0])
            runs.append(run)
            Path(args.out).write_text(json.dumps({"target": args.target, "runs": runs},
                                                 indent=2))  # an interruption keeps these
    rows = summarize(runs, args.target)
    Path(args.out).write_text(json.dumps({"target": args.target, "validation": args.validation,
                                          "threads": args.threads, "rows": rows, "runs": runs},
                                         indent=2))
    plot(runs, args.target, Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
