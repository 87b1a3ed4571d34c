"""Per-layer federated averaging for FF networks (Flower Message API).

Flower's FedAvg averages one ArrayRecord whose keys must be identical in every reply.
FF layers learn on their own, so a round may train only some of them (layer-wise
progressive schedules train layer 1 for R rounds, freeze it, then layer 2, ...): each
array key is averaged over the clients that sent it, weighted by their example counts,
and every key nobody sent keeps its global value.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

WEIGHT_KEY = "num-examples"


def layer_of(key: str) -> int | None:
    """'layer2.weight' -> 2; the head and anything else -> None."""
    head, _, _ = key.partition(".")
    return int(head[5:]) if head.startswith("layer") and head[5:].isdigit() else None


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


class LayerwiseFedAvg(FedAvg):
    """FedAvg per layer: tells clients which layers to train, averages what comes back."""

    def __init__(self, schedule: Schedule = Schedule(), **kwargs):
        super().__init__(**kwargs)
        self.schedule = schedule
        self._current = ArrayRecord()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._current = arrays
        config["train-layers"] = self.schedule.layers_for(server_round)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True, validate=False)
        if not valid:
            return None, None
        contents = [msg.content for msg in valid]
        arrays = aggregate_layers(self._current, contents, self.weighted_by_key)
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        return arrays, metrics
