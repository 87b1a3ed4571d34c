"""The linear softmax head read on normalised hidden activities.

It is trained on detached activities with its own optimiser, so like an FF layer it is
a local learner: it never sends a gradient into the layers it reads.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedff.config import HeadConfig
from fedff.errors import ShapeError
from fedff.layers.contract import snapshot
from fedff.layers.optim import OptimConfig, lr_factor, make_sgd, set_hyper


class LinearHead:
    """Follows the layers' schedule (`optim.schedule` over `train.epochs`) at its own lr;
    without one, a constant lr."""

    def __init__(self, in_features: int, num_classes: int, config: HeadConfig,
                 schedule: OptimConfig | None = None, epochs: int = 1,
                 device: str | torch.device = "cpu"):
        self.config, self.schedule, self.epochs = config, schedule, epochs
        self.linear = nn.Linear(in_features, num_classes, bias=False).to(device)
        nn.init.zeros_(self.linear.weight)
        self.optimizer = make_sgd(self.linear.parameters(), torch.device(device), **self.hyper())
        self.epoch = 0

    def hyper(self) -> dict[str, float]:
        c = self.config
        return {"lr": c.lr, "momentum": c.momentum, "weight_decay": c.weight_decay}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        s = self.schedule
        factor = 1.0 if s is None else lr_factor(s, epoch, self.epochs)
        set_hyper(self.optimizer, self.hyper(), factor)

    @torch.no_grad()
    def train_step(self, features: torch.Tensor, labels: torch.Tensor
                   ) -> tuple[torch.Tensor, dict[str, float]]:
        """One step of softmax cross-entropy on (features, labels); returns the pre-update
        probabilities.

        The gradient is written out, (softmax - one_hot) / B, rather than left to
        autograd, whose graph costs more than this 10-output matmul does.
        tests/test_head.py checks it against autograd.
        """
        weight = self.linear.weight
        log_probs = (features @ weight.t()).log_softmax(dim=-1)
        probs = log_probs.exp()
        loss = -log_probs.gather(1, labels.view(-1, 1)).mean()
        d_logits = (probs - F.one_hot(labels, probs.shape[1])).div_(labels.shape[0])
        weight.grad = d_logits.t() @ features
        self.optimizer.step()
        correct = int((probs.argmax(dim=-1) == labels).sum())
        return probs, {"head_loss": float(loss), "head_accuracy": correct / labels.shape[0]}

    @torch.no_grad()
    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)

    def state_dict(self) -> dict[str, Any]:
        return {"linear": snapshot(self.linear.state_dict()),
                "optimizer": snapshot(self.optimizer.state_dict()), "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Learned state from `state`, hyperparameters from the config (as layers do)."""
        saved = state["linear"]["weight"].shape
        if saved != self.linear.weight.shape:
            raise ShapeError(f"head state is {tuple(saved)}, this head is "
                             f"{tuple(self.linear.weight.shape)}; the head reads other "
                             f"layers (head.layers) or classes than the checkpoint's")
        self.linear.load_state_dict(state["linear"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.set_epoch(int(state.get("epoch", self.epoch)))

    @staticmethod
    def federated_arrays(state: dict[str, Any]) -> dict[str, torch.Tensor]:
        """What a federation averages: the weights (optimiser state stays local)."""
        return dict(state["linear"])

    @staticmethod
    def with_federated_arrays(state: dict[str, Any], arrays: dict[str, torch.Tensor]
                              ) -> dict[str, Any]:
        module = dict(state["linear"])
        for key, value in arrays.items():
            if key not in module or module[key].shape != value.shape:
                have = tuple(module[key].shape) if key in module else "nothing"
                raise ShapeError(f"head array '{key}' has shape {tuple(value.shape)}, the "
                                 f"head has {have}; client and coordinator must use the "
                                 f"same model config")
            module[key] = value
        return {**state, "linear": module}
