"""The in-process engine: a chain of layers plus a linear head, run in one process.

This file tells the whole per-batch story of supervised and unsupervised FF. The layers
only ever see tensors, so a remote worker chain or a federation client reuses them as
they are; what lives here is the orchestration that a single process can do at once.

`Network` is what the training loop, evaluation, the probes and a federation client ask
of a network; `FFNetwork` (here) and `Pipeline` (a chain of layer workers,
fedff/pipeline/driver.py) both implement it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from fedff.config import Config
from fedff.ff import negatives as neg
from fedff.engine.block import LayerBlock, Packet
from fedff.engine.head import LinearHead
from fedff.errors import ConfigError, ShapeError


UNLABELLED = -1


@dataclass(frozen=True)
class InputSpec:
    """What the network is fed: flat features, the image shape behind them, classes."""

    features: int
    image_shape: tuple[int, int]
    num_classes: int


def wrong_labels(cfg: Config, spec: InputSpec, labels: torch.Tensor,
                 generator: torch.Generator, probs: torch.Tensor | None = None) -> torch.Tensor:
    """The negatives' labels: drawn in proportion to the head's `probs` when given (hard
    negatives), else uniformly among the wrong ones."""
    k = cfg.train.negatives_per_example
    if probs is not None:
        return neg.hard_wrong_labels(labels, probs, generator, k)
    return neg.random_wrong_labels(labels, spec.num_classes, generator, k)


def overlay_rows(cfg: Config, num_classes: int, x: torch.Tensor, labels: torch.Tensor,
                 wrong: torch.Tensor) -> torch.Tensor:
    """Supervised FF's [positives; negatives]: x with its label, then with a wrong one.

    A worker chain's first worker runs this on the examples the driver sends, which
    carries a third of the bytes that the finished rows would.
    """
    both = torch.cat([labels, wrong.to(labels.device)])
    return neg.overlay(x, both, num_classes, cfg.train.label_strength)


def training_rows(cfg: Config, spec: InputSpec, x: torch.Tensor, labels: torch.Tensor,
                  generator: torch.Generator, probs: torch.Tensor | None = None) -> torch.Tensor:
    """[positives; negatives] for one batch of real examples (x.shape[0] positives):
    label overlays (supervised) or x and hybrid images (unsupervised)."""
    if cfg.train.algorithm == "supervised":
        wrong = wrong_labels(cfg, spec, labels, generator, probs)
        return overlay_rows(cfg, spec.num_classes, x, labels, wrong)
    if cfg.train.negatives == "none":  # UFF cells only: the examples themselves
        return x
    negs = neg.hybrid_images(x.cpu(), spec.image_shape, cfg.train.hybrid_blur_steps,
                             generator).to(x.device)
    return torch.cat([x, negs])


def prediction_memory(cfg: Config, spec: InputSpec) -> neg.PredictionMemory | None:
    """The `hard-memory` negatives' memory, where the run uses them."""
    if cfg.train.algorithm == "supervised" and cfg.train.negatives == "hard-memory":
        return neg.PredictionMemory(spec.num_classes)
    return None


def visit_index(index: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    if index is None or index.shape != (x.shape[0],):
        raise ConfigError(f"train.negatives = 'hard-memory' remembers each training "
                          f"example's prediction, so train_batch needs `index`, one place in "
                          f"the training set per row ({x.shape[0]}); got "
                          f"{None if index is None else list(index.shape)}. fedff's training "
                          f"loop passes it; or use train.negatives = 'hard'")
    return index.cpu()


def memory_state(memory: neg.PredictionMemory | None) -> dict[str, Any]:
    """The checkpoint's entry for the memory ({} without one): an exact resume draws the
    same negatives."""
    return {} if memory is None else {"negative_memory": memory.state_dict()}


def load_memory(memory: neg.PredictionMemory | None, state: dict[str, Any]) -> None:
    if memory is not None and state.get("negative_memory") is not None:
        memory.load_state_dict(state["negative_memory"])


def check_batch(spec: InputSpec, x: torch.Tensor, labels: torch.Tensor) -> None:
    if x.dim() != 2 or x.shape[1] != spec.features:
        raise ShapeError(f"batch must have shape [batch, {spec.features}], got "
                         f"{list(x.shape)}; flatten images to {spec.features} features")
    if labels.shape != (x.shape[0],):
        raise ShapeError(f"labels must have shape [{x.shape[0]}], got {list(labels.shape)}")


def label_overlays(cfg: Config, num_classes: int, x: torch.Tensor) -> torch.Tensor:
    """x once per candidate label, that label overlaid: [batch * classes, features]."""
    labels = torch.arange(num_classes, device=x.device).repeat(x.shape[0])
    return neg.overlay(x.repeat_interleave(num_classes, dim=0), labels, num_classes,
                       cfg.train.label_strength)


def goodness_layers(cfg: Config) -> list[int]:
    """Layers whose goodness votes for a label.

    Plain FF: hidden layers >= 2, as in the paper (the first layer's goodness is mostly
    about the label pixels). Collaborative FF: all layers, because the sum over all
    layers is the quantity every layer was trained to make right.
    """
    n = len(cfg.model.hidden)
    if cfg.model.collaboration != "none" or n == 1:
        return list(range(n))
    return list(range(1, n))


class Network(Protocol):
    """A network the training loop drives, wherever its layers live."""

    cfg: Config
    spec: InputSpec
    device: torch.device
    supervised: bool
    generator: torch.Generator  # the run's shuffles and negatives
    epoch: int  # epochs finished

    @property
    def num_layers(self) -> int: ...
    def set_epoch(self, epoch: int) -> None: ...
    def train_batch(self, x: torch.Tensor, labels: torch.Tensor,
                    index: torch.Tensor | None = None) -> dict[str, float]:
        """Trains on one batch (`index`: the examples' places in the training set, which
        `hard-memory` negatives need); returns its metrics, or, where batches are in
        flight, those of an earlier batch (or {} while none has come back)."""
    def end_epoch(self) -> list[dict[str, float]]:
        """Waits for every batch in flight; returns the metrics that were still out."""
    def label_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Each layer's score for every candidate label: [layers, batch, classes]."""
    def head_logits(self, x: torch.Tensor) -> torch.Tensor: ...
    def goodness_layers(self) -> list[int]: ...
    def in_process(self) -> "FFNetwork":
        """This network (or a copy of its state) as an in-process FFNetwork: what reads
        every layer's activity, such as the probes."""
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def close(self) -> None:
        """Releases what the network holds outside this process (connections, workers)."""


class FFNetwork:
    def __init__(self, cfg: Config, spec: InputSpec, device: str | torch.device = "cpu"):
        self.cfg, self.spec, self.device = cfg, spec, torch.device(device)
        self.supervised = cfg.train.algorithm == "supervised"
        n = len(cfg.model.hidden)
        self.block = LayerBlock(cfg, spec.features, spec.num_classes, 0, n, head=True,
                                device=self.device)
        self.layers = self.block.layers
        self.head: LinearHead | None = self.block.head  # None: the last layer classifies
        self.head_layers = self.block.head_layers
        self.generator = torch.Generator().manual_seed(cfg.train.seed)
        self.memory = prediction_memory(cfg, spec)
        self.epoch = 0

    # -- training --------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.block.set_epoch(epoch)

    def train_batch(self, x: torch.Tensor, labels: torch.Tensor,
                    index: torch.Tensor | None = None) -> dict[str, float]:
        """One step of every layer and of the head on one batch of real examples."""
        check_batch(self.spec, x, labels)
        x, labels = x.to(self.device), labels.to(self.device)
        t = self.cfg.train
        metrics: dict[str, float] = {}
        probs = None
        if self.supervised:  # the head first: hard negatives come from its predictions
            assert self.head is not None
            probs, head_metrics = self.head.train_step(self.head_features(
                neg.neutral(x, self.spec.num_classes, t.label_strength)), labels)
            metrics.update(head_metrics)
        if self.memory is not None:  # the previous visit's prediction, then this one's
            assert probs is not None
            index = visit_index(index, x)
            wrong = self.memory.wrong_labels(labels, index, self.generator,
                                             t.negatives_per_example)
            self.memory.remember(index, probs)
            rows = overlay_rows(self.cfg, self.spec.num_classes, x, labels, wrong)
        else:
            rows = training_rows(self.cfg, self.spec, x, labels, self.generator,
                                 probs if t.negatives == "hard" else None)
        # Unsupervised: the head reads the positive rows of this very pass; unlabelled
        # examples (label UNLABELLED, e.g. at a federation client) train no head.
        head_labels = None if self.supervised or bool((labels == UNLABELLED).any()) else labels
        packet = Packet(x=rows, n_pos=x.shape[0], labels=head_labels)
        out, layer_metrics = self.ff_step(packet)
        metrics.update(layer_metrics)
        metrics.update(self.block.train_head(out)[1])
        return metrics

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def end_epoch(self) -> list[dict[str, float]]:
        """Nothing is in flight in one process: every batch's metrics came back; the
        layers turn the epoch's statistics into state."""
        self.block.end_epoch()
        return []

    def in_process(self) -> "FFNetwork":
        return self

    def close(self) -> None:
        pass  # nothing outside this process

    def ff_step(self, packet: Packet) -> tuple[Packet, dict[str, float]]:
        """Trains every layer once on the packet's [positives; negatives]."""
        out, pending, metrics = self.block.train(packet)
        if pending is not None:  # CFF over all layers: every score is known now
            metrics.update(self.block.finish(pending, later=None)[1])
        return out, metrics

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
        taps: dict[int, torch.Tensor] = {}
        self.block.forward_taps(x.to(self.device), taps)
        return self.block.head_features(taps)

    @torch.no_grad()
    def head_logits(self, x: torch.Tensor) -> torch.Tensor:
        """One pass (neutral label when supervised) read by the softmax head."""
        x = x.to(self.device)
        if self.supervised:
            x = neg.neutral(x, self.spec.num_classes, self.cfg.train.label_strength)
        if self.head is None:  # a top-down network (PEPITA): its output layer's logits
            return self.block.infer(x)[0]
        return self.head.logits(self.head_features(x))

    @torch.no_grad()
    def label_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Each layer's score for every candidate label: [layers, batch, classes]."""
        rows = label_overlays(self.cfg, self.spec.num_classes, x.to(self.device))
        _, scores = self.activities(rows)
        return scores.view(len(self.layers), x.shape[0], self.spec.num_classes)

    def goodness_layers(self) -> list[int]:
        return goodness_layers(self.cfg)

    # -- state -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"config": self.cfg.to_dict(), "spec": self.spec.__dict__,
                "layers": [layer.state_dict() for layer in self.layers],
                "head": None if self.head is None else self.head.state_dict(),
                "epoch": self.epoch,
                "generator": self.generator.get_state(),
                **memory_state(self.memory)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["layers"]) != len(self.layers):
            raise ShapeError(f"checkpoint has {len(state['layers'])} layers, the network "
                             f"has {len(self.layers)}")
        self.block.load_state_dict({"first": 0, "last": len(self.layers),
                                    "layers": state["layers"], "head": state["head"]})
        self.generator.set_state(state["generator"])
        load_memory(self.memory, state)
        self.set_epoch(int(state["epoch"]))
