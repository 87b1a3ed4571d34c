"""The one-class config section, `[oneclass]` (`train.algorithm = "oneclass"`,
`model.cell = "oneclass"`, the loss in `model.objective`; fedff/oneclass)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class OneclassConfig:
    # The standard protocol (Ruff et al. 2018): train on the training images of class
    # `normal` only, test on the whole test set, every other class an anomaly.
    normal: int = 0
    contamination: float = 0.0  # share of anomalies mixed into the training rows
    nu: float = 0.05  # the radius' quantile is 1 - nu; sb/ls-svdd's outlier weight 1/nu
    c: float = 1.0  # the goodness losses' offset
    normalize: str = "rms"  # each layer's input: rms (fedff's FF) | l2 (the reference) | none
    score: str = "last"  # the anomaly score: the last layer's loss | sum over the layers
