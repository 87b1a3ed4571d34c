"""Which training examples each client (data owner) holds: flwr-datasets partitioners.

The partitioners work on a Hugging Face dataset; ours are tensors already in memory, so
they partition a one-column table of labels plus each row's index, and a client takes
its rows by index. The same seed gives every client the same split without talking to
the others, which is what a simulation needs (and what a deployment with a shared seed
and one dataset per site does not: there each site simply has its own data).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from fedff.config import ConfigError, FederationConfig


@lru_cache(maxsize=4)
def _partitioner(kind: str, num_partitions: int, alpha: float, classes_per_client: int,
                 seed: int, labels: tuple[int, ...]):
    from datasets import Dataset as HFDataset
    from flwr_datasets.partitioner import (DirichletPartitioner, IidPartitioner,
                                           PathologicalPartitioner)

    if kind == "iid":
        partitioner = IidPartitioner(num_partitions)
    elif kind == "dirichlet":
        partitioner = DirichletPartitioner(num_partitions, partition_by="label", alpha=alpha,
                                           min_partition_size=10, self_balancing=False,
                                           seed=seed)
    elif kind == "classes":
        partitioner = PathologicalPartitioner(num_partitions, partition_by="label",
                                              num_classes_per_partition=classes_per_client,
                                              class_assignment_mode="random", seed=seed)
    else:
        raise ConfigError(f"partitioner '{kind}' is not known; use iid, dirichlet or classes")
    partitioner.dataset = HFDataset.from_dict({"label": list(labels),
                                               "index": list(range(len(labels)))})
    return partitioner


def partition_indices(labels: torch.Tensor, fed: FederationConfig, partition_id: int,
                      num_partitions: int, seed: int = 0) -> torch.Tensor:
    """Row indices (sorted) of the training examples partition `partition_id` holds."""
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}; "
                          f"give each client a distinct partition-id below num-partitions")
    num_classes = int(labels.max()) + 1
    if fed.partitioner == "classes" and fed.classes_per_client > num_classes:
        raise ConfigError(f"federation.classes_per_client = {fed.classes_per_client} but the "
                          f"dataset has {num_classes} classes")
    if num_partitions > labels.shape[0]:
        raise ConfigError(f"{num_partitions} partitions of {labels.shape[0]} examples leave "
                          f"some clients empty; use fewer clients or more data")
    partitioner = _partitioner(fed.partitioner, num_partitions, fed.alpha,
                               fed.classes_per_client, seed, tuple(labels.tolist()))
    rows = partitioner.load_partition(partition_id)["index"]
    return torch.from_numpy(np.sort(np.asarray(rows, dtype=np.int64)))

