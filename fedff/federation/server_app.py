"""The ServerApp: the coordinator.

Each round it asks the sampled clients to train the scheduled layers, averages each
layer over the clients that trained it (strategy.py), scores the global model on the
held-out test set, and writes a checkpoint, so a restarted coordinator resumes after the
last finished round. Outputs in the run's `out-dir`: checkpoint.pt (the global network
in `fedff train`'s format: `fedff eval` scores it), metrics.json, metrics.csv and
accuracy_vs_round.png.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from tqdm import tqdm

from fedff.config import Config
from fedff.federation.client_app import config_from_run
from fedff.federation.strategy import LayerwiseFedAvg, Schedule, ServerOptimizer
from fedff.federation.task import (error_metrics, federated, initial_arrays,
                                   load_network_arrays, network_arrays, spec_of,
                                   statistic_keys)
from fedff.engine.network import FFNetwork
from fedff.report import plot_learning_curve, write_csv, write_json
from fedff import files
from fedff.memory import peak_rss_mb
from fedff.train import (CHECKPOINT, DETECTION, PROBES, headline, load_data,
                         reported_error, test_metrics)

logger = logging.getLogger("fedff.federation")


def load_checkpoint(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / CHECKPOINT
    if not path.exists():
        return None
    saved = files.load(path, "federation checkpoint", keys=("network",))
    if "federation" not in saved:
        raise FileExistsError(f"{path} is not a federation checkpoint; give another --out "
                              f"or remove it")
    return saved


class Coordinator:
    """Runs the rounds and keeps the outputs current after each one."""

    def __init__(self, cfg: Config, out_dir: Path, resume: bool, show_progress: bool):
        self.cfg, self.out_dir, self.show = federated(cfg), out_dir, show_progress
        out_dir.mkdir(parents=True, exist_ok=True)
        self.data = load_data(self.cfg)
        self.net = FFNetwork(self.cfg, spec_of(self.data))
        self.arrays = initial_arrays(self.cfg, spec_of(self.data))
        self.history: list[dict[str, Any]] = []
        self.done = 0  # rounds finished (and checkpointed)
        self.resumed_after: list[int] = []  # the round each resume of this run started at
        saved = load_checkpoint(out_dir) if resume else None
        if saved is not None:
            self.net.load_state_dict(saved["network"])
            self.arrays = network_arrays(self.net)
            self.history, self.done = saved["history"], int(saved["federation"]["round"])
            self.resumed_after = [*saved["federation"].get("resumed_after", []), self.done]
            logger.warning("resuming after round %d from %s", self.done, out_dir / CHECKPOINT)
        elif (out_dir / CHECKPOINT).exists():
            load_checkpoint(out_dir)  # refuses a non-federation checkpoint
        f = self.cfg.federation
        self.strategy = LayerwiseFedAvg(
            Schedule(f.schedule, len(self.cfg.model.hidden), f.rounds_per_layer),
            connect_timeout=f.connect_timeout, round_offset=self.done,
            server=ServerOptimizer(f.server_lr, f.server_momentum, f.server_warmup,
                                   statistics=statistic_keys(self.net.state_dict())),
            fraction_train=f.fraction_train, fraction_evaluate=f.fraction_evaluate,
            min_train_nodes=f.min_clients, min_available_nodes=f.min_clients,
            min_evaluate_nodes=min(f.min_clients, 1) if f.fraction_evaluate else 0)
        if saved is not None:  # the server optimiser's momentum goes on where it was
            self.strategy.server.velocity = saved["federation"].get("server_velocity", {})
        self.bar = tqdm(total=f.rounds, initial=self.done, desc="rounds", unit="round",
                        disable=not show_progress, dynamic_ncols=True)
        self.started = time.perf_counter()

    def run(self, grid: Grid) -> dict[str, Any]:
        remaining = self.cfg.federation.rounds - self.done
        if remaining > 0:
            self.strategy.start(grid, self.arrays, num_rounds=remaining,
                                timeout=self.cfg.federation.round_timeout,
                                evaluate_fn=self.after_round)
        self.bar.close()
        return self.summary()

    def after_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower calls this before round 1 (server_round 0) and after every round."""
        if server_round == 0:
            return None
        log = self.strategy.rounds[-1]
        if log.replies == 0:
            raise RuntimeError(f"round {log.round}: no client trained; client errors: "
                               f"{'; '.join(log.failures) or 'none reported'}")
        load_network_arrays(self.net, arrays)
        # The coordinator holds the labels: after the last round an unsupervised
        # network's probes are trained here (its clients never saw a label).
        result = test_metrics(self.net, self.data,
                              final=log.round == self.cfg.federation.rounds)
        record = {"round": log.round, "epoch": log.round * self.cfg.federation.local_epochs,
                  **result, **log.summary(),
                  # clients' evaluation of the global model, then the coordinator's
                  "evaluation_seconds": time.time() - log.ended,
                  "seconds": time.perf_counter() - self.started,
                  "train": self.strategy.last_train_metrics,
                  "client_eval": self.strategy.last_evaluate_metrics}
        self.history.append(record)
        self.done = log.round
        self.save()
        self.bar.update(1)
        self.bar.set_postfix(**headline(record),
                             clients=log.replies)
        return MetricRecord(error_metrics(result, int(self.data.test_x.shape[0])))

    def save(self) -> None:
        self.net.epoch = self.done * self.cfg.federation.local_epochs
        files.save({"network": self.net.state_dict(), "history": self.history,
                    "train_seconds": sum(r["round_seconds"] for r in self.history),
                    "federation": {"round": self.done, "resumed_after": self.resumed_after,
                                   "server_velocity": self.strategy.server.velocity}},
                   self.out_dir / CHECKPOINT)
        write_json(self.out_dir / "metrics.json", self.summary())
        write_csv(self.out_dir / "metrics.csv", self.history)
        plot_learning_curve(self.history, self.out_dir / "accuracy_vs_round.png",
                            f"{self.cfg.name}: {self.cfg.federation.clients} clients, "
                            f"{self.cfg.federation.partitioner}", reported_error(self.cfg),
                            x="round")

    def summary(self) -> dict[str, Any]:
        final = self.history[-1] if self.history else {}
        overheads = sorted(r["overhead_fraction"] for r in self.history)
        return {"config": self.cfg.to_dict(), "dataset": self.data.name,
                "rounds": self.done, "epochs": self.done * self.cfg.federation.local_epochs,
                "resumed_after_rounds": self.resumed_after,
                "test_error": final.get("test_error"), "error_head": final.get("error_head"),
                "error_goodness": final.get("error_goodness"),
                "layer_errors": final.get("layer_errors"),
                **{k: final[k] for k in (*PROBES, *DETECTION) if k in final},
                "train_seconds": sum(r["round_seconds"] for r in self.history),
                "median_round_overhead_fraction":
                    overheads[len(overheads) // 2] if overheads else None,
                "coordinator_peak_rss_mb": peak_rss_mb(), "history": self.history}


def make_server_app(fixed: Config | None = None, out_dir: str | None = None,
                    resume: bool | None = None, show_progress: bool = False,
                    results: list | None = None) -> ServerApp:
    """A ServerApp for `fixed` (fedff simulate), or one that reads the run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run = dict(context.run_config)
        cfg = fixed if fixed is not None else config_from_run(run)
        out = Path(out_dir or str(run.get("out-dir", "runs/federation")))
        again = bool(run.get("resume", False)) if resume is None else resume
        summary = Coordinator(cfg, out, again, show_progress).run(grid)
        if results is not None:
            results.append(summary)

    return app


app = make_server_app()
