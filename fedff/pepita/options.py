"""PEPITA's config section, `[pepita]` (fedff/pepita/layer.py reads it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PepitaConfig:
    """PEPITA (`train.algorithm = "pepita"`, `model.cell = "pepita"`; fedff/pepita). The
    last entry of model.hidden is the output layer (as wide as the classes)."""

    feedback: str = "fixed"  # fixed: one random F | mirror: factorised F, weight mirroring
    f_scale: float = 0.05  # F = f_scale * U(-sqrt(6/d_in), sqrt(6/d_in)); mirror: its std
    modulation: str = "minus"  # x_err = x - F e (ICLR; needed by mirroring) | plus (ICML)
    last_error: str = "pass1"  # the output layer steps on the pass-1 error (ICLR) | pass2
    dropout: float = 0.1  # hidden layers, the same mask in both passes
    normalize: str = "none"  # none (the papers) | length: each hidden output rescaled per
    # example to its input's length, in both passes (keeps deeper nets from blowing up)
    wm_lr: float = 0.01
    wm_wd: float = 0.0001
    wm_epochs: int = 2  # mirror on every batch of the first wm_epochs epochs ...
    wm_every: int = 100  # ... and of every wm_every-th epoch after them (0: never)
