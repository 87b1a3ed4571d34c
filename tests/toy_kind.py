"""A layer kind that lives only here: a tied-weight ReLU autoencoder with a running mean.

Importing this module registers it as `model.cell = "toy"`; tests/test_layer_kinds.py
runs it in one process, in a chain of worker processes and in a simulated federation,
whose processes import it through $FEDFF_PLUGINS (and PYTHONPATH) alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedff.layers import registry
from fedff.layers.contract import Layer, LayerBatch, LayerResult, Pending


class ToyLayer(Layer):
    """y = relu(W x + b); loss = mean ||W^T y - x||^2 on the positive rows; SGD."""

    def __init__(self, config, device="cpu"):
        super().__init__(config, device)
        self.running_mean = torch.zeros(config.out_features, device=self.device)

    def build_module(self) -> nn.Module:
        generator = torch.Generator().manual_seed(self.config.seed)
        linear = nn.Linear(self.config.in_features, self.config.out_features)
        with torch.no_grad():
            linear.weight.normal_(0.0, 0.1, generator=generator)
            linear.bias.zero_()
        return linear

    def hyper(self, name: str) -> dict[str, Any]:
        return {"lr": self.config.optim.lr, "momentum": self.config.optim.momentum}

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"main": torch.optim.SGD(self.module.parameters(), **self.hyper("main"))}

    def buffers(self) -> dict[str, torch.Tensor]:
        return {"running_mean": self.running_mean}

    @torch.no_grad()
    def forward_with_score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_input(x)
        y = self.module(x.to(self.device)).clamp_min(0)
        return y, torch.zeros(x.shape[0], device=self.device)

    def begin(self, batch: LayerBatch) -> Pending:
        self.check_batch(batch)
        return Pending(n_pos=batch.n_pos, out=batch.x.to(self.device))

    def finish(self, pending: Pending, feedback: torch.Tensor | None = None) -> LayerResult:
        x = pending.out
        assert x is not None
        metrics: dict[str, float] = {}
        if not self.config.frozen:
            real = x[:pending.n_pos]
            with torch.enable_grad():
                y = self.module(real).clamp_min(0)
                loss = (y @ self.module.weight - real).square().sum(dim=1).mean()
                self.optimizers["main"].zero_grad(set_to_none=True)
                loss.backward()
            self.optimizers["main"].step()
            self.running_mean.lerp_(y.detach().mean(dim=0), 0.1)
            self.steps += 1
            metrics["loss"] = float(loss.detach())
        out, score = self.forward_with_score(x)
        return LayerResult(out=out, score=score, metrics=metrics)


registry.register("toy", ToyLayer)
