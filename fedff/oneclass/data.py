"""The one-vs-rest protocol of the deep one-class literature (Ruff et al. 2018): the
training rows are the training images of the normal class alone (plus, to study a
contaminated site, a share of anomalies nobody labelled), the test set is whole, and
every class but the normal one is an anomaly. Labels stay the dataset's own, so the
federation's partitioners can still split by class."""

from __future__ import annotations

import dataclasses

import torch

from fedff.data.datasets import Dataset
from fedff.errors import ConfigError
from fedff.oneclass.options import OneclassConfig


def one_vs_rest(ds: Dataset, o: OneclassConfig, seed: int) -> Dataset:
    """`ds` with training rows of class `o.normal` only, plus `o.contamination` of
    anomalies (as a share of the training rows) drawn with `seed`."""
    if not 0 <= o.normal < ds.num_classes:
        raise ConfigError(f"oneclass.normal = {o.normal} is not a class of {ds.name} "
                          f"(0..{ds.num_classes - 1})")
    normal = ds.train_y == o.normal
    keep = normal.nonzero().squeeze(1)
    if o.contamination > 0:
        others = (~normal).nonzero().squeeze(1)
        n = round(o.contamination * len(keep) / (1 - o.contamination))
        pick = torch.randperm(len(others), generator=torch.Generator().manual_seed(seed))[:n]
        keep = torch.cat([keep, others[pick]]).sort().values
    return dataclasses.replace(ds, train_x=ds.train_x[keep], train_y=ds.train_y[keep])


def is_anomaly(labels: torch.Tensor, o: OneclassConfig) -> torch.Tensor:
    return labels != o.normal
