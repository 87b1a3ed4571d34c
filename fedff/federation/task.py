"""What a federation moves: an FF network's layers as a Flower ArrayRecord, and back.

Keys are `layer{i}.weight`, `layer{i}.bias` and `head.weight`, so the coordinator can
average each layer on its own (strategy.py). Only parameters travel; every client keeps
its own optimiser state and running statistics, as a data owner's process would.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedff.ff.network import FFNetwork


def network_arrays(net: FFNetwork, layers: list[int] | None = None,
                   head: bool = True) -> ArrayRecord:
    """The chosen layers' (default: all) and the head's parameters."""
    chosen = range(len(net.layers)) if layers is None else layers
    arrays: dict[str, Array] = {}
    for i in chosen:
        for name, value in net.layers[i].weights().items():
            arrays[f"layer{i}.{name}"] = Array(value.cpu().numpy().copy())
    if head:
        arrays["head.weight"] = Array(net.head.linear.weight.detach().cpu().numpy().copy())
    return ArrayRecord(arrays)


def load_network_arrays(net: FFNetwork, record: ArrayRecord) -> None:
    """Loads every key the record carries; layers it does not mention stay as they are."""
    per_layer: dict[int, dict[str, torch.Tensor]] = {}
    for key in record:
        value = torch.from_numpy(np.array(record[key].numpy()))
        prefix, _, name = key.partition(".")
        if prefix == "head":
            with torch.no_grad():
                net.head.linear.weight.copy_(value)
        elif prefix.startswith("layer") and prefix[5:].isdigit():
            per_layer.setdefault(int(prefix[5:]), {})[name] = value
        else:
            raise KeyError(f"unexpected array '{key}'; expected layer<i>.weight/bias or "
                           f"head.weight")
    for i, weights in per_layer.items():
        if not 0 <= i < len(net.layers):
            raise KeyError(f"array for layer {i}, but the network has {len(net.layers)}")
        current = net.layers[i].weights()
        net.layers[i].load_weights({**current, **weights})
