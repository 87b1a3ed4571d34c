"""A Forward-Forward layer as a self-contained unit.

A layer owns everything it needs to learn: its module, its local objective, its own
optimiser and schedule, and its running statistics. It never touches another layer,
so the same object runs inside the in-process network, inside a remote layer worker
(which only sees the tensors that arrive on the wire), and is averaged by a federation
coordinator through `state_dict()` / `load_state_dict()`.

The contract (`Layer`):
- `train_step(batch)` trains on one batch and returns a `LayerResult`: what the next
  layer receives (detached, RMS-normalised), this layer's per-sample score (the
  collaborative signal other layers may need) and scalar metrics.
- `forward(x)` is inference: the next layer's input, no update.
- `state_dict()` round-trips exactly: weights, optimiser, running stats, counters, config.

Collaborative FF needs, for layer k, the other layers' scores on the *same* batch. The
earlier-layers variant receives them with the activations (`batch.gamma`); the
all-layers variant also needs the later layers' scores, which can only arrive after
they ran. So training is split in two steps that may be separated in time and space:
`begin(batch)` runs the forward pass and keeps the graph; `finish(pending, gamma)`
applies the loss once gamma is known (from the next layers, or from a feedback stream).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from fedff.config import OptimConfig
from fedff.ff.objectives import GoodnessObjective, peer_norm_grad, rms_normalize

STATE_FORMAT = 1


class ShapeError(ValueError):
    """A tensor that does not fit the layer; the message names the expected shape."""


@dataclass
class LayerConfig:
    """Everything needed to rebuild a layer from scratch, on any machine."""

    in_features: int
    out_features: int
    kind: str = "dense"
    objective: str = "hinton"
    threshold_scale: float = 1.0
    temperature: float = 1.0
    peer_norm: float = 0.03
    peer_momentum: float = 0.9
    normalize_input: bool = True  # False when the input is already RMS-normalised
    epochs: int = 100  # the length of the learning-rate schedule
    seed: int = 0
    frozen: bool = False  # forward only: no update, running statistics kept
    in_shape: list[int] = field(default_factory=list)  # (C, H, W) for convolutional cells
    noise: float = 0.0  # denoising cells: share of inputs zeroed
    optim: OptimConfig = field(default_factory=OptimConfig)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayerConfig":
        d = dict(d)
        d["optim"] = OptimConfig(**d.get("optim", {}))
        return cls(**d)


@dataclass
class LayerBatch:
    """One training batch for a layer: positives first, then negatives, in one tensor.

    Keeping both halves in one tensor runs one matmul of 2B rows instead of two of B,
    which is what makes a CPU layer fast.
    """

    x: torch.Tensor
    n_pos: int
    gamma: torch.Tensor | None = None  # per-sample score of other layers (Collaborative FF)


@dataclass
class LayerResult:
    out: torch.Tensor  # detached, normalised: the next layer's input
    score: torch.Tensor  # detached per-sample score s = sign * (G - theta) / T
    metrics: dict[str, float]


@dataclass
class Pending:
    """A forward pass whose update waits for gamma (see the module docstring).

    It keeps exactly what the update needs: the normalised input and the activity.
    """

    n_pos: int
    x_hat: torch.Tensor
    y: torch.Tensor
    score: torch.Tensor
    out: torch.Tensor


class Layer(Protocol):
    config: LayerConfig

    def train_step(self, batch: LayerBatch) -> LayerResult: ...
    def forward(self, x: torch.Tensor) -> torch.Tensor: ...
    def check_input(self, x: torch.Tensor, what: str = "input") -> None: ...
    def score(self, x: torch.Tensor) -> torch.Tensor: ...
    def set_epoch(self, epoch: int) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def snapshot(obj: Any) -> Any:
    """A deep CPU copy of a state tree, so later training never mutates a saved state.

    torch's `load_state_dict` keeps same-device tensors by reference, so without the copy
    a restored optimiser would share momentum buffers with the one it was saved from.
    """
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return obj


def saved_config(state: dict[str, Any], current: LayerConfig, what: str = "layer"
                 ) -> LayerConfig:
    """The config a layer state was saved with, once its format and shape fit `current`."""
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"{what} state format {state.get('format')!r} is not supported "
                         f"(this fedff reads format {STATE_FORMAT})")
    saved = LayerConfig.from_dict(state["config"])
    if (saved.in_features, saved.out_features) != (current.in_features, current.out_features):
        raise ShapeError(f"state is for a {saved.in_features}->{saved.out_features} {what}, "
                         f"this {what} is {current.in_features}->{current.out_features}")
    return saved


def make_sgd(params: Any, device: torch.device, **hyper: float) -> torch.optim.SGD:
    """SGD, fused where torch has a fused kernel: one pass over weights, gradients and
    momentum instead of five; on the CPU that is a third of a 3 x 1000 step."""
    return torch.optim.SGD(params, fused=device.type in ("cpu", "cuda"), **hyper)


def lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    """Reference schedule: constant for the first half, then linearly down to ~0."""
    if schedule == "constant":
        return 1.0
    return min(1.0, 2.0 * (epochs - epoch) / epochs)


def _make_module(cfg: LayerConfig, generator: torch.Generator) -> nn.Module:
    if cfg.kind != "dense":
        raise ValueError(f"layer kind '{cfg.kind}' is not available; use 'dense'")
    linear = nn.Linear(cfg.in_features, cfg.out_features)
    with torch.no_grad():
        linear.weight.normal_(0.0, 1.0 / math.sqrt(cfg.in_features), generator=generator)
        linear.bias.zero_()
    return linear


class FFLayer:
    """A fully connected ReLU layer trained with the FF goodness objective."""

    def __init__(self, config: LayerConfig, device: str | torch.device = "cpu"):
        self.config = config
        self.device = torch.device(device)
        gen = torch.Generator().manual_seed(config.seed)
        self.module = _make_module(config, gen).to(self.device)
        self.objective = GoodnessObjective(
            theta=config.threshold_scale * config.out_features,
            temperature=config.temperature,
            positive_high=config.objective == "hinton",
        )
        o = config.optim
        self.optimizer = make_sgd(self.module.parameters(), self.device, lr=o.lr,
                                  momentum=o.momentum, dampening=o.dampening,
                                  weight_decay=o.weight_decay)
        self.peer_mean = torch.zeros(config.out_features, device=self.device)
        self.epoch = 0
        self.steps = 0

    # -- inference -------------------------------------------------------------------
    def check_input(self, x: torch.Tensor, what: str = "input") -> None:
        expected = self.config.in_features
        if x.dim() != 2 or x.shape[1] != expected:
            raise ShapeError(f"layer expects {what} of shape [batch, {expected}], got "
                             f"{list(x.shape)}; the previous layer (or the dataset) must "
                             f"produce {expected} features")
        if not x.is_floating_point():
            raise ShapeError(f"layer expects a floating-point {what}, got {x.dtype}; "
                             f"convert with x.float()")
        if x.shape[0] == 0:
            raise ShapeError(f"layer got an empty {what} batch")

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
        self.check_input(x)
        _, y, g = self._activity(x)
        return self._normalized_output(y, g)

    @torch.no_grad()
    def forward_with_score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_input(x)
        _, y, g = self._activity(x)
        return self._normalized_output(y, g), self.objective.score(g)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_score(x)[1]

    # -- training --------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        factor = lr_factor(self.config.optim.schedule, epoch, self.config.epochs)
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.optim.lr * factor

    @torch.no_grad()
    def begin(self, batch: LayerBatch) -> Pending:
        self.check_input(batch.x)
        if not 0 < batch.n_pos <= batch.x.shape[0]:
            raise ShapeError(f"n_pos must be in 1..{batch.x.shape[0]} (the batch size), "
                             f"got {batch.n_pos}")
        x_hat, y, g = self._activity(batch.x)
        return Pending(n_pos=batch.n_pos, x_hat=x_hat, y=y, score=self.objective.score(g),
                       out=self._normalized_output(y, g))

    @torch.no_grad()
    def finish(self, pending: Pending, gamma: torch.Tensor | None = None) -> LayerResult:
        """Applies the update, written out rather than left to autograd.

        With G = sum_j y_j^2 and y = relu(z): dL/dz = dL/dG * 2y (zero where z <= 0, since
        y is), plus the peer-normalisation push on positive rows; then dW = dZ^T x_hat and
        db = sum dZ. tests/test_layer.py checks this against autograd.
        """
        n_pos, y, score = pending.n_pos, pending.y, pending.score
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

    def train_step(self, batch: LayerBatch) -> LayerResult:
        return self.finish(self.begin(batch), batch.gamma)

    # -- state -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "type": type(self).__name__,
            "config": dataclasses.asdict(self.config),
            "module": snapshot(self.module.state_dict()),
            "optimizer": snapshot(self.optimizer.state_dict()),
            "peer_mean": snapshot(self.peer_mean),
            "epoch": self.epoch,
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.config = saved_config(state, self.config)
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.peer_mean.copy_(state["peer_mean"])
        self.steps = int(state["steps"])
        self.set_epoch(int(state["epoch"]))

    @classmethod
    def from_state(cls, state: dict[str, Any], device: str | torch.device = "cpu") -> "FFLayer":
        layer = cls(LayerConfig.from_dict(state["config"]), device=device)
        layer.load_state_dict(state)
        return layer

    def weights(self) -> dict[str, torch.Tensor]:
        """The parameters a federation averages (optimiser state stays local)."""
        return {k: v.detach() for k, v in self.module.state_dict().items()}

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(weights)
