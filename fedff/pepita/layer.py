"""PEPITA (Dellaferrera & Kreiman, ICML 2022; Srinivasan et al., ICLR 2024), one kind of
the layer contract: forward learning with a top-down error.

The network is `h_l = relu(W_l h_{l-1})` (no biases), the last layer's output the logits.
A step is three sweeps (the block runs them, fedff/engine/block.py):
1. down, `begin`: pass 1 on x, each hidden layer drawing its dropout mask; the output
   layer computes the error e = softmax(logits) - one_hot(target);
2. up, `send_back`: e is projected to the input through the feedback matrices and the
   first layer forms the modulated input x_err = x - F e (`pepita.modulation`);
3. down, `finish`: pass 2 on x_err with the same masks; hidden layers step on
   dW_l = (h_l - h_l_err) h_{l-1}_err^T, the output layer on e h_{L-1}_err^T (the
   pass-1 error by default, as the ICLR code; the pass-2 error with
   `pepita.last_error = "pass2"`, as the ICML code), batch means, SGD with momentum.

Feedback (`pepita.feedback`): "fixed", one d_in x C matrix
F = 0.05 U(-sqrt(6/d_in), sqrt(6/d_in)) on the first layer, never trained; or "mirror",
F = B_0 B_1 ... B_{L-1} factorised over the layers (B_l is d_l x d_{l+1}, N(0, s) with
s = (sd / sqrt(prod hidden))^(1/L), sd = 0.05 sqrt(2/d_in)), each B_l learning its
layer's transpose by weight mirroring: B_l += wm_lr xi^T (W_l xi)/B - wm_lr wm_wd B_l
for noise xi = 0.1 N(0, 1) minus its mean, then every factor rescaled by
(sd / std(F))^(1/L); fedff/pepita/mirror.py says how the layers agree on that scale when
they live on different workers. Mirroring runs on every batch of the first `wm_epochs`
epochs and of every `wm_every`-th epoch after them. The matrices are the layer's
buffers: saved, restored and averaged by a federation (every client starts from the
coordinator's).

`pepita.normalize = "length"` (not in the papers) rescales each hidden output, per
example and in both passes, to its input's length: without it three hidden layers blow
up (`length_normalized` says why).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedff.errors import ConfigError, ShapeError
from fedff.layers.contract import (Layer, LayerBatch, LayerResult, Pending, SGDLayer,
                                   aligned)
from fedff.pepita import mirror
from fedff.pepita.mirror import Scale
from fedff.wire.frames import WireError


@dataclass
class PepitaPending(Pending):
    x: torch.Tensor | None = None  # pass-1 input (the first layer also modulates it)
    h: torch.Tensor | None = None  # pass-1 output (after dropout and ReLU)
    mask: torch.Tensor | None = None  # the dropout mask, reused in pass 2
    target: torch.Tensor | None = None  # output layer: one-hot labels
    steps: int = 0  # the layer's steps at pass 1


class PepitaLayer(SGDLayer):
    algorithms = ("pepita",)
    top_down = True
    classifier_head = False  # the output layer classifies

    def __init__(self, config, device: str | torch.device = "cpu"):
        super().__init__(config, device)
        self.output = config.index == len(config.widths) - 2  # the last layer: logits
        self.first = config.index == 0
        self.generator = torch.Generator().manual_seed(config.seed + 7919)
        self.feedback = self._initial_feedback()
        # weight mirroring's rescale (fedff/pepita/mirror.py)
        self.known = Scale()  # the newest scale agreed (first layer) or received
        self.incoming: Scale | None = None  # to apply at the start of the next update
        self.scale_tag = 0  # the last scale applied to this factor
        self.mirrored = False  # mirrored since the product last went up / was agreed
        self.signal_scale = 1.0  # first layer: the pending scale, on the next signal

    # -- what the contract asks ----------------------------------------------------------
    def build_module(self) -> nn.Module:
        """He-uniform weights, no bias (the reference codes)."""
        cfg = self.config
        generator = torch.Generator().manual_seed(cfg.seed)
        linear = nn.Linear(cfg.in_features, cfg.out_features, bias=False)
        bound = math.sqrt(6.0 / cfg.in_features)
        with torch.no_grad():
            linear.weight.uniform_(-bound, bound, generator=generator)
        return linear

    def buffers(self) -> dict[str, torch.Tensor]:
        return {} if self.feedback is None else {"feedback": self.feedback}

    def extra_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "mirrored": self.mirrored,
                "scale": (self.known.tag, self.known.value), "scale_tag": self.scale_tag,
                "incoming": None if self.incoming is None else (self.incoming.tag,
                                                                self.incoming.value)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.known = Scale(*state.get("scale", (0, 1.0)))
        self.scale_tag = int(state.get("scale_tag", 0))
        incoming = state.get("incoming")
        self.incoming = None if incoming is None else Scale(*incoming)
        self.mirrored = bool(state.get("mirrored", False))

    @classmethod
    def with_federated_arrays(cls, state: dict[str, Any], arrays: dict[str, torch.Tensor]
                              ) -> dict[str, Any]:
        """Averaged factors are renormalised at the next step, as after a mirroring."""
        state = super().with_federated_arrays(state, arrays)
        if "feedback" in arrays and "extra" in state:
            state["extra"] = {**state["extra"], "mirrored": True}
        return state

    # -- feedback matrices ---------------------------------------------------------------
    def _initial_feedback(self) -> torch.Tensor | None:
        o, cfg = self.config.options, self.config
        widths = cfg.widths
        d_in, classes = widths[0], widths[-1]
        generator = torch.Generator().manual_seed(cfg.seed + 104729)
        if o["feedback"] == "fixed":
            if not self.first:
                return None
            bound = math.sqrt(6.0 / d_in)
            f = torch.empty(d_in, classes).uniform_(-bound, bound, generator=generator)
            return (o["f_scale"] * f).to(self.device)
        return torch.empty(cfg.in_features, cfg.out_features).normal_(
            0.0, factor_std(widths, o["f_scale"]), generator=generator).to(self.device)

    def mirrors(self) -> bool:
        o, e = self.config.options, self.epoch
        return o["feedback"] == "mirror" and (
            e < o["wm_epochs"] or (o["wm_every"] > 0 and e % o["wm_every"] == 0))

    @torch.no_grad()
    def mirror(self, rows: int) -> None:
        """One weight-mirroring step of this layer's factor B_l towards W_l^T."""
        o = self.config.options
        assert self.feedback is not None
        xi = 0.1 * torch.randn(rows, self.config.in_features, generator=self.generator)
        xi = (xi - xi.mean()).to(self.device)
        y = xi @ self.module.weight.t()
        self.feedback.add_(xi.t() @ y, alpha=o["wm_lr"] / rows)
        self.feedback.mul_(1.0 - o["wm_lr"] * o["wm_wd"])
        self.mirrored = True

    @torch.no_grad()
    def _apply_incoming(self) -> None:
        """The agreed rescale of the last mirroring step, this factor's share of it."""
        if self.incoming is None:
            return
        assert self.feedback is not None
        self.feedback.mul_(self.incoming.value ** (1.0 / (len(self.config.widths) - 1)))
        self.scale_tag, self.incoming = self.incoming.tag, None

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """PEPITA learns from labels without negatives, and its output layer classifies."""
        t = cfg.train
        if t.negatives != "none":
            raise ConfigError(f"PEPITA uses no negative data; set train.negatives = 'none' "
                              f"(got {t.negatives!r})")
        if t.classify != "head":
            raise ConfigError(f"PEPITA's output layer is its classifier; set "
                              f"train.classify = 'head' (got {t.classify!r})")
        if len(cfg.model.hidden) < 2:
            raise ConfigError("PEPITA needs hidden layers and an output layer: model.hidden "
                              "lists the hidden widths, then the classes, e.g. [1024, 10]")
        if cfg.pepita.feedback == "mirror" and cfg.pepita.modulation != "minus":
            raise ConfigError("weight mirroring descends only with x_err = x - F e; set "
                              "pepita.modulation = 'minus' with pepita.feedback = 'mirror'")

    @classmethod
    def after_step(cls, layers: list[Layer], rows: int) -> None:
        """Weight mirroring; the joint rescale is agreed with the next error
        (`signal_up`) and applied at the next update."""
        mirroring = [lay for lay in layers if isinstance(lay, PepitaLayer) and lay.mirrors()
                     and not lay.config.frozen]
        if mirroring and len(mirroring) == len(layers):
            for layer in mirroring:
                layer.mirror(rows)

    # -- the rescale's agreement along a chain (fedff/pepita/mirror.py) -------------------
    @classmethod
    def signal_up(cls, layers: list[Layer], below: dict[str, torch.Tensor]
                  ) -> dict[str, torch.Tensor]:
        """The tags and product that go up with the error; the block holding the first
        layer agrees the scale and sets the signal's correction instead."""
        own = [lay for lay in layers if isinstance(lay, PepitaLayer)]
        head, tail = own[0], own[-1]
        if head.config.options["feedback"] != "mirror":
            return {}
        widths = head.config.widths
        if tail.output:
            tags_below, prod = [], None
        else:
            tags_below, prod = mirror.check_upward(
                below, len(widths) - 2 - tail.config.index, tail.config.out_features,
                widths[-1])
        tags = [lay.scale_tag for lay in own] + tags_below
        if all(lay.mirrored for lay in own) and (tail.output or prod is not None):
            prod = mirror.product([lay.feedback for lay in own], prod)  # type: ignore[misc]
        else:
            prod = None
        if not head.first:
            if prod is None:
                return {mirror.TAGS: torch.tensor(tags, dtype=torch.int64)}
            for lay in own:
                lay.mirrored = False
            return {mirror.TAGS: torch.tensor(tags, dtype=torch.int64), mirror.PRODUCT: prod}
        if prod is not None and all(tag == head.known.tag for tag in tags):
            head.known = mirror.agreed(head.known, prod, widths, head.config.options["f_scale"])
            for lay in own:
                lay.mirrored = False
        for lay in own:  # this block takes the scale at once (e.g. a restored state's)
            if lay.scale_tag < head.known.tag:
                lay.known, lay.incoming = head.known, head.known
        head.signal_scale = mirror.correction(head.known, tags, len(widths) - 1)
        return {}

    @classmethod
    def frame_extras(cls, layers: list[Layer]) -> dict[str, torch.Tensor]:
        """The newest agreed scale, down with every frame."""
        head = layers[0]
        assert isinstance(head, PepitaLayer)
        return {mirror.SCALE: head.known.tensor()} if head.known.tag else {}

    @classmethod
    def receive_frame(cls, layers: list[Layer], tensors: dict[str, torch.Tensor]) -> None:
        if mirror.SCALE not in tensors:
            return
        own = [lay for lay in layers if isinstance(lay, PepitaLayer)]
        if own[0].first or own[0].config.options["feedback"] != "mirror":
            raise WireError(f"'{mirror.SCALE}' arrived at a worker that does not take one "
                            f"(the first worker agrees the scale; fixed feedback has none)")
        scale = Scale.from_tensor(tensors[mirror.SCALE])
        for lay in own:
            if scale.tag > lay.known.tag:
                lay.known = scale
                lay.incoming = scale if scale.tag > lay.scale_tag else None

    # -- pass 1, the error's way up, pass 2 ----------------------------------------------
    def _linear(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        z = x @ self.module.weight.t()
        if self.output:
            return z
        if mask is not None:
            z = z * mask
        h = z.clamp_min_(0)
        if self.config.options["normalize"] == "length":
            h = length_normalized(h, x)
        return h

    @torch.no_grad()
    def forward_with_score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_input(x)
        return self._linear(x.to(self.device), None), torch.zeros(x.shape[0],
                                                                  device=self.device)

    @torch.no_grad()
    def begin(self, batch: LayerBatch) -> PepitaPending:
        self.check_batch(batch)
        x = aligned(batch.x.to(self.device))
        p = self.config.options["dropout"]
        mask = None
        if not self.output and p > 0 and not self.config.frozen:
            keep = torch.rand(x.shape[0], self.config.out_features, generator=self.generator)
            mask = (keep >= p).to(x.device, x.dtype) / (1.0 - p)
        h = self._linear(x, mask)
        pending = PepitaPending(n_pos=batch.n_pos, out=h, x=x, h=h, mask=mask,
                                steps=self.steps)
        if self.output:
            if batch.labels is None:
                raise ShapeError("PEPITA's output layer needs the batch's labels")
            pending.target = nn.functional.one_hot(batch.labels.to(self.device),
                                                   self.config.out_features).to(h.dtype)
            pending.error = h.softmax(dim=1) - pending.target
        return pending

    @torch.no_grad()
    def send_back(self, pending: Pending, signal: torch.Tensor) -> torch.Tensor:
        """The error from this layer's output space to its input; the first layer
        returns the modulated input x_err."""
        assert isinstance(pending, PepitaPending)
        signal = aligned(signal.to(self.device))
        if self.feedback is not None:
            signal = signal @ self.feedback.t()
        if not self.first:
            return signal
        if self.signal_scale != 1.0:  # weight mirroring's pending rescale
            signal = signal * self.signal_scale
        assert pending.x is not None
        if signal.shape != pending.x.shape:
            raise ShapeError(f"the top-down signal reaching the first layer is "
                             f"{list(signal.shape)}, its input {list(pending.x.shape)}")
        sign = -1.0 if self.config.options["modulation"] == "minus" else 1.0
        return pending.x + sign * signal

    @torch.no_grad()
    def finish(self, pending: Pending, feedback: torch.Tensor | None = None) -> LayerResult:
        """Pass 2 on `feedback` (this layer's modulated input) and the update."""
        assert isinstance(pending, PepitaPending) and pending.h is not None
        if feedback is None:
            raise ShapeError("a PEPITA layer's finish needs its pass-2 input")
        x_err = aligned(feedback.to(self.device))
        self._apply_incoming()
        if pending.steps != self.steps:  # stepped since pass 1 (a chain's late pass 2)
            self._pass1_again(pending)
        h_err = self._linear(x_err, pending.mask)
        rows = x_err.shape[0]
        metrics: dict[str, float] = {}
        if self.output:
            assert pending.target is not None and pending.error is not None
            p1 = pending.h.log_softmax(dim=1)
            metrics = {"loss": float(-(p1 * pending.target).sum(dim=1).mean()),
                       "accuracy": float((p1.argmax(dim=1) == pending.target.argmax(dim=1))
                                         .float().mean())}
            use_pass2 = self.config.options["last_error"] == "pass2"
            delta = h_err.softmax(dim=1) - pending.target if use_pass2 else pending.error
        else:
            delta = pending.h - h_err
        if not self.config.frozen:
            self.module.weight.grad = delta.t() @ x_err / rows
            self.optimizers["main"].step()
            self.steps += 1
        return LayerResult(out=h_err, score=torch.zeros(rows, device=self.device),
                           metrics=metrics)


    def _pass1_again(self, pending: PepitaPending) -> None:
        """Pass 1 with the current weights, so h - h_err is the error's effect and not
        the weights' change since; only e itself stays late (a chain's window)."""
        assert pending.x is not None
        pending.h = self._linear(pending.x, pending.mask)
        if self.output:
            assert pending.target is not None
            pending.error = pending.h.softmax(dim=1) - pending.target


def length_normalized(h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Each row of h rescaled to the length of the same row of x.

    Why: ReLU is convex, so the perturbed pass 2 is on average more active than pass 1
    (measured: h - h_err has a negative mean in hidden layers 2 and 3). Every update
    then pushes the weights along the all-positive input and the activity grows. In a
    1-layer net this stays small, but in 784-1024-1024-1024-10 at lr 0.1 the last hidden
    layer's activity grows from 12 to 30 within 50 batches and the run diverges by
    batch 100. Rescaling removes the radial part of h - h_err, and each layer stays on
    its input's scale (README, PEPITA)."""
    return nn.functional.normalize(h, dim=1) * x.norm(dim=1, keepdim=True)


def factor_std(widths: list[int], f_scale: float) -> float:
    """s = (sd / sqrt(prod hidden))^(1/L), sd = f_scale sqrt(2/d_in): std(F) = sd."""
    factors = len(widths) - 1
    sd = mirror.target_std(widths, f_scale)
    return (sd / math.sqrt(math.prod(widths[1:-1]))) ** (1.0 / factors)
