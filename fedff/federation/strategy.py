"""Per-layer federated averaging for FF networks (Flower Message API).

Flower's FedAvg averages one ArrayRecord whose keys must be identical in every reply.
FF layers learn on their own, so a round may train only some of them (layer-wise
progressive schedules train layer 1 for R rounds, freeze it, then layer 2, ...): each
array key is averaged over the clients that sent it, weighted by their example counts,
and every key nobody sent keeps its global value.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import (Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord,
                      RecordDict)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

WEIGHT_KEY = "num-examples"
logger = logging.getLogger("fedff.federation")


def aggregate_layers(current: ArrayRecord, contents: list[RecordDict],
                     weight_key: str = WEIGHT_KEY) -> ArrayRecord:
    """Each key: the example-weighted mean over the replies that carry it; the others
    unchanged. Replies with zero examples count for nothing."""
    sums: dict[str, np.ndarray] = {}
    totals: dict[str, float] = {}
    for content in contents:
        weight = float(next(iter(content.metric_records.values()))[weight_key])
        if weight <= 0:
            continue
        for record in content.array_records.values():
            for key, array in record.items():
                value = array.numpy().astype(np.float64) * weight
                sums[key] = sums[key] + value if key in sums else value
                totals[key] = totals.get(key, 0.0) + weight
    out = {key: current[key] for key in current}
    for key, total in totals.items():
        dtype = current[key].numpy().dtype if key in current else np.float32
        out[key] = Array((sums[key] / total).astype(dtype))
    return ArrayRecord(out)


@dataclass
class ServerOptimizer:
    """The coordinator's step on the clients' mean (server learning rate and momentum,
    as in FedAvgM and FedOpt): delta = mean - global is a pseudo-gradient, and
    global += lr_r * v with v = momentum * v + delta; lr_r rises linearly from 1 over
    `warmup` rounds. lr = 1, momentum = 0 is plain FedAvg, the default.

    Why it is here: with K IID clients the mean moves the model about as far as one
    client's local steps, a 1/K of centralized progress per epoch, and lr near K is the
    textbook remedy (large-batch SGD's linear scaling). For supervised FF on MNIST it does
    not work: with 10 clients, lr 5 and 10 (2 warm-up rounds) diverged at round 3 (85 % and
    81 % test error), as a 10x client lr did in round 1. It stays for other settings
    (server momentum is the usual help under label skew).
    Running statistics (the layers' buffers, e.g. peer-normalisation means; keys from
    `task.statistic_keys`) take the mean as it is.
    """

    lr: float = 1.0
    momentum: float = 0.0
    warmup: int = 0  # rounds over which lr rises linearly from 1
    velocity: dict[str, np.ndarray] = field(default_factory=dict)
    statistics: frozenset[str] = frozenset()  # averaged as they are, never stepped

    def lr_at(self, server_round: int) -> float:
        if self.warmup <= 0:
            return self.lr
        return 1.0 + (self.lr - 1.0) * min(1.0, (server_round - 1) / self.warmup)

    def step(self, current: ArrayRecord, mean: ArrayRecord, keys: Iterable[str],
             server_round: int) -> ArrayRecord:
        """`current` moved towards `mean` on `keys` (what the clients trained)."""
        lr = self.lr_at(server_round)
        out = {key: current[key] for key in current}
        for key in keys:
            target = mean[key].numpy()
            if key not in current or key in self.statistics:
                out[key] = mean[key]
                continue
            now = current[key].numpy()
            delta = target.astype(np.float64) - now
            if self.momentum > 0:
                delta = self.velocity[key] = self.momentum * self.velocity.get(key, 0) + delta
            out[key] = Array((now + lr * delta).astype(now.dtype))
        return ArrayRecord(out)


@dataclass(frozen=True)
class Schedule:
    """Which layers a round trains: all of them, or one after another (progressive)."""

    kind: str = "all"  # all | progressive
    layers: int = 3
    rounds_per_layer: int = 1

    def layers_for(self, server_round: int) -> list[int]:
        if self.kind == "all":
            return list(range(self.layers))
        if self.kind != "progressive":
            raise ValueError(f"schedule '{self.kind}' is not known; use 'all' or "
                             f"'progressive'")
        current = min((server_round - 1) // self.rounds_per_layer, self.layers - 1)
        return [current]


class NotEnoughClients(RuntimeError):
    """Fewer clients connected than the run's minimum, for longer than it waits."""


@dataclass
class RoundLog:
    """What happened in one round, for metrics.json and the overhead figure."""

    round: int
    layers: list[int]
    sampled: int = 0
    replies: int = 0
    failures: list[str] = field(default_factory=list)
    aggregated: bool = False
    started: float = 0.0  # wall clock (time.time) when the round's messages were made
    replied: float = 0.0  # when send_and_receive returned
    ended: float = 0.0  # when aggregation finished
    client_intervals: list[tuple[float, float]] = field(default_factory=list)

    def training_span(self) -> float:
        """Seconds during which at least one client was training (the union)."""
        total, edge = 0.0, float("-inf")
        for start, end in sorted(self.client_intervals):
            start = max(start, edge)
            if end > start:
                total, edge = total + end - start, end
        return total

    def summary(self) -> dict:
        seconds = self.ended - self.started
        span = self.training_span()
        return {"round": self.round, "layers": self.layers, "sampled": self.sampled,
                "replies": self.replies, "failures": self.failures,
                "aggregated": self.aggregated, "round_seconds": seconds,
                "client_training_seconds": span,
                "slowest_client_seconds": max((e - s for s, e in self.client_intervals),
                                              default=0.0),
                "overhead_seconds": seconds - span,
                "overhead_fraction": (seconds - span) / seconds if seconds > 0 else 0.0}


class LayerwiseFedAvg(FedAvg):
    """FedAvg per layer: tells clients which layers to train, averages what comes back.

    The clients' mean goes through a ServerOptimizer (plain FedAvg by default).
    On top of Flower's FedAvg: it waits for `min_available_nodes` only up to
    `connect_timeout` seconds and then fails with a clear message (FedAvg waits forever);
    a round with fewer than `min_train_nodes` good replies keeps the global model (a client
    that dropped out costs at most the round timeout); `round_offset` lets a restarted
    coordinator go on numbering rounds where its checkpoint ended; and every round is
    logged (`rounds`), failures included.
    """

    def __init__(self, schedule: Schedule = Schedule(), connect_timeout: float = 300.0,
                 round_offset: int = 0, server: ServerOptimizer | None = None, **kwargs):
        super().__init__(**kwargs)
        self.schedule = schedule
        self.server = server or ServerOptimizer()
        self.connect_timeout = connect_timeout
        self.round_offset = round_offset
        self.rounds: list[RoundLog] = []
        self.last_train_metrics: dict = {}
        self.last_evaluate_metrics: dict = {}
        self._current = ArrayRecord()

    def _wait_for_clients(self, grid: Grid, needed: int) -> list[int]:
        deadline = time.monotonic() + self.connect_timeout
        while len(nodes := list(grid.get_node_ids())) < needed:
            if time.monotonic() > deadline:
                raise NotEnoughClients(
                    f"only {len(nodes)} of the {needed} clients this run needs connected "
                    f"within {self.connect_timeout:.0f} s; start more SuperNodes, or lower "
                    f"federation.min_clients / raise federation.connect_timeout")
            time.sleep(0.5)
        return nodes

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        self._current = arrays
        layers = self.schedule.layers_for(server_round)
        log = RoundLog(round=server_round, layers=layers, started=time.time())
        self.rounds.append(log)
        nodes = self._wait_for_clients(grid, max(self.min_available_nodes,
                                                 self.min_train_nodes))
        size = max(int(len(nodes) * self.fraction_train), self.min_train_nodes)
        sampled = random.sample(nodes, min(size, len(nodes)))
        log.sampled = len(sampled)
        config["server-round"] = server_round
        config["train-layers"] = layers
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, sampled, MessageType.TRAIN)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord,
                           config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return super().configure_evaluate(server_round + self.round_offset, arrays, config,
                                          grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if not self.rounds or self.rounds[-1].round != server_round + self.round_offset:
            self.rounds.append(RoundLog(server_round + self.round_offset, [],
                                        sampled=len(replies), started=time.time()))
        log = self.rounds[-1]
        log.replied = time.time()
        valid, errors = self._check_and_log_replies(replies, is_train=True, validate=False)
        log.replies = len(valid)
        log.failures = [f"node {m.metadata.src_node_id}: {m.error.reason}" for m in errors]
        missing = log.sampled - len(replies)
        if missing > 0:
            log.failures.append(f"{missing} client(s) did not reply within the round timeout")
        for line in log.failures:
            logger.warning("round %d: %s", log.round, line)
        for msg in valid:
            metrics = next(iter(msg.content.metric_records.values()), {})
            if "train-start" in metrics:
                log.client_intervals.append((float(metrics["train-start"]),
                                             float(metrics["train-end"])))
        if len(valid) < max(1, self.min_train_nodes):
            logger.warning("round %d: %d good replies, fewer than the minimum %d; the global "
                           "model stays as it was", log.round, len(valid),
                           self.min_train_nodes)
            log.ended = time.time()
            return None, None
        contents = [msg.content for msg in valid]
        mean = aggregate_layers(self._current, contents, self.weighted_by_key)
        trained = {key for c in contents for r in c.array_records.values() for key in r}
        arrays = self.server.step(self._current, mean, sorted(trained), log.round)
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        self.last_train_metrics = dict(metrics)
        log.aggregated = True
        log.ended = time.time()
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        metrics = super().aggregate_evaluate(server_round, replies)
        self.last_evaluate_metrics = dict(metrics) if metrics else {}
        return metrics
