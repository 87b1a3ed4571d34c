"""What one data owner does in a round, and what travels between it and the coordinator.

Arrays travel under `layer<i>.<key>` and `head.<key>`, where each layer kind names its
own keys and what is federated (`Layer.federated_arrays`: its module's tensors and
running statistics, e.g. an FF layer's peer-normalisation mean, averaged like the weights
as FedAvg does with batch-norm statistics), so the coordinator can average each layer
on its own (strategy.py). Optimiser state stays with the client and starts afresh every
round (plain FedAvg).

They are read from and written into the network state dict, which the in-process
`FFNetwork` and a `Pipeline` over the client's own layer workers share: one client code
path for both.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedff.config import Config, ConfigError
from fedff.data.datasets import Dataset
from fedff.federation.partitions import partition_indices
from fedff.engine.head import LinearHead
from fedff.engine.network import UNLABELLED, FFNetwork, InputSpec, Network
from fedff.errors import ShapeError
from fedff.layers import registry
from fedff.layers.contract import Layer
from fedff.train import Progress, load_data, test_metrics, train_epoch

def federated(cfg: Config) -> Config:
    """The config a client trains with: the lr schedule spans the whole federation."""
    cfg = copy.deepcopy(cfg)
    cfg.train.epochs = cfg.federation.rounds * cfg.federation.local_epochs
    return cfg


def spec_of(ds: Dataset) -> InputSpec:
    return InputSpec(ds.features, ds.image_shape, ds.num_classes)


# -- arrays <-> network state -----------------------------------------------------------
def state_arrays(state: dict[str, Any], layers: list[int] | None = None,
                 head: bool = True) -> ArrayRecord:
    """The chosen layers' (default: all) and the head's federated arrays from a network
    state, under `layer<i>.<key>` and `head.<key>` with the keys each layer kind names."""
    chosen = range(len(state["layers"])) if layers is None else layers
    parts = {f"layer{i}": _kind(state["layers"][i]).federated_arrays(state["layers"][i])
             for i in chosen}
    if head and state["head"] is not None:  # a top-down network has no separate head
        parts["head"] = LinearHead.federated_arrays(state["head"])
    return ArrayRecord({f"{prefix}.{key}": Array(value.detach().cpu().numpy().copy())
                        for prefix, arrays in parts.items() for key, value in arrays.items()})


def with_arrays(state: dict[str, Any], record: ArrayRecord) -> dict[str, Any]:
    """A copy of `state` with every array the record carries; the rest as it was."""
    n = len(state["layers"])
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key in record:
        prefix, _, name = key.partition(".")
        i = prefix[5:]
        if prefix != "head" and not (prefix.startswith("layer") and i.isdigit()):
            raise KeyError(f"unexpected array '{key}'; expected layer<i>.<key> or head.<key>")
        if prefix != "head" and not 0 <= int(i) < n:
            raise KeyError(f"array for layer {i}, but the network has {n} layers")
        grouped.setdefault(prefix, {})[name] = torch.from_numpy(np.array(record[key].numpy()))
    state = {**state, "layers": list(state["layers"])}
    try:
        for prefix, arrays in grouped.items():
            if prefix == "head":
                state["head"] = LinearHead.with_federated_arrays(state["head"], arrays)
            else:
                i = int(prefix[5:])
                layer = state["layers"][i]
                state["layers"][i] = _kind(layer).with_federated_arrays(layer, arrays)
    except ShapeError as e:
        raise KeyError(f"{prefix}: {e}") from e
    return state


def statistic_keys(state: dict[str, Any]) -> frozenset[str]:
    """The federated arrays that are running statistics (each layer's buffers): the
    coordinator takes their mean as it is, never a server step."""
    return frozenset(f"layer{i}.{key}" for i, layer in enumerate(state["layers"])
                     for key in layer["buffers"])


def _kind(layer_state: dict[str, Any]) -> type[Layer]:
    return registry.layer_class(layer_state["kind"])


def network_arrays(net: Network, layers: list[int] | None = None, head: bool = True
                   ) -> ArrayRecord:
    return state_arrays(net.state_dict(), layers, head)


def load_network_arrays(net: Network, record: ArrayRecord) -> None:
    """Loads every key the record carries; layers it does not mention stay as they are."""
    net.load_state_dict(with_arrays(net.state_dict(), record))


def initial_arrays(cfg: Config, spec: InputSpec) -> ArrayRecord:
    """The global model before round 1: the network as `train.seed` initialises it."""
    return network_arrays(FFNetwork(federated(cfg), spec))


# -- a client's data --------------------------------------------------------------------
_DATA: dict[tuple, Dataset] = {}


def client_data(cfg: Config, partition_id: int, num_partitions: int) -> Dataset:
    """This client's training rows and its share of the test set (same partitioner).

    Cached per process: a simulation runs many clients in each worker process, and a
    SuperNode calls its ClientApp every round.
    """
    f = cfg.federation
    key = (*_data_key(cfg), f.partitioner, f.alpha, f.classes_per_client, cfg.train.seed,
           partition_id, num_partitions)
    if key not in _DATA:
        full = _full_data(cfg)
        train = partition_indices(full.train_y, f, partition_id, num_partitions,
                                  cfg.train.seed)
        test = partition_indices(full.test_y, dataclasses.replace(f, partitioner="iid"),
                                 partition_id, num_partitions, cfg.train.seed)
        _DATA[key] = dataclasses.replace(full, train_x=full.train_x[train],
                                         train_y=full.train_y[train],
                                         test_x=full.test_x[test], test_y=full.test_y[test])
        if cfg.train.algorithm == "unsupervised":  # UFF: the clients hold no labels
            for name in ("train_y", "test_y"):
                setattr(_DATA[key], name, torch.full_like(getattr(_DATA[key], name),
                                                          UNLABELLED))
    return _DATA[key]


_FULL: dict[tuple, Dataset] = {}


def _data_key(cfg: Config) -> tuple:
    """What decides the rows `load_data` returns and what a client keeps of their labels
    (a one-class run: its normal class; an unsupervised one: none)."""
    d, o = cfg.data, cfg.oneclass
    one_class = (o.normal, o.contamination, cfg.train.seed) \
        if cfg.train.algorithm == "oneclass" else None
    return (d.dataset, d.data_dir, d.train_limit, d.test_limit, cfg.train.algorithm,
            one_class)


def _full_data(cfg: Config) -> Dataset:
    key = _data_key(cfg)
    if key not in _FULL:
        _FULL[key] = load_data(cfg)
    return _FULL[key]


# -- a round on one client --------------------------------------------------------------
def train_round(net: Network, ds: Dataset, server_round: int, local_epochs: int
                ) -> dict[str, float]:
    """`local_epochs` epochs on the client's rows; epochs count on from earlier rounds so
    each layer's lr schedule runs over the whole federation."""
    progress = Progress()
    first = (server_round - 1) * local_epochs
    for epoch in range(first, first + local_epochs):
        progress.add(train_epoch(net, ds, epoch, show=False))
        net.epoch = epoch + 1
    return progress.means()


def client_train(cfg: Config, ds: Dataset, global_arrays: ArrayRecord, server_round: int,
                 train_layers: list[int], partition_id: int = 0, build: Any = None
                 ) -> tuple[ArrayRecord, dict[str, float]]:
    """One client's round: load the global model, train the scheduled layers (the others
    frozen) and return what it trained, its example count and timings."""
    n = len(cfg.model.hidden)
    bad = [i for i in train_layers if not 0 <= i < n]
    if bad:
        raise ConfigError(f"the coordinator asked to train layers {bad}; this client's "
                          f"network has layers 0..{n - 1}")
    cfg = federated(cfg)
    cfg.train.freeze = [i for i in range(n) if i not in train_layers]
    # Each client and round draws its own shuffles and negatives.
    cfg.train.seed = (cfg.train.seed * 1_000_003 + server_round) * 1009 + partition_id
    started = time.time()
    net = (build or FFNetwork)(cfg, spec_of(ds))
    try:
        load_network_arrays(net, global_arrays)
        metrics = train_round(net, ds, server_round, cfg.federation.local_epochs)
        arrays = network_arrays(net, layers=train_layers, head=True)
    finally:
        net.close()
    ended = time.time()
    metrics = {k.replace("/", "."): float(v) for k, v in metrics.items()}
    metrics.update({"num-examples": int(ds.train_x.shape[0]), "train-start": started,
                    "train-end": ended, "train-seconds": ended - started})
    return arrays, metrics


def client_evaluate(cfg: Config, ds: Dataset, global_arrays: ArrayRecord
                    ) -> dict[str, float]:
    """The global model on this client's share of the test set (an unsupervised client
    has no labels to score it with: it reports its example count only)."""
    if bool((ds.test_y == UNLABELLED).any()):
        return {"num-examples": int(ds.test_x.shape[0])}
    net = FFNetwork(federated(cfg), spec_of(ds))
    load_network_arrays(net, global_arrays)
    return error_metrics(test_metrics(net, ds), int(ds.test_x.shape[0]))


def error_metrics(result: dict[str, Any], examples: int) -> dict[str, float]:
    out: dict[str, float] = {"num-examples": examples}
    for key, value in result.items():
        if isinstance(value, list):
            out.update({f"{key}.{i}": float(v) for i, v in enumerate(value)})
        else:
            out[key] = float(value)
    return out
