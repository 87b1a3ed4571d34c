"""Unsupervised Forward-Forward (UFF) cells: layers that learn with an ordinary loss.

A cell is a layer in the engine's sense (fedff/layers/contract.py's `Layer`): it owns
its module, loss, optimiser (AdamW, as in the UFF paper) and schedule, trains on one
batch, and passes its detached latent code on, so it runs unchanged in one process, in a
layer worker and in a federation client. What the next cell receives is the latent:

- `ae`: encoder Linear -> LayerNorm -> ReLU; a linear decoder; loss: MSE(x_hat, x).
- `dae`: the same, the encoder reads x with masking noise (`model.cell_noise` of the
  inputs zeroed); the loss compares with the clean x.
- `conv-ae`: Conv 3x3 stride 2 -> GroupNorm(1) (layer norm over C, H, W) -> ReLU; a
  transposed-conv decoder; the latent is the flattened feature map. `model.hidden` then
  counts channels. `conv-dae`: the same with the dae's masking noise.
- `gan`: a discriminator Linear -> LayerNorm -> LeakyReLU(0.2) (the latent) -> Linear
  (real/fake logit), trained against its own small generator of the cell's input.

A batch may carry FF's [positives; negatives] rows (when an FF-goodness cell sits in the
same stack): cells learn from the first `n_pos` rows only and encode every row, so the
cells above see both. A cell exchanges no score (it is 0) and takes no feedback.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedff.errors import ConfigError, ShapeError
from fedff.layers.contract import Layer, LayerBatch, LayerConfig, LayerResult, Pending

GAN_NOISE = 64


def image_shape(features: int, channels: int = 1) -> tuple[int, int, int]:
    """(C, H, W) of a square image flattened into `features` values."""
    side = math.isqrt(features // channels)
    if channels * side * side != features:
        raise ShapeError(f"a conv-ae cell needs a square image input, but {features} "
                         f"features are not {channels} x s x s; put conv-ae cells first, "
                         f"or after other conv-ae cells")
    return channels, side, side


def conv_out_shape(in_shape: tuple[int, int, int], channels: int) -> tuple[int, int, int]:
    _, h, w = in_shape
    return channels, (h + 1) // 2, (w + 1) // 2


class _Autoencoder(nn.Module):
    def __init__(self, cfg: LayerConfig):
        super().__init__()
        self.encoder = nn.Linear(cfg.in_features, cfg.out_features)
        self.norm = nn.LayerNorm(cfg.out_features)
        self.decoder = nn.Linear(cfg.out_features, cfg.in_features)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.encoder(x)))

    def loss(self, x_in: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encode(x_in)
        per_sample = (self.decoder(z) - target).square().mean(dim=1)
        return per_sample.mean(), per_sample


class _ConvAutoencoder(nn.Module):
    def __init__(self, cfg: LayerConfig):
        super().__init__()
        self.in_shape = tuple(cfg.in_shape)
        c, h, w = self.in_shape
        out_c = cfg.out_features // (((h + 1) // 2) * ((w + 1) // 2))
        self.encoder = nn.Conv2d(c, out_c, 3, stride=2, padding=1)
        self.norm = nn.GroupNorm(1, out_c)
        self.decoder = nn.ConvTranspose2d(out_c, c, 3, stride=2, padding=1,
                                          output_padding=(1 - h % 2, 1 - w % 2))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        z = F.relu(self.norm(self.encoder(x.view(-1, *self.in_shape))))
        return z.flatten(1)

    def loss(self, x_in: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = F.relu(self.norm(self.encoder(x_in.view(-1, *self.in_shape))))
        per_sample = (self.decoder(z).flatten(1) - target).square().mean(dim=1)
        return per_sample.mean(), per_sample


class _GAN(nn.Module):
    def __init__(self, cfg: LayerConfig):
        super().__init__()
        self.features = nn.Linear(cfg.in_features, cfg.out_features)
        self.norm = nn.LayerNorm(cfg.out_features)
        self.logit = nn.Linear(cfg.out_features, 1)
        hidden = max(128, min(1024, cfg.in_features))
        self.generator = nn.Sequential(nn.Linear(GAN_NOISE, hidden), nn.ReLU(),
                                       nn.Linear(hidden, cfg.in_features))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.norm(self.features(x)), 0.2)

    def discriminate(self, x: torch.Tensor) -> torch.Tensor:
        return self.logit(self.encode(x)).squeeze(1)


class Cell(Layer):
    """What every cell adds to the contract: seeded init under a forked RNG, AdamW, a
    noise generator that travels with the state, and a step that learns on the real
    rows, then encodes every row."""

    def __init__(self, config: LayerConfig, device: str | torch.device = "cpu"):
        super().__init__(config, device)
        self.generator = torch.Generator().manual_seed(config.seed + 7919)

    def build_module(self) -> nn.Module:
        with torch.random.fork_rng(devices=[]):  # seeded init, global RNG untouched
            torch.manual_seed(self.config.seed)
            return self._build()

    def _build(self) -> nn.Module:
        raise NotImplementedError

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        if cfg.optim.optimizer != "sgd":
            raise ConfigError(f"optim.optimizer = {cfg.optim.optimizer!r} does not apply to "
                              f"UFF cells, which train with AdamW (the UFF paper's); leave "
                              f"it at 'sgd' (it selects the optimiser of ff and pepita layers)")

    def hyper(self, name: str) -> dict[str, Any]:
        return {"lr": self.config.optim.lr, "weight_decay": self.config.optim.weight_decay}

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"main": torch.optim.AdamW(self.module.parameters(), **self.hyper("main"))}

    def extra_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])

    # -- inference -------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.module.encode(x.to(self.device))

    @torch.no_grad()
    def forward_with_score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.forward(x)
        return out, torch.zeros(x.shape[0], device=self.device)

    # -- training --------------------------------------------------------------------
    def begin(self, batch: LayerBatch) -> Pending:
        """Nothing to do before the update: a cell's output is its post-update code."""
        self.check_batch(batch)
        return _CellPending(n_pos=batch.n_pos, x=batch.x.detach().to(self.device))

    def finish(self, pending: Pending, feedback: torch.Tensor | None = None) -> LayerResult:
        if feedback is not None:
            raise ShapeError("UFF cells take no feedback signal; set model.collaboration = "
                             "'none' for UFF cells")
        assert isinstance(pending, _CellPending)
        x = pending.x
        metrics = {} if self.config.frozen else self._learn(x[:pending.n_pos])
        if not self.config.frozen:
            self.steps += 1
        out = self.forward(x)
        return LayerResult(out=out, score=torch.zeros(x.shape[0], device=self.device),
                           metrics=metrics)

    def _learn(self, x: torch.Tensor) -> dict[str, float]:
        raise NotImplementedError


@dataclass
class _CellPending(Pending):
    x: torch.Tensor = field(default_factory=lambda: torch.empty(0))


class AutoencoderCell(Cell):
    def _build(self) -> nn.Module:
        return _Autoencoder(self.config)

    def _corrupt(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _learn(self, x: torch.Tensor) -> dict[str, float]:
        opt = self.optimizers["main"]
        with torch.enable_grad():
            loss, _ = self.module.loss(self._corrupt(x), x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        return {"loss": float(loss.detach())}


class DenoisingAutoencoderCell(AutoencoderCell):
    def _corrupt(self, x: torch.Tensor) -> torch.Tensor:
        keep = torch.rand(x.shape, generator=self.generator) >= self.config.noise
        return x * keep.to(x.device, x.dtype)


class _ConvCell(Cell):
    """A 3x3 stride-2 convolution cell: reads an image, passes a feature map on."""

    image_input = True

    @classmethod
    def shape(cls, in_features: int, in_shape: tuple[int, ...] | None, width: int
              ) -> tuple[list[int], tuple[int, ...] | None, int]:
        shape = in_shape or image_shape(in_features)
        out = conv_out_shape(shape, width)  # type: ignore[arg-type]
        return list(shape), out, out[0] * out[1] * out[2]

    def _build(self) -> nn.Module:
        return _ConvAutoencoder(self.config)


class ConvAutoencoderCell(_ConvCell, AutoencoderCell):
    pass


class ConvDenoisingAutoencoderCell(_ConvCell, DenoisingAutoencoderCell):
    pass


class GANCell(Cell):
    def _build(self) -> nn.Module:
        return _GAN(self.config)

    def hyper(self, name: str) -> dict[str, Any]:
        o = self.config.optim
        return {"lr": o.lr, "betas": (0.5, 0.999),
                "weight_decay": o.weight_decay if name == "main" else 0.0}

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        m = self.module
        d_params = [*m.features.parameters(), *m.norm.parameters(), *m.logit.parameters()]
        return {"main": torch.optim.AdamW(d_params, **self.hyper("main")),
                "generator": torch.optim.AdamW(m.generator.parameters(),
                                               **self.hyper("generator"))}

    def _learn(self, x: torch.Tensor) -> dict[str, float]:
        m, n = self.module, x.shape[0]
        noise = torch.randn(n, GAN_NOISE, generator=self.generator).to(self.device)
        ones, zeros = torch.ones(n, device=self.device), torch.zeros(n, device=self.device)
        with torch.enable_grad():
            fake = m.generator(noise)
            d_loss = (F.binary_cross_entropy_with_logits(m.discriminate(x), ones)
                      + F.binary_cross_entropy_with_logits(m.discriminate(fake.detach()), zeros))
            self.optimizers["main"].zero_grad(set_to_none=True)
            d_loss.backward()
            self.optimizers["main"].step()
            g_loss = F.binary_cross_entropy_with_logits(m.discriminate(fake), ones)
            self.optimizers["generator"].zero_grad(set_to_none=True)
            g_loss.backward()
        self.optimizers["generator"].step()
        return {"loss": float(d_loss.detach()), "generator_loss": float(g_loss.detach())}
