"""One-class Forward-Forward (Hopwood 2023), one kind of the layer contract: a layer that
learns from normal data only, and whose loss is an anomaly score.

Each layer normalises its input (`oneclass.normalize`: RMS, fedff's default, or L2 as in
the reference code), computes h = relu(W x_hat + b) and steps its own SGD on one of the
losses of fedff/oneclass/objectives.py; it passes h on, and the next layer normalises it
again, so no gradient crosses a layer.

Centre a and radius r are the layer's running statistics (its `buffers`: saved, restored
and averaged by a federation like the weights). In the first epoch (epoch 0) both come
from each batch itself, as in the reference code; after every epoch (`end_epoch`) the
centre becomes the mean of the epoch's activities and the radius the (1 - nu) quantile
of their distances to the centre they trained against. The statistics come from the
training rows a layer has seen, never from a separate pass: a layer worker, a federation
client and one process compute them from the same rows, at no extra cost. (The reference
code recomputes them with a pass over training data that includes the anomalies.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedff.errors import ConfigError
from fedff.layers.contract import LayerBatch, LayerConfig, LayerResult, Pending, SGDLayer
from fedff.oneclass import objectives


@dataclass
class OneClassPending(Pending):
    x_hat: torch.Tensor | None = None  # the normalised input the update needs


class OneClassLayer(SGDLayer):
    algorithms = ("oneclass",)
    classifier_head = False  # no classes: the losses are the output

    def __init__(self, config: LayerConfig, device: str | torch.device = "cpu"):
        super().__init__(config, device)
        width = config.out_features
        self.centre = torch.zeros(width, device=self.device)
        self.radius = torch.zeros(1, device=self.device)
        self._sum = torch.zeros(width, dtype=torch.float64, device=self.device)
        self._count = 0
        self._distances: list[torch.Tensor] = []

    def build_module(self) -> nn.Module:
        """torch's Linear init (the reference code's), seeded by `config.seed` alone."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            return nn.Linear(self.config.in_features, self.config.out_features)

    def buffers(self) -> dict[str, torch.Tensor]:
        return {"centre": self.centre, "radius": self.radius}

    def extra_state(self) -> dict[str, Any]:
        """The epoch's statistics so far: a worker that restarts mid-epoch keeps them."""
        distances = torch.cat(self._distances) if self._distances else torch.zeros(0)
        return {"sum": self._sum, "count": self._count, "distances": distances}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self._sum = state["sum"].to(self.device, torch.float64)
        self._count = int(state["count"])
        self._distances = [state["distances"].to(self.device)] if state["count"] else []

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        t, m = cfg.train, cfg.model
        if t.negatives != "none":
            raise ConfigError(f"one-class layers learn from normal data alone; set "
                              f"train.negatives = 'none' (got {t.negatives!r})")
        if m.objective not in objectives.OBJECTIVES:
            raise ConfigError(f"model.objective = {m.objective!r} is not a one-class loss; "
                              f"choose one of: {', '.join(objectives.OBJECTIVES)}")
        if m.collaboration != "none":
            raise ConfigError("one-class layers exchange no scores; set "
                              "model.collaboration = 'none'")

    # -- the layer's activity and loss ---------------------------------------------------
    def activity(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised input, h = relu(W x_hat + b))."""
        x = normalize(x.to(self.device), self.config.options["normalize"])
        h = torch.addmm(self.module.bias, x, self.module.weight.t()).clamp_min_(0)
        return x, h

    def loss_and_grad(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        o = self.config.options
        return objectives.loss_and_grad(self.config.objective, h, self.centre,
                                        float(self.radius), o["c"], o["nu"])

    def anomaly_score(self, h: torch.Tensor, loss: torch.Tensor | None = None) -> torch.Tensor:
        """The loss (`loss`, when already computed), or for the goodness losses g - c:
        sigmoid and softplus of it rank the same but saturate in float32 for g of a few
        hundred."""
        if self.config.objective in objectives.CENTRED:
            return self.loss_and_grad(h)[0] if loss is None else loss
        return h.square().sum(dim=1) - self.config.options["c"]

    @torch.no_grad()
    def forward_with_score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_input(x)
        _, h = self.activity(x)
        return h, self.anomaly_score(h)

    # -- training ------------------------------------------------------------------------
    @torch.no_grad()
    def begin(self, batch: LayerBatch) -> Pending:
        self.check_batch(batch)
        x_hat, h = self.activity(batch.x)
        if self.epoch == 0:
            self.batch_statistics(h)
        return OneClassPending(n_pos=batch.n_pos, out=h, x_hat=x_hat)

    @torch.no_grad()
    def finish(self, pending: Pending, feedback: torch.Tensor | None = None) -> LayerResult:
        """The update, written out: dL/dz = dL/dh where z > 0 (h is 0 elsewhere), then
        dW = dZ^T x_hat / B and db = mean dZ."""
        assert isinstance(pending, OneClassPending) and pending.out is not None
        h = pending.out
        loss, d_h = self.loss_and_grad(h)
        self.accumulate(h)
        metrics = {"loss": float(loss.mean()), "radius": float(self.radius)}
        if not self.config.frozen:
            d_z = d_h.mul_((h > 0).to(h.dtype)).div_(h.shape[0])
            self.module.weight.grad = d_z.t() @ pending.x_hat
            self.module.bias.grad = d_z.sum(dim=0)
            self.optimizers["main"].step()
            self.steps += 1
        return LayerResult(out=h, score=self.anomaly_score(h, loss), metrics=metrics)

    @torch.no_grad()
    def batch_statistics(self, h: torch.Tensor) -> None:
        """The first epoch's centre and radius: each batch's own."""
        self.centre.copy_(h.mean(dim=0))
        self.radius.fill_(objectives.radius_of(self._distance(h), self.config.options["nu"]))

    def _distance(self, h: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(h - self.centre, dim=1)

    def accumulate(self, h: torch.Tensor) -> None:
        """Adds a batch's activity to the epoch's statistics (see `end_epoch`)."""
        self._sum += h.sum(dim=0, dtype=torch.float64)
        self._count += h.shape[0]
        self._distances.append(self._distance(h))

    @torch.no_grad()
    def end_epoch(self) -> None:
        """Centre = the epoch's mean activity; radius = the (1 - nu) quantile of the
        epoch's distances to the centre they were trained against."""
        if self._count == 0:
            return
        self.centre.copy_((self._sum / self._count).to(self.centre.dtype))
        distances = torch.cat(self._distances)
        self.radius.fill_(objectives.radius_of(distances, self.config.options["nu"]))
        self._sum.zero_()
        self._count = 0
        self._distances = []


def normalize(x: torch.Tensor, how: str) -> torch.Tensor:
    """Each row over its RMS (FF's rule) or its L2 norm (the reference code's), or as it
    is; no in-place step, so backprop baselines can differentiate through it."""
    if how == "none":
        return x
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    if how == "rms":
        return x / (norm * x.shape[1] ** -0.5 + 1e-8)
    return x / (norm + 1e-9)
