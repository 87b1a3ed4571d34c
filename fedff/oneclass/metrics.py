"""Anomaly scores and the metrics of the one-class protocol, from continuous scores.

AUROC and average precision rank the scores of the whole test set (anomalies are the
positive class); F1 and accuracy threshold them at the (1 - nu) quantile of the training
rows' scores, so that a share nu of the normal training data is flagged, as the
reference code does. `test_error` of a one-class run is 1 - AUROC: the chance that a
random anomaly scores below a random normal example.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedff.config import Config
from fedff.data.datasets import Dataset
from fedff.engine.network import FFNetwork, Network
from fedff.oneclass.data import is_anomaly


@torch.no_grad()
def anomaly_scores(net: FFNetwork, x: torch.Tensor, chunk: int = 2000) -> torch.Tensor:
    """One score per row: the last layer's loss, or the sum over layers
    (`oneclass.score`); high means anomalous."""
    out = []
    for start in range(0, x.shape[0], chunk):
        scores = net.activities(x[start:start + chunk])[1]  # [layers, rows]
        out.append(scores[-1] if net.cfg.oneclass.score == "last" else scores.sum(dim=0))
    return torch.cat(out).double().cpu()


def threshold_of(train_scores: torch.Tensor, nu: float) -> float:
    return float(torch.quantile(train_scores, 1.0 - nu))


def detection_metrics(scores: torch.Tensor, anomaly: torch.Tensor, threshold: float
                      ) -> dict[str, float]:
    # sklearn (with scipy and pandas) takes over a second to import: every worker,
    # driver and CLI start imports this module, one-class or not
    from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

    y, s = anomaly.cpu().numpy().astype(int), scores.numpy()
    if not np.isfinite(s).all():
        raise ValueError("anomaly scores contain NaN or inf: the network diverged")
    flagged = (s > threshold).astype(int)
    out = {"f1": float(f1_score(y, flagged, zero_division=0)),
           "accuracy": float((flagged == y).mean()), "threshold": threshold}
    if 0 < y.sum() < len(y):  # ranking metrics need both normal rows and anomalies
        auroc = float(roc_auc_score(y, s))
        out.update(auroc=auroc, average_precision=float(average_precision_score(y, s)),
                   test_error=1.0 - auroc)
    return out


def oneclass_metrics(net: Network, ds: Dataset) -> dict[str, Any]:
    """The protocol's metrics on ds's test set, the threshold from its training rows."""
    local = net.in_process()  # a chain's layers gathered here once
    o = local.cfg.oneclass
    threshold = threshold_of(anomaly_scores(local, ds.train_x), o.nu)
    return detection_metrics(anomaly_scores(local, ds.test_x), is_anomaly(ds.test_y, o),
                             threshold)


def plot_detection(scores: torch.Tensor, anomaly: torch.Tensor, threshold: float,
                   out_dir: Path, title: str) -> None:
    """roc.png (ROC curve with its AUROC) and scores.png (score histograms of normal
    rows and anomalies, with the threshold)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    y, s = anomaly.cpu().numpy().astype(int), scores.numpy()
    fpr, tpr, _ = roc_curve(y, s)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, label=f"AUROC {100 * roc_auc_score(y, s):.2f} %")
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    ax.set_xlabel("false positive rate (normal flagged)")
    ax.set_ylabel("true positive rate (anomalies flagged)")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out_dir / "roc.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.histogram_bin_edges(s, bins=60)
    ax.hist(s[y == 0], bins=bins, alpha=0.6, density=True, label="normal (test)")
    ax.hist(s[y == 1], bins=bins, alpha=0.6, density=True, label="anomalies (test)")
    ax.axvline(threshold, color="black", linestyle="--", label="threshold")
    ax.set_xlabel("anomaly score")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "scores.png", dpi=120)
    plt.close(fig)


def write_plots(cfg: Config, net: Network, ds: Dataset, threshold: float, out_dir: Path
                ) -> None:
    local = net.in_process()
    plot_detection(anomaly_scores(local, ds.test_x), is_anomaly(ds.test_y, cfg.oneclass),
                   threshold, out_dir, f"{cfg.name} ({ds.name}, normal = {cfg.oneclass.normal})")
