"""Each layer's optimiser and learning-rate schedule, from the run's `optim` section.

Shared by every layer kind (through the contract's `SGDLayer`) and the softmax head, so
one config key means the same optimiser wherever a layer runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class OptimConfig:
    """Each layer's own optimiser: SGD with momentum and weight decay, or Adam.

    torch's convention: `lr` multiplies the momentum buffer, so with dampening 0 the
    steady-state step is lr / (1 - momentum) times the gradient. dampening = 1 - momentum
    gives the reference code's smoothed gradient at the same lr. The defaults were chosen
    on MNIST 3 x 1000 (2-epoch sweep of lr in 2.5e-4..1e-2, see the engine's notes).
    """

    optimizer: str = "sgd"  # sgd | adam (beta1 = momentum); UFF cells always use AdamW
    lr: float = 0.0005
    momentum: float = 0.9
    beta2: float = 0.999  # adam only
    dampening: float = 0.0
    weight_decay: float = 0.0003
    schedule: str = "half-constant-linear"  # | constant | step (x decay at milestones)
    milestones: list[int] = field(default_factory=lambda: [60, 90])  # step: epochs
    decay: float = 0.1  # step: the lr factor at each milestone
    warmup: int = 0  # epochs over which lr rises linearly to the schedule's, before it


def make_sgd(params: Any, device: torch.device, **hyper: float) -> torch.optim.SGD:
    """SGD, fused where torch has a fused kernel: one pass over weights, gradients and
    momentum instead of five; on the CPU that is a third of a 3 x 1000 step."""
    return torch.optim.SGD(params, fused=device.type in ("cpu", "cuda"), **hyper)


def optimizer_hyper(o: OptimConfig) -> dict[str, Any]:
    """The param-group hyperparameters of `o.optimizer` (lr before the schedule)."""
    if o.optimizer == "adam":
        return {"lr": o.lr, "betas": (o.momentum, o.beta2), "weight_decay": o.weight_decay}
    return {"lr": o.lr, "momentum": o.momentum, "dampening": o.dampening,
            "weight_decay": o.weight_decay}


def make_optimizer(params: Any, device: torch.device, o: OptimConfig) -> torch.optim.Optimizer:
    """`o.optimizer` over `params`, fused where torch has the kernel."""
    if o.optimizer == "adam":
        return torch.optim.Adam(params, fused=device.type in ("cpu", "cuda"),
                                **optimizer_hyper(o))
    return make_sgd(params, device, **optimizer_hyper(o))


def lr_factor(o: OptimConfig, epoch: int, epochs: int) -> float:
    """FF's reference schedule: constant for the first half, then linearly down to ~0;
    or constant; or `step`: times `decay` at each milestone epoch passed (PEPITA's).
    `warmup` W scales the first W epochs by 1 / (W + 1) .. W / (W + 1): a larger lr
    than a cold network survives, reached once its activities have settled."""
    warm = min(1.0, (epoch + 1) / (o.warmup + 1))
    if o.schedule == "constant":
        return warm
    if o.schedule == "step":
        return warm * o.decay ** sum(epoch >= m for m in o.milestones)
    return warm * min(1.0, 2.0 * (epochs - epoch) / epochs)


def set_hyper(optimizer: torch.optim.Optimizer, hyper: dict[str, Any], factor: float) -> None:
    """The config's hyperparameters into every param group, lr scaled by the schedule."""
    for group in optimizer.param_groups:
        group.update(hyper)
        group["lr"] = hyper["lr"] * factor
