"""The training job behind `fedff train`: epochs, progress, evaluation, outputs.

Outputs in the run directory: metrics.json (summary + per-epoch history), metrics.csv
(the same history), checkpoint.pt (network state after the last finished epoch, enough
to resume or to score with `fedff eval`) and learning_curve.png.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from fedff.config import Config, ConfigError
from fedff.errors import FedffError
from fedff.config import resumed as config_resumed
from fedff.data.datasets import Dataset, load_dataset
from fedff.engine.evaluate import evaluate
from fedff.engine.network import FFNetwork, InputSpec, Network
from fedff import files
from fedff.memory import peak_rss_mb, rss_mb
from fedff.oneclass.data import one_vs_rest
from fedff.oneclass.metrics import oneclass_metrics, write_plots
from fedff.report import plot_learning_curve, write_csv, write_json

CHECKPOINT = "checkpoint.pt"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device = 'cuda' but torch sees no CUDA device; "
                          "use --device cpu or --device auto")
    return torch.device(name)


def load_data(cfg: Config) -> Dataset:
    """The run's dataset; a one-class run trains on its normal class only."""
    d = cfg.data
    ds = load_dataset(d.dataset, d.data_dir or None, d.download, d.train_limit, d.test_limit)
    if cfg.train.algorithm == "oneclass":
        ds = one_vs_rest(ds, cfg.oneclass, cfg.train.seed)
    return ds


def build_network(cfg: Config, ds: Dataset, device: torch.device) -> FFNetwork:
    return FFNetwork(cfg, InputSpec(ds.features, ds.image_shape, ds.num_classes), device)


REPORTED = {"goodness": "error_goodness", "head": "error_head", "probe": "probe_error"}
PROBES = ("probe_error", "mlp_probe_error", "knn_error")
DETECTION = ("auroc", "average_precision", "f1", "accuracy", "threshold")  # one-class


def test_metrics(net: Network, ds: Dataset, final: bool = False) -> dict[str, Any]:
    """Test errors; after the last epoch of an unsupervised run also the probes'."""
    cfg = net.cfg
    if cfg.train.algorithm == "oneclass":  # AUROC and friends; test_error = 1 - AUROC
        return oneclass_metrics(net, ds)
    result = evaluate(net, ds.test_x, ds.test_y)
    if final and cfg.train.algorithm == "unsupervised" and cfg.probe.enabled:
        from fedff.uff.probe import probe_metrics

        result.update(probe_metrics(net, ds, cfg.probe, cfg.train.seed))
    key = REPORTED[cfg.train.classify]
    if key not in result:  # the probe runs after the last epoch only
        key = "error_head"
    return {"test_error": result[key], **result}


@dataclass
class Progress:
    """Running means of a batch's scalar metrics, without keeping per-batch values."""

    sums: dict[str, float] = field(default_factory=dict)
    count: int = 0

    def add(self, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1

    def means(self) -> dict[str, float]:
        return {k: v / max(1, self.count) for k, v in self.sums.items()}


def apply_threads(cfg: Config) -> None:
    """torch's intra-op threads from `train.threads` (0 keeps torch's default, one per
    core). Every process that trains sets it: two runs side by side with the default
    each run a thread per core and, on this 2-core machine, ran 3-4x slower."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)


def train_epoch(net: Network, ds: Dataset, epoch: int, show: bool) -> dict[str, float]:
    t = net.cfg.train
    net.set_epoch(epoch)
    order = torch.randperm(ds.train_x.shape[0], generator=net.generator)
    batches = order.split(t.batch_size)
    progress = Progress()
    bar = tqdm(batches, desc=f"epoch {epoch + 1}/{t.epochs}", unit="batch", leave=False,
               disable=not show, dynamic_ncols=True)
    for idx in bar:
        metrics = net.train_batch(ds.train_x[idx], ds.train_y[idx], idx)
        if metrics:  # a worker chain reports a batch's metrics when its ack returns
            progress.add(metrics)
    for metrics in net.end_epoch():
        progress.add(metrics)
    return progress.means()


def run(cfg: Config, out_dir: Path, show_progress: bool = True, resume: bool = False,
        build: Callable[[Config, Dataset, torch.device], Network] | None = None) -> dict[str, Any]:
    """Trains cfg, writing outputs to out_dir after every epoch; returns metrics.json.

    `build` makes the network the loop drives: the in-process `FFNetwork` by default, or
    a `Pipeline` over layer workers (fedff.pipeline); both are a `Network`. On resume the
    checkpoint gives the shapes and learned state, `cfg` (the command line) every
    hyperparameter.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.train.device)
    apply_threads(cfg)
    saved = None
    if resume and (out_dir / CHECKPOINT).exists():
        saved = files.load(out_dir / CHECKPOINT, keys=("network", "history"))
        cfg, changed = config_resumed(cfg, saved["network"]["config"])
        if changed:
            warnings.warn(f"resuming {out_dir / CHECKPOINT}: the network's shape comes from "
                          f"the checkpoint ({', '.join(changed)}), not the command line")
    ds = load_data(cfg)
    net = (build or build_network)(cfg, ds, device)
    history: list[dict[str, Any]] = []
    train_seconds = 0.0
    if saved is not None:
        net.load_state_dict(saved["network"])
        history, train_seconds = saved["history"], saved["train_seconds"]
    epochs = cfg.train.epochs
    summary: dict[str, Any] = {}
    outer = tqdm(range(net.epoch, epochs), desc=cfg.name, unit="epoch", initial=net.epoch,
                 total=epochs, disable=not show_progress, dynamic_ncols=True)
    for epoch in outer:
        start = time.perf_counter()
        train = train_epoch(net, ds, epoch, show_progress)
        check_finite(train, epoch, out_dir)
        seconds = time.perf_counter() - start
        train_seconds += seconds
        record: dict[str, Any] = {"epoch": epoch + 1, "epoch_seconds": seconds,
                                  "train_seconds": train_seconds,
                                  "samples_per_s": ds.train_x.shape[0] / seconds,
                                  "rss_mb": rss_mb(), "train": train}
        last = epoch + 1 == epochs
        if last or (epoch + 1) % cfg.train.eval_every == 0:
            record.update(test_metrics(net, ds, final=last))
            outer.set_postfix(headline(record))
        history.append(record)
        net.epoch = epoch + 1
        files.save({"network": net.state_dict(), "history": history,
                    "train_seconds": train_seconds}, out_dir / CHECKPOINT)
        summary = summarize(cfg, ds, device, history, train_seconds)
        write_json(out_dir / "metrics.json", summary)
        write_csv(out_dir / "metrics.csv", history)
    if history:
        plot_learning_curve(history, out_dir / "learning_curve.png", f"{cfg.name} ({ds.name})",
                            reported_error(cfg))
    if history and cfg.train.algorithm == "oneclass":
        write_plots(cfg, net, ds, history[-1]["threshold"], out_dir)
    return summary


def headline(record: dict[str, Any]) -> dict[str, str]:
    """What a progress bar shows of an evaluation: AUROC for one-class runs."""
    if "auroc" in record:
        return {"auroc": f"{100 * record['auroc']:.2f}%"}
    return {"test_error": f"{100 * record['test_error']:.2f}%"}


def reported_error(cfg: Config) -> str:
    """The history key behind test_error, drawn solid in the learning curve."""
    if cfg.train.algorithm == "oneclass":
        return "test_error"
    return "error_goodness" if cfg.train.classify == "goodness" else "error_head"


class TrainingDiverged(FedffError):
    """A training metric became NaN or infinite: the run stops instead of going on."""


def check_finite(metrics: dict[str, float], epoch: int, out_dir: Path) -> None:
    bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
    if bad:
        raise TrainingDiverged(
            f"training diverged in epoch {epoch + 1}: {', '.join(bad)} became "
            f"{metrics[bad[0]]}; lower optim.lr (or the layer's own rate) and run again; "
            f"{out_dir / CHECKPOINT} holds the last finished epoch, if any")


def summarize(cfg: Config, ds: Dataset, device: torch.device, history: list[dict[str, Any]],
              train_seconds: float) -> dict[str, Any]:
    evaluated = [r for r in history if "test_error" in r]
    final = evaluated[-1] if evaluated else {}
    return {
        "config": cfg.to_dict(),
        "dataset": ds.name,
        "train_examples": int(ds.train_x.shape[0]),
        "test_examples": int(ds.test_x.shape[0]),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "epochs": len(history),
        "train_seconds": train_seconds,
        "test_error": final.get("test_error"),
        "error_head": final.get("error_head"),
        "error_goodness": final.get("error_goodness"),
        "layer_errors": final.get("layer_errors"),
        **{k: final[k] for k in (*PROBES, *DETECTION) if k in final},
        "peak_rss_mb": peak_rss_mb(),
        "history": history,
    }
