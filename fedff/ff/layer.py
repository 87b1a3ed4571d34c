"""The Forward-Forward layer (Hinton 2022), one kind of the layer contract.

`y = relu(W x_hat + b)` on the RMS-normalised input, goodness `G = sum y^2`, the local
loss of fedff/ff/objectives.py, peer normalisation, its own SGD with the reference
schedule. Collaborative FF (Lorberbom et al.) is the same layer with a signal: for layer
k, the other layers' scores on the *same* batch. The earlier-layers variant receives
them with the activations (`batch.gamma`); the all-layers variant also needs the later
layers' scores, which arrive after they ran: `begin(batch)` runs the forward pass and
keeps what the update needs, `finish(pending, gamma)` applies the loss once gamma is
known (from the next layers, or from a feedback stream).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedff.errors import ConfigError, ShapeError
from fedff.ff.objectives import GoodnessObjective, peer_norm_grad, rms_normalize
from fedff.layers.contract import LayerBatch, LayerConfig, LayerResult, Pending, SGDLayer


@dataclass
class FFPending(Pending):
    """What the update needs: the normalised input and the activity."""

    x_hat: torch.Tensor | None = None
    y: torch.Tensor | None = None


class FFLayer(SGDLayer):
    """A fully connected ReLU layer trained with the FF goodness objective."""

    needs_negatives = True
    algorithms = ("supervised", "unsupervised")
    collaborative = True

    def __init__(self, config: LayerConfig, device: str | torch.device = "cpu"):
        super().__init__(config, device)
        self.objective = GoodnessObjective(
            theta=config.threshold_scale * config.out_features,
            temperature=config.temperature,
            positive_high=config.objective != "low",
            pairwise=config.objective == "symba",
        )
        self.peer_mean = torch.zeros(config.out_features, device=self.device)
        self.optimizer = self.optimizers["main"]

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        if cfg.model.objective not in ("hinton", "low", "symba"):
            raise ConfigError(f"model.objective = {cfg.model.objective!r} is a one-class "
                              f"loss; FF layers take 'hinton', 'low' or 'symba' (or set "
                              f"model.cell = "
                              f"'oneclass' with train.algorithm = 'oneclass')")

    def build_module(self) -> nn.Module:
        cfg = self.config
        generator = torch.Generator().manual_seed(cfg.seed)
        linear = nn.Linear(cfg.in_features, cfg.out_features)
        with torch.no_grad():
            linear.weight.normal_(0.0, 1.0 / math.sqrt(cfg.in_features), generator=generator)
            linear.bias.zero_()
        return linear

    def buffers(self) -> dict[str, torch.Tensor]:
        return {"peer_mean": self.peer_mean}

    # -- inference -------------------------------------------------------------------
    def _activity(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(normalised input, y = relu(W x_hat + b), goodness G = sum y^2), no graph."""
        x = x.to(self.device)  # the callers run without autograd: nothing to detach
        x_hat = rms_normalize(x) if self.config.normalize_input else x
        y = torch.addmm(self.module.bias, x_hat, self.module.weight.t()).clamp_min_(0)
        return x_hat, y, torch.linalg.vector_norm(y, dim=1).square_()

    def _normalized_output(self, y: torch.Tensor, goodness: torch.Tensor) -> torch.Tensor:
        """y / rms(y), with rms taken from the goodness already computed."""
        rms = (goodness / y.shape[1]).sqrt_().add_(1e-8)
        return y / rms.unsqueeze(1)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """No score: the neutral pass only the head reads skips it."""
        self.check_input(x)
        _, y, g = self._activity(x)
        return self._normalized_output(y, g)

    @torch.no_grad()
    def forward_with_score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_input(x)
        _, y, g = self._activity(x)
        return self._normalized_output(y, g), self.objective.score(g)

    # -- training --------------------------------------------------------------------
    @torch.no_grad()
    def begin(self, batch: LayerBatch) -> FFPending:
        self.check_batch(batch)
        x_hat, y, g = self._activity(batch.x)
        return FFPending(n_pos=batch.n_pos, x_hat=x_hat, y=y, score=self.objective.score(g),
                         out=self._normalized_output(y, g))

    @torch.no_grad()
    def finish(self, pending: Pending, feedback: torch.Tensor | None = None) -> LayerResult:
        """Applies the update, written out rather than left to autograd; `feedback` is
        Collaborative FF's gamma.

        With G = sum_j y_j^2 and y = relu(z): dL/dz = dL/dG * 2y (zero where z <= 0, since
        y is), plus the peer-normalisation push on positive rows; then dW = dZ^T x_hat and
        db = sum dZ. tests/test_layer.py checks this against autograd.
        """
        assert isinstance(pending, FFPending) and pending.score is not None
        n_pos, y, score, gamma = pending.n_pos, pending.y, pending.score, feedback
        assert y is not None and pending.out is not None
        if gamma is not None:
            if gamma.shape != score.shape:
                raise ShapeError(f"gamma must hold one score per sample, shape "
                                 f"[{score.shape[0]}], got {list(gamma.shape)}")
            gamma = gamma.to(self.device)
        loss, d_goodness, correct = self.objective.loss_and_grad(score, n_pos, gamma)
        metrics = {"loss": float(loss), "ff_accuracy": int(correct) / score.shape[0]}
        if self.config.frozen:
            return LayerResult(out=pending.out, score=score, metrics=metrics)
        d_z = y * d_goodness.mul_(2).unsqueeze(1)
        if self.config.peer_norm > 0:
            self.peer_mean.lerp_(y[:n_pos].mean(dim=0), 1 - self.config.peer_momentum)
            d_z[:n_pos] += peer_norm_grad(self.peer_mean, self.config.peer_norm, n_pos)
        self.module.weight.grad = d_z.t() @ pending.x_hat
        self.module.bias.grad = d_z.sum(dim=0)
        self.optimizer.step()
        self.steps += 1
        return LayerResult(out=pending.out, score=score, metrics=metrics)
