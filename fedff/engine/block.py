"""A block of consecutive layers: the unit a process runs, locally or in a worker.

The in-process network is one block holding every layer; a layer worker holds a block
of one or more layers. Both run this code, so a chain of workers computes what the
network computes in one process (tests/test_pipeline.py checks the weights match).

What flows between blocks is a `Packet`: the training rows (positives first), the
Collaborative FF signal of the earlier layers, and, for the softmax head, the
neutral-label rows and the head-layer outputs collected on the way ("taps"). What
flows back (for Collaborative FF over all layers) is the later layers' summed score.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from fedff.config import Config
from fedff.engine.head import LinearHead
from fedff.errors import ConfigError, ShapeError
from fedff.layers import registry
from fedff.layers.contract import Layer, LayerBatch, LayerConfig, Pending


@dataclass
class Packet:
    x: torch.Tensor  # training rows: n_pos positives, then negatives
    n_pos: int
    gamma: torch.Tensor | None = None  # sum of the earlier layers' scores (CFF)
    neutral: torch.Tensor | None = None  # neutral-label rows: the head's input, no update
    labels: torch.Tensor | None = None  # the head's targets (train it where it lives)
    taps: dict[int, torch.Tensor] = field(default_factory=dict)  # head-layer outputs


@dataclass
class BlockPending:
    """A training step whose layer updates wait for the later layers' scores (CFF all)."""

    pending: list[Pending]
    scores: torch.Tensor  # [block layers, rows]
    earlier: torch.Tensor | None


def check_top_down(every: list[LayerConfig], num_classes: int) -> None:
    """A top-down network's last layer is its classifier."""
    if every[-1].out_features != num_classes:
        widths = [c.out_features for c in every[:-1]]
        raise ConfigError(f"the last entry of model.hidden is a top-down network's output "
                          f"layer: it must be {num_classes} wide (the classes), got "
                          f"{every[-1].out_features}; e.g. model.hidden="
                          f"{[*widths, num_classes]}")


def default_head_layers(cfg: Config) -> list[int]:
    """Hinton: hidden layers >= 2 (supervised); the last three (unsupervised)."""
    n = len(cfg.model.hidden)
    if cfg.head.layers:
        return list(cfg.head.layers)
    if cfg.train.algorithm == "supervised":
        return list(range(1, n)) if n > 1 else [0]
    return list(range(max(0, n - 3), n))


class LayerBlock:
    """Layers [first, last) of the network described by cfg, plus the head if asked."""

    def __init__(self, cfg: Config, input_features: int, num_classes: int, first: int,
                 last: int, head: bool, device: str | torch.device = "cpu"):
        n = len(cfg.model.hidden)
        if not 0 <= first < last <= n:
            raise ShapeError(f"a block needs 0 <= first < last <= {n} (the network has {n} "
                             f"layers), got first={first}, last={last}")
        self.cfg, self.first, self.last = cfg, first, last
        self.device = torch.device(device)
        every = registry.layer_configs(cfg, input_features)
        self.layers: list[Layer] = [registry.make_layer(c, self.device)
                                    for c in every[first:last]]
        self.head_layers = default_head_layers(cfg)
        self.mode = cfg.model.collaboration
        self.top_down = all(type(layer).top_down for layer in self.layers)
        if self.top_down:
            check_top_down(every, num_classes)
        self.head: LinearHead | None = None
        # PEPITA's output layer classifies; one-class layers have no classes
        if head and all(registry.layer_class(c.kind).classifier_head for c in every):
            head_in = sum(every[i].out_features for i in self.head_layers)
            self.head = LinearHead(head_in, num_classes, cfg.head, cfg.optim,
                                   cfg.train.epochs, self.device)

    @property
    def indices(self) -> range:
        return range(self.first, self.last)

    def set_epoch(self, epoch: int) -> None:
        for layer in self.layers:
            layer.set_epoch(epoch)
        if self.head is not None:
            self.head.set_epoch(epoch)

    # -- training --------------------------------------------------------------------
    @torch.no_grad()
    def train(self, p: Packet) -> tuple[Packet, BlockPending | None, dict[str, float]]:
        """Trains every layer once on p; returns the next block's packet.

        Under CFF over all layers the updates wait: `finish(pending, later)` applies them.
        """
        if self.mode == "all":
            nxt, pending = self._begin_all(p)
            return nxt, pending, {}
        if self.top_down:
            nxt, metrics = self._train_top_down(p)
            return nxt, None, metrics
        metrics: dict[str, float] = {}
        for j in range(len(self.layers)):
            p, layer_metrics = self.train_layer(j, p)
            metrics.update(layer_metrics)
        return p, None, metrics

    @torch.no_grad()
    def train_layer(self, j: int, p: Packet) -> tuple[Packet, dict[str, float]]:
        """The j-th layer's step (CFF 'all' aside): a worker may run its layers as a
        pipeline of threads, layer j on one batch while layer j+1 works on the one before.

        The neutral rows go through the layer before its update, so the head sees the
        network as it was before this batch, as in a single process.
        """
        i, layer = self.first + j, self.layers[j]
        taps, neutral = dict(p.taps), p.neutral
        if neutral is not None:
            neutral = layer.forward(neutral)
            if i in self.head_layers:
                taps[i] = neutral
        result = layer.train_step(LayerBatch(p.x, p.n_pos, p.gamma))
        gamma = p.gamma
        if self.mode == "earlier":
            gamma = result.score if gamma is None else gamma + result.score
        self._tap_positive(i, result.out, p.n_pos, taps, p.neutral)
        nxt = Packet(x=result.out, n_pos=p.n_pos, gamma=gamma, neutral=neutral,
                     labels=p.labels, taps=taps)
        return nxt, {f"layer{i}/{k}": v for k, v in result.metrics.items()}

    # -- top-down learners (PEPITA): pass 1 down, the error up, pass 2 down ----------
    def _train_top_down(self, p: Packet) -> tuple[Packet, dict[str, float]]:
        """The whole step in one block (one process, or a chain of one worker)."""
        nxt, pending = self.begin_top_down(p)
        signal = pending[-1].error
        assert signal is not None  # check_top_down: the network ends in its output layer
        x_err, _ = self.send_back(pending, signal, {})
        out, metrics = self.finish_top_down(pending, x_err)
        return Packet(x=out, n_pos=p.n_pos, labels=p.labels), metrics

    @torch.no_grad()
    def begin_top_down(self, p: Packet) -> tuple[Packet, list[Pending]]:
        """Pass 1 through the block; the last layer of the network adds its error."""
        pending, h = [], p.x
        for layer in self.layers:
            pending.append(layer.begin(LayerBatch(h, p.n_pos, labels=p.labels)))
            h = pending[-1].out
        return Packet(x=h, n_pos=p.n_pos, labels=p.labels), pending

    @torch.no_grad()
    def send_back(self, pending: list[Pending], signal: torch.Tensor,
                  below: dict[str, torch.Tensor]
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The top-down signal from the block's output to its input (at the network's
        first layer: the modulated input of pass 2), and what goes up beside it, given
        what came up from below (`Layer.signal_up`)."""
        up = type(self.layers[0]).signal_up(self.layers, below)
        for layer, q in zip(reversed(self.layers), reversed(pending)):
            signal = layer.send_back(q, signal)
        return signal, up

    def frame_extras(self) -> dict[str, torch.Tensor]:
        return type(self.layers[0]).frame_extras(self.layers)

    def receive_frame(self, tensors: dict[str, torch.Tensor]) -> None:
        type(self.layers[0]).receive_frame(self.layers, tensors)

    @torch.no_grad()
    def finish_top_down(self, pending: list[Pending], x2: torch.Tensor
                        ) -> tuple[torch.Tensor, dict[str, float]]:
        """Pass 2 through the block from its modulated input x2, each layer's update."""
        metrics: dict[str, float] = {}
        for i, layer, q in zip(self.indices, self.layers, pending):
            result = layer.finish(q, x2)
            x2 = result.out
            metrics.update({f"layer{i}/{k}": v for k, v in result.metrics.items()})
        type(self.layers[0]).after_step(self.layers, x2.shape[0])
        return x2, metrics

    def _tap_positive(self, i: int, out: torch.Tensor, n_pos: int,
                      taps: dict[int, torch.Tensor], neutral: torch.Tensor | None) -> None:
        # Unsupervised: the head reads the positive (real) rows of the training pass.
        if neutral is None and i in self.head_layers:
            taps[i] = out[:n_pos]

    def _begin_all(self, p: Packet) -> tuple[Packet, BlockPending]:
        """CFF all: every layer's forward pass now, the updates once gamma is complete."""
        taps, neutral = dict(p.taps), p.neutral
        if neutral is not None:  # before any update, as in train_layer
            neutral = self.forward_taps(neutral, taps)
        pending, h = [], p.x
        for i, layer in zip(self.indices, self.layers):
            pending.append(layer.begin(LayerBatch(h, p.n_pos)))
            h = pending[-1].out
            self._tap_positive(i, h, p.n_pos, taps, p.neutral)
        scores = torch.stack([q.score for q in pending])
        block_sum = scores.sum(dim=0)
        gamma = block_sum if p.gamma is None else p.gamma + block_sum
        nxt = Packet(x=h, n_pos=p.n_pos, gamma=gamma, neutral=neutral, labels=p.labels,
                     taps=taps)
        return nxt, BlockPending(pending, scores, p.gamma)

    @torch.no_grad()
    def finish(self, bp: BlockPending, later: torch.Tensor | None
               ) -> tuple[torch.Tensor, dict[str, float]]:
        """CFF all: applies the updates now that the later layers' scores are known.

        Returns this block's and the later layers' summed score: the earlier blocks' feedback.
        """
        own = bp.scores.sum(dim=0)
        total = own
        for part in (bp.earlier, later):
            if part is not None:
                total = total + part
        metrics: dict[str, float] = {}
        for i, layer, q, s in zip(self.indices, self.layers, bp.pending, bp.scores):
            result = layer.finish(q, total - s)
            metrics.update({f"layer{i}/{k}": v for k, v in result.metrics.items()})
        return (own if later is None else own + later), metrics

    def end_epoch(self) -> None:
        for layer in self.layers:
            layer.end_epoch()

    def train_head(self, p: Packet) -> tuple[torch.Tensor | None, dict[str, float]]:
        """The head's step on the taps the packet collected (the last block only): its
        predicted probabilities (what `hard-memory` negatives remember) and metrics."""
        if self.head is None or p.labels is None:
            return None, {}
        return self.head.train_step(self.head_features(p.taps), p.labels)

    def head_features(self, taps: dict[int, torch.Tensor]) -> torch.Tensor:
        missing = [i for i in self.head_layers if i not in taps]
        if missing:
            raise ShapeError(f"the head reads layers {self.head_layers} but the outputs of "
                             f"{missing} did not arrive; the upstream blocks must tap them")
        return torch.cat([taps[i] for i in self.head_layers], dim=1)

    # -- inference -------------------------------------------------------------------
    @torch.no_grad()
    def forward_taps(self, x: torch.Tensor, taps: dict[int, torch.Tensor]) -> torch.Tensor:
        """The block's output for x, head-layer outputs into taps; no scores (the neutral
        pass that only the head reads)."""
        for i, layer in zip(self.indices, self.layers):
            x = layer.forward(x)
            if i in self.head_layers:
                taps[i] = x
        return x

    @torch.no_grad()
    def infer(self, x: torch.Tensor, taps: dict[int, torch.Tensor] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, scores [block layers, rows]); head-layer outputs go into taps."""
        scores = []
        for j in range(len(self.layers)):
            x, s = self.infer_layer(j, x, taps)
            scores.append(s)
        return x, torch.stack(scores)

    @torch.no_grad()
    def infer_layer(self, j: int, x: torch.Tensor, taps: dict[int, torch.Tensor] | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        out, score = self.layers[j].forward_with_score(x)
        if taps is not None and self.first + j in self.head_layers:
            taps[self.first + j] = out
        return out, score

    # -- state -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"first": self.first, "last": self.last,
                "layers": [layer.state_dict() for layer in self.layers],
                "head": None if self.head is None else self.head.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["first"], state["last"]) != (self.first, self.last) or \
                len(state["layers"]) != len(self.layers):
            raise ShapeError(f"state is for layers [{state['first']}, {state['last']}), this "
                             f"block holds [{self.first}, {self.last})")
        for layer, layer_state in zip(self.layers, state["layers"]):
            layer.load_state_dict(layer_state)
        if self.head is not None and state.get("head") is not None:
            self.head.load_state_dict(state["head"])
