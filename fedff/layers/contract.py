"""The layer contract: what every layer kind implements, and the logic they share.

A layer owns everything it needs to learn: its module, its local objective, its own
optimisers and schedule, its running statistics. It never touches another layer, so the
same object runs in the in-process network, in a remote layer worker (which only sees
the tensors that arrive on the wire) and in a federation client.

Training is split in two steps that may be separated in time and space:
`begin(batch)` runs what the layer can do with its input alone; `finish(pending,
feedback)` applies the update once the signal it waits for is known. Plain FF and UFF
cells need no signal (`train_step` runs both at once); Collaborative FF over all layers
waits for the later layers' scores, and a top-down learner waits for the error from the
top of the network. The signal may come from the next layers in this process or arrive
over the wire, possibly batches later.

What a kind writes (see fedff/ff/layer.py and fedff/uff/cells.py):
- `build_module()`, `hyper(name)` (one entry per optimiser) and `build_optimizers()`
  (`SGDLayer` writes these two for the one optimiser `optim` sets);
- `begin`, `finish` and `forward_with_score`;
- optionally `buffers()` (running statistics that travel and are averaged with the
  weights), `extra_state()` / `load_extra_state()` (state that travels but is not
  averaged, e.g. a noise generator), `shape()` (an output width that is not `width`).
What the base writes once: input checks, the schedule, the full state round trip,
resume semantics, and the arrays a federation averages.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from fedff.errors import ShapeError
from fedff.layers.optim import (OptimConfig, lr_factor, make_optimizer, optimizer_hyper,
                                set_hyper)

STATE_FORMAT = 2


@dataclass
class LayerConfig:
    """Everything needed to rebuild a layer from scratch, on any machine.

    The shape fields (in/out features, kind, in_shape) come from the checkpoint on
    resume; everything else from the run's config (see `Layer.load_state_dict`).
    """

    in_features: int
    out_features: int
    kind: str = "ff"  # a name in fedff.layers.registry
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
    options: dict[str, Any] = field(default_factory=dict)  # the kind's own config section
    index: int = 0  # this layer's place in the network
    widths: list[int] = field(default_factory=list)  # the network's [input, layer 1, ...]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayerConfig":
        d = dict(d)
        d["optim"] = OptimConfig(**d.get("optim", {}))
        return cls(**d)

    def shape(self) -> tuple[str, int, int, list[int]]:
        return self.kind, self.in_features, self.out_features, list(self.in_shape)


@dataclass
class LayerBatch:
    """One training batch for a layer: positives first, then negatives, in one tensor.

    Keeping both halves in one tensor runs one matmul of 2B rows instead of two of B,
    which is what makes a CPU layer fast.
    """

    x: torch.Tensor
    n_pos: int
    gamma: torch.Tensor | None = None  # the signal finish() needs, when known at once
    labels: torch.Tensor | None = None  # targets, for a kind that learns from them


@dataclass
class LayerResult:
    out: torch.Tensor  # detached: the next layer's input
    score: torch.Tensor  # detached per-sample score (the collaborative signal)
    metrics: dict[str, float]


@dataclass
class Pending:
    """A step whose update waits for a signal. `out` and `score` are set when the kind
    knows them before the update (collaborative kinds must); the rest is the kind's."""

    n_pos: int
    out: torch.Tensor | None = None
    score: torch.Tensor | None = None
    error: torch.Tensor | None = None  # a top-down signal an output layer sends back up


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


def aligned(x: torch.Tensor, boundary: int = 64) -> torch.Tensor:
    """x itself, or a copy where its data does not start on a SIMD boundary.

    BLAS kernels round differently for unaligned operands, and a tensor decoded from the
    wire is only aligned to its dtype; a layer whose matmul reads its input directly
    (no normalisation in between) copies it, so a chain computes what one process does.
    """
    return x if x.data_ptr() % boundary == 0 else x.clone()


class Layer(ABC):
    """The contract every layer kind implements (FF layers, UFF cells, ...).

    The class attributes say what a config may combine the kind with; config validation
    reads them through the registry, so a new kind brings its own rules.
    """

    needs_negatives: ClassVar[bool] = False  # learns from [positives; negatives] rows
    algorithms: ClassVar[tuple[str, ...]] = ("unsupervised",)  # train.algorithm values
    collaborative: ClassVar[bool] = False  # supports model.collaboration (score exchange)
    image_input: ClassVar[bool] = False  # reads (C, H, W): first, or after image layers
    top_down: ClassVar[bool] = False  # a step is: begin down, send_back up, finish down
    classifier_head: ClassVar[bool] = True  # a softmax head reads the layers' activity

    def __init__(self, config: LayerConfig, device: str | torch.device = "cpu"):
        self.config = config
        self.device = torch.device(device)
        self.module = self.build_module().to(self.device)
        self.optimizers = self.build_optimizers()
        self.epoch = 0
        self.steps = 0

    # -- what a kind writes --------------------------------------------------------------
    @abstractmethod
    def build_module(self) -> nn.Module:
        """The learnable parameters, initialised from `config.seed` alone."""

    @abstractmethod
    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """One optimiser per name, each built with `hyper(name)`."""

    @abstractmethod
    def hyper(self, name: str) -> dict[str, Any]:
        """Optimiser `name`'s hyperparameters from the config (lr before the schedule)."""

    @abstractmethod
    def begin(self, batch: LayerBatch) -> Pending: ...

    @abstractmethod
    def finish(self, pending: Pending, feedback: torch.Tensor | None = None) -> LayerResult: ...

    @abstractmethod
    def forward_with_score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the next layer's input, per-sample score), no update."""

    def buffers(self) -> dict[str, torch.Tensor]:
        """Running statistics kept beside the module; a federation averages them too."""
        return {}

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def end_epoch(self) -> None:
        """Runs once the epoch's last batch has trained: statistics of the epoch's rows
        become state here (e.g. a one-class centre), in one process and in a worker."""

    def send_back(self, pending: Pending, signal: torch.Tensor) -> torch.Tensor:
        """Top-down kinds: the signal from this layer's output space into its input space
        (the first layer returns its pass-2 input). Other kinds send nothing back."""
        raise NotImplementedError(f"a {self.config.kind!r} layer takes no top-down signal")

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """The kind's own rules for a run config (`fedff.config.Config`); raises
        ConfigError naming the key and the fix."""

    @classmethod
    def after_step(cls, layers: list["Layer"], rows: int) -> None:
        """Runs after every layer of a block finished a step on `rows` rows (e.g. the
        weight mirroring of the layers' feedback matrices)."""

    # Top-down kinds whose layers agree on something across workers (PEPITA's mirroring
    # rescale): what rides up with the signal and down with the frames, per block.
    @classmethod
    def signal_up(cls, layers: list["Layer"], below: dict[str, torch.Tensor]
                  ) -> dict[str, torch.Tensor]:
        """Before the block's send_back: what goes up beside the signal, given what came
        from below (empty at the network's last layer)."""
        return {}

    @classmethod
    def frame_extras(cls, layers: list["Layer"]) -> dict[str, torch.Tensor]:
        """What goes down with every frame the block sends on."""
        return {}

    @classmethod
    def receive_frame(cls, layers: list["Layer"], tensors: dict[str, torch.Tensor]) -> None:
        """A frame's tensors, before the block's step on it (frame_extras from above)."""

    @classmethod
    def shape(cls, in_features: int, in_shape: tuple[int, ...] | None, width: int
              ) -> tuple[list[int], tuple[int, ...] | None, int]:
        """(this layer's in_shape, the image shape it passes on, its out_features) for a
        layer `width` wide; flat layers pass no image shape on."""
        return [], None, width

    # -- what every kind shares ----------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_score(x)[0]

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_score(x)[1]

    def train_step(self, batch: LayerBatch) -> LayerResult:
        return self.finish(self.begin(batch), batch.gamma)

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

    def check_batch(self, batch: LayerBatch) -> None:
        self.check_input(batch.x)
        if not 0 < batch.n_pos <= batch.x.shape[0]:
            raise ShapeError(f"n_pos must be in 1..{batch.x.shape[0]} (the batch size), "
                             f"got {batch.n_pos}")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        o = self.config.optim
        factor = lr_factor(o, epoch, self.config.epochs)
        for name, optimizer in self.optimizers.items():
            set_hyper(optimizer, self.hyper(name), factor)

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "kind": self.config.kind,
                "config": dataclasses.asdict(self.config),
                "module": snapshot(self.module.state_dict()),
                "optimizers": {k: snapshot(o.state_dict()) for k, o in self.optimizers.items()},
                "buffers": snapshot(self.buffers()), "extra": snapshot(self.extra_state()),
                "epoch": self.epoch, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Learned state and counters from `state`, every hyperparameter from this
        layer's own config (the run's command line on resume), as nanoGPT does."""
        check_state(state, self.config)
        self.module.load_state_dict(state["module"])
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])
        for name, buffer in self.buffers().items():
            saved = state["buffers"].get(name)
            if saved is None or saved.shape != buffer.shape:
                raise ShapeError(f"state's {name!r} is "
                                 f"{'missing' if saved is None else list(saved.shape)}, "
                                 f"this layer's is {list(buffer.shape)}")
            buffer.copy_(saved)
        self.load_extra_state(state["extra"])
        self.steps = int(state["steps"])
        self.set_epoch(int(state["epoch"]))  # re-applies the config's hyperparameters

    @classmethod
    def from_state(cls, state: dict[str, Any], device: str | torch.device = "cpu") -> "Layer":
        layer = cls(LayerConfig.from_dict(state["config"]), device=device)
        layer.load_state_dict(state)
        return layer

    # -- federation ------------------------------------------------------------------------
    @classmethod
    def federated_arrays(cls, state: dict[str, Any]) -> dict[str, torch.Tensor]:
        """What a federation averages (example-weighted mean), under keys the kind names:
        the module's tensors and the running statistics. Optimiser state and anything
        left out here stay with the client."""
        return {**state["module"], **state["buffers"]}

    @classmethod
    def with_federated_arrays(cls, state: dict[str, Any], arrays: dict[str, torch.Tensor]
                              ) -> dict[str, Any]:
        """A copy of `state` with the given federated arrays in place."""
        state = {**state, "module": dict(state["module"]), "buffers": dict(state["buffers"])}
        known = cls.federated_arrays(state)
        for key, value in arrays.items():
            if key not in known:
                raise ShapeError(f"array '{key}' is not federated state of a "
                                 f"{state['kind']!r} layer; it has {sorted(known)}")
            if known[key].shape != value.shape:
                raise ShapeError(f"array '{key}' has shape {tuple(value.shape)}, the layer "
                                 f"has {tuple(known[key].shape)}; client and coordinator "
                                 f"must use the same model config")
            part = "module" if key in state["module"] else "buffers"
            state[part][key] = value
        return state

    def weights(self) -> dict[str, torch.Tensor]:
        """This layer's federated arrays, live (detached): `federated_arrays` of its state."""
        return {k: v.detach() for k, v in {**self.module.state_dict(), **self.buffers()}.items()}

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Puts federated arrays (from `weights()` of a layer like this) in place; the
        optimiser state stays as it is."""
        state = type(self).with_federated_arrays(
            {"kind": self.config.kind, "module": self.module.state_dict(),
             "buffers": self.buffers()}, weights)
        self.module.load_state_dict(state["module"])
        for name, buffer in self.buffers().items():
            buffer.copy_(state["buffers"][name])


def check_state(state: dict[str, Any], current: LayerConfig) -> None:
    """Refuses a state of another format, kind or shape than `current`."""
    if state.get("format") != STATE_FORMAT:
        raise ShapeError(f"layer state format {state.get('format')!r} is not supported "
                         f"(this fedff reads format {STATE_FORMAT}); retrain, or score the "
                         f"checkpoint with the fedff version that wrote it")
    saved = LayerConfig.from_dict(state["config"])
    if saved.kind != current.kind:
        raise ShapeError(f"state of a {saved.kind!r} layer cannot load into a "
                         f"{current.kind!r} layer")
    if saved.optim.optimizer != current.optim.optimizer:
        raise ShapeError(f"state was trained with optim.optimizer = "
                         f"{saved.optim.optimizer!r}, this run sets "
                         f"{current.optim.optimizer!r}; resume with the same optimiser")
    if saved.shape() != current.shape():
        raise ShapeError(f"state is for a {saved.in_features}->{saved.out_features} layer, "
                         f"this layer is {current.in_features}->{current.out_features}")


class SGDLayer(Layer):
    """A layer with one optimiser ("main") set from `optim` (fedff/layers/optim.py):
    SGD with momentum, dampening and weight decay, or Adam, fused where torch has it."""

    def hyper(self, name: str) -> dict[str, Any]:
        return optimizer_hyper(self.config.optim)

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"main": make_optimizer(self.module.parameters(), self.device,
                                       self.config.optim)}
