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
from fedff.ff.layer import make_sgd, snapshot


class LinearHead:
    def __init__(self, in_features: int, num_classes: int, config: HeadConfig,
                 device: str | torch.device = "cpu"):
        self.config = config
        self.linear = nn.Linear(in_features, num_classes, bias=False).to(device)
        nn.init.zeros_(self.linear.weight)
        self.optimizer = make_sgd(self.linear.parameters(), torch.device(device), lr=config.lr,
                                  momentum=config.momentum, weight_decay=config.weight_decay)

    def set_lr_factor(self, factor: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr * factor

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
                "optimizer": snapshot(self.optimizer.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.linear.load_state_dict(state["linear"])
        self.optimizer.load_state_dict(state["optimizer"])
