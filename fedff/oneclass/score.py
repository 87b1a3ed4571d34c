"""`fedff score`: anomaly scores from a one-class checkpoint, for rows a user brings
(a `.npy` array or a `.csv` table, one row per example, features scaled like the
training data) or for the checkpoint's own test set.

The threshold that turns a score into a flag is the one the training run measured on
its training rows (the last evaluated epoch's `threshold`), so a flag means the same
thing here as in the run's metrics.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedff import config as config_mod
from fedff import files
from fedff.engine.network import FFNetwork, InputSpec
from fedff.errors import ConfigError, ShapeError
from fedff.oneclass.data import is_anomaly
from fedff.oneclass.metrics import anomaly_scores, detection_metrics


def load_scorer(checkpoint: Path) -> tuple[FFNetwork, float]:
    """The network of a one-class checkpoint and its training threshold."""
    saved = files.load(checkpoint, keys=("network", "history"))
    cfg = config_mod.from_dict(saved["network"]["config"])
    if cfg.train.algorithm != "oneclass":
        raise ConfigError(f"{checkpoint} is a {cfg.train.algorithm!r} checkpoint; `fedff score` "
                          f"scores one-class runs (train.algorithm = 'oneclass'); use "
                          f"`fedff eval` for the others")
    thresholds = [r["threshold"] for r in saved["history"] if "threshold" in r]
    if not thresholds:
        raise ConfigError(f"{checkpoint} holds no evaluated epoch (no threshold yet); train "
                          f"on with --resume until an epoch is evaluated")
    net = FFNetwork(cfg, InputSpec(**saved["network"]["spec"]))
    net.load_state_dict(saved["network"])
    return net, float(thresholds[-1])


def read_rows(path: Path, features: int) -> torch.Tensor:
    """A float [rows, features] tensor from a .npy or .csv file (a header line is
    skipped when it is not numeric)."""
    if path.suffix == ".npy":
        try:
            rows = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise ShapeError(f"{path} is not a plain numeric .npy array ({e})") from e
    elif path.suffix == ".csv":
        try:
            rows = np.loadtxt(path, delimiter=",", ndmin=2, dtype=np.float64,
                              skiprows=_header_lines(path))
        except ValueError as e:
            raise ShapeError(f"{path} has a value that is not a number ({e}); give one "
                             f"row of {features} numbers per line") from e
    else:
        raise ConfigError(f"cannot read {path}: give a .npy array or a .csv table")
    if rows.ndim == 1 and rows.shape[0] == features:
        rows = rows[None, :]
    if rows.ndim != 2 or rows.shape[1] != features:
        raise ShapeError(f"{path} holds an array of shape {list(rows.shape)}; this network "
                         f"scores rows of {features} features: shape [rows, {features}] "
                         f"(images flattened, scaled like the training data to [0, 1])")
    if not np.issubdtype(rows.dtype, np.number) or not np.isfinite(rows).all():
        raise ShapeError(f"{path} holds values that are not finite numbers")
    if rows.shape[0] == 0:
        raise ShapeError(f"{path} holds no rows")
    return torch.from_numpy(rows.astype(np.float32))


def _header_lines(path: Path) -> int:
    with open(path) as f:
        first = f.readline().split(",")
    try:
        [float(v) for v in first]
        return 0
    except ValueError:
        return 1


def write_scores(path: Path, scores: torch.Tensor, threshold: float,
                 labels: torch.Tensor | None = None) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "score", "anomaly", *(["label"] if labels is not None else [])])
        for i, s in enumerate(scores.tolist()):
            extra = [int(labels[i])] if labels is not None else []
            writer.writerow([i, repr(s), int(s > threshold), *extra])


def score(checkpoint: Path, rows: Path | None, out: Path, data_dir: str | None = None
          ) -> dict[str, Any]:
    """Scores `rows` (or the checkpoint's test set) into the CSV `out`; returns a summary
    (with AUROC and the other metrics when the test set is scored)."""
    net, threshold = load_scorer(checkpoint)
    summary: dict[str, Any] = {"checkpoint": str(checkpoint), "threshold": threshold}
    if rows is not None:
        x = read_rows(rows, net.spec.features)
        scores = anomaly_scores(net, x)
        write_scores(out, scores, threshold)
        return {**summary, "rows": int(x.shape[0]), "flagged": int((scores > threshold).sum()),
                "scores": str(out)}
    from fedff.train import load_data

    cfg = net.cfg
    if data_dir:
        cfg.data.data_dir = data_dir
    ds = load_data(cfg)
    scores = anomaly_scores(net, ds.test_x)
    write_scores(out, scores, threshold, ds.test_y)
    metrics = detection_metrics(scores, is_anomaly(ds.test_y, cfg.oneclass), threshold)
    return {**summary, "dataset": ds.name, "normal": cfg.oneclass.normal,
            "rows": int(ds.test_x.shape[0]), "scores": str(out), **metrics}
