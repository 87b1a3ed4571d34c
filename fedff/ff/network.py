"""The in-process engine: a chain of FF layers plus a linear head, run in one process.

This file tells the whole per-batch story of supervised and unsupervised FF. The layers
only ever see tensors, so a remote worker chain or a federation client reuses them as
they are; what lives here is the orchestration that a single process can do at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fedff.config import Config
from fedff.ff import negatives as neg
from fedff.ff.head import LinearHead
from fedff.ff.layer import FFLayer, LayerBatch, LayerConfig, Pending, ShapeError, lr_factor


@dataclass(frozen=True)
class InputSpec:
    """What the network is fed: flat features, the image shape behind them, classes."""

    features: int
    image_shape: tuple[int, int]
    num_classes: int


def layer_configs(cfg: Config, input_features: int) -> list[LayerConfig]:
    widths = [input_features, *cfg.model.hidden]
    m = cfg.model
    return [LayerConfig(in_features=widths[i], out_features=widths[i + 1],
                        objective=m.objective, threshold_scale=m.threshold_scale,
                        temperature=m.temperature, peer_norm=m.peer_norm,
                        peer_momentum=m.peer_momentum, epochs=cfg.train.epochs,
                        normalize_input=i == 0,  # later layers get normalised outputs
                        seed=cfg.train.seed * 1000 + i, optim=cfg.optim)
            for i in range(len(cfg.model.hidden))]


def default_head_layers(cfg: Config) -> list[int]:
    """Hinton: hidden layers >= 2 (supervised); the last three (unsupervised)."""
    n = len(cfg.model.hidden)
    if cfg.head.layers:
        return list(cfg.head.layers)
    if cfg.train.algorithm == "supervised":
        return list(range(1, n)) if n > 1 else [0]
    return list(range(max(0, n - 3), n))


class FFNetwork:
    def __init__(self, cfg: Config, spec: InputSpec, device: str | torch.device = "cpu"):
        self.cfg, self.spec, self.device = cfg, spec, torch.device(device)
        self.supervised = cfg.train.algorithm == "supervised"
        self.layers = [FFLayer(lc, self.device) for lc in layer_configs(cfg, spec.features)]
        self.head_layers = default_head_layers(cfg)
        head_in = sum(cfg.model.hidden[i] for i in self.head_layers)
        self.head = LinearHead(head_in, spec.num_classes, cfg.head, self.device)
        self.generator = torch.Generator().manual_seed(cfg.train.seed)
        self.epoch = 0

    # -- training --------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for layer in self.layers:
            layer.set_epoch(epoch)
        self.head.set_lr_factor(lr_factor(self.cfg.optim.schedule, epoch, self.cfg.train.epochs))

    def _check_batch(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.spec.features:
            raise ShapeError(f"batch must have shape [batch, {self.spec.features}], got "
                             f"{list(x.shape)}; flatten images to {self.spec.features} features")
        if labels.shape != (x.shape[0],):
            raise ShapeError(f"labels must have shape [{x.shape[0]}], got {list(labels.shape)}")

    def train_batch(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """One step of every layer and of the head on one batch of real examples."""
        self._check_batch(x, labels)
        x, labels = x.to(self.device), labels.to(self.device)
        c, t = self.spec.num_classes, self.cfg.train
        metrics: dict[str, float] = {}
        if self.supervised:
            probs, head_metrics = self.head.train_step(self.head_features(
                neg.neutral(x, c, t.label_strength)), labels)
            metrics.update(head_metrics)
            if t.negatives == "hard":
                wrong = neg.hard_wrong_labels(labels, probs.cpu(), self.generator)
            else:
                wrong = neg.random_wrong_labels(labels.cpu(), c, self.generator)
            pos = neg.overlay(x, labels, c, t.label_strength)
            negs = neg.overlay(x, wrong.to(self.device), c, t.label_strength)
        else:
            pos = x
            negs = neg.hybrid_images(x.cpu(), self.spec.image_shape, t.hybrid_blur_steps,
                                     self.generator).to(self.device)
        outs, layer_metrics = self.ff_step(torch.cat([pos, negs]), n_pos=x.shape[0])
        metrics.update(layer_metrics)
        if not self.supervised:  # the positive rows are exactly the head's input
            feats = torch.cat([outs[i][: x.shape[0]] for i in self.head_layers], dim=1)
            metrics.update(self.head.train_step(feats, labels)[1])
        return metrics

    def ff_step(self, x: torch.Tensor, n_pos: int) -> tuple[list[torch.Tensor], dict[str, float]]:
        """Trains every layer once on [positives; negatives]; returns each layer's output."""
        mode = self.cfg.model.collaboration
        if mode == "all":
            return self._ff_step_all(x, n_pos)
        outs, metrics, gamma, h = [], {}, None, x
        for i, layer in enumerate(self.layers):
            result = layer.train_step(LayerBatch(h, n_pos, gamma))
            if mode == "earlier":
                gamma = result.score if gamma is None else gamma + result.score
            outs.append(result.out)
            h = result.out
            metrics.update({f"layer{i}/{k}": v for k, v in result.metrics.items()})
        return outs, metrics

    def _ff_step_all(self, x: torch.Tensor, n_pos: int) -> tuple[list[torch.Tensor], dict]:
        """CFF, all layers: every layer's gamma is the sum of the other layers' scores."""
        pending: list[Pending] = []
        h = x
        for layer in self.layers:
            pending.append(layer.begin(LayerBatch(h, n_pos)))
            h = pending[-1].out
        scores = torch.stack([p.score.detach() for p in pending])
        total = scores.sum(dim=0)
        metrics = {}
        for i, (layer, p) in enumerate(zip(self.layers, pending)):
            result = layer.finish(p, gamma=total - scores[i])
            metrics.update({f"layer{i}/{k}": v for k, v in result.metrics.items()})
        return [p.out for p in pending], metrics

    # -- inference -------------------------------------------------------------------
    @torch.no_grad()
    def activities(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every layer's normalised output and score [layers, batch] for input x."""
        outs, scores, h = [], [], x.to(self.device)
        for layer in self.layers:
            h, s = layer.forward_with_score(h)
            outs.append(h)
            scores.append(s)
        return outs, torch.stack(scores)

    def head_features(self, x: torch.Tensor) -> torch.Tensor:
        outs, _ = self.activities(x)
        return torch.cat([outs[i] for i in self.head_layers], dim=1)

    @torch.no_grad()
    def head_logits(self, x: torch.Tensor) -> torch.Tensor:
        """One pass (neutral label when supervised) read by the softmax head."""
        x = x.to(self.device)
        if self.supervised:
            x = neg.neutral(x, self.spec.num_classes, self.cfg.train.label_strength)
        return self.head.logits(self.head_features(x))

    @torch.no_grad()
    def label_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Each layer's score for every candidate label: [layers, batch, classes]."""
        c = self.spec.num_classes
        n = x.shape[0]
        x = x.to(self.device)
        labels = torch.arange(c, device=self.device).repeat(n)
        _, scores = self.activities(neg.overlay(x.repeat_interleave(c, dim=0), labels, c,
                                                self.cfg.train.label_strength))
        return scores.view(len(self.layers), n, c)

    def goodness_layers(self) -> list[int]:
        """Layers whose goodness votes for a label.

        Plain FF: hidden layers >= 2, as in the paper (the first layer's goodness is mostly
        about the label pixels). Collaborative FF: all layers, because the sum over all
        layers is the quantity every layer was trained to make right.
        """
        n = len(self.layers)
        if self.cfg.model.collaboration != "none" or n == 1:
            return list(range(n))
        return list(range(1, n))

    # -- state -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"config": self.cfg.to_dict(), "spec": self.spec.__dict__,
                "layers": [layer.state_dict() for layer in self.layers],
                "head": self.head.state_dict(), "epoch": self.epoch,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["layers"]) != len(self.layers):
            raise ShapeError(f"checkpoint has {len(state['layers'])} layers, the network "
                             f"has {len(self.layers)}")
        for layer, ls in zip(self.layers, state["layers"]):
            layer.load_state_dict(ls)
        self.head.load_state_dict(state["head"])
        self.generator.set_state(state["generator"])
        self.set_epoch(int(state["epoch"]))
