"""The layer kinds: one map from a kind name (`model.cell`) to the class that implements
it, and the functions that turn a run config into layers.

Config validation, the block builder and `fedff configs --keys` all read the kinds from
here, so adding a kind is one module, one line in `KINDS` (or a `register` call from a
plugin) and, if it has hyperparameters of its own, its config section.

Plugins: a package can add kinds without touching fedff, through the entry-point group
`fedff.layers` (each entry point a module that calls `register`), or any module named in
`$FEDFF_PLUGINS` (comma-separated, like `$PYTEST_PLUGINS`). Layer workers and simulated
federation clients inherit the environment, so a plugin kind runs everywhere.
"""

from __future__ import annotations

import functools
import importlib
import os
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

import torch

from fedff.errors import ConfigError
from fedff.ff.layer import FFLayer
from fedff.layers.contract import Layer, LayerConfig
from fedff.oneclass.layer import OneClassLayer
from fedff.pepita.layer import PepitaLayer
from fedff.uff import cells

if TYPE_CHECKING:
    from fedff.config import Config

KINDS: dict[str, type[Layer]] = {
    "ff": FFLayer,
    "ae": cells.AutoencoderCell,
    "dae": cells.DenoisingAutoencoderCell,
    "conv-ae": cells.ConvAutoencoderCell,
    "conv-dae": cells.ConvDenoisingAutoencoderCell,
    "gan": cells.GANCell,
    "pepita": PepitaLayer,
    "oneclass": OneClassLayer,
}
SECTIONS: dict[str, str] = {"pepita": "pepita", "oneclass": "oneclass"}  # kind -> section
_plugins_loaded: set[str] = set()


def register(name: str, cls: type[Layer], section: str | None = None) -> None:
    """Adds a layer kind; `section` names the config section its options come from."""
    if not (isinstance(cls, type) and issubclass(cls, Layer)):
        raise TypeError(f"layer kind {name!r} must be a subclass of fedff.layers.Layer")
    if name in KINDS and KINDS[name] is not cls:
        raise ValueError(f"layer kind {name!r} is already registered as {KINDS[name]}")
    KINDS[name] = cls
    if section:
        SECTIONS[name] = section


@functools.cache
def _entry_point_plugins() -> tuple[str, ...]:
    """Installed plugins: scanned once per process (a scan reads every installed
    package's metadata, about 20 ms, and blocks are built per CONFIGURE and round)."""
    return tuple(ep.value for ep in entry_points(group="fedff.layers"))


def load_plugins() -> None:
    """Imports the plugin modules once each (entry points, then $FEDFF_PLUGINS)."""
    names = list(_entry_point_plugins())
    names += [m.strip() for m in os.environ.get("FEDFF_PLUGINS", "").split(",") if m.strip()]
    for module in names:
        if module in _plugins_loaded:
            continue
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ConfigError(f"cannot import layer plugin {module!r} ({e}); fix "
                              f"$FEDFF_PLUGINS or install the package") from e
        _plugins_loaded.add(module)


def kind_names() -> list[str]:
    load_plugins()
    return list(KINDS)


def layer_class(name: str) -> type[Layer]:
    load_plugins()
    if name not in KINDS:
        raise ConfigError(f"unknown layer kind {name!r}; choose from {', '.join(KINDS)} "
                          f"(or register one: fedff.layers.registry.register)")
    return KINDS[name]


def cell_kinds(cfg: "Config") -> list[str]:
    """`model.cell` per layer: one kind for all, or a comma list with one per layer."""
    kinds = [k.strip() for k in cfg.model.cell.split(",")]
    return kinds * len(cfg.model.hidden) if len(kinds) == 1 else kinds


def layer_configs(cfg: "Config", input_features: int) -> list[LayerConfig]:
    """Every layer's config; each kind says how wide its output is (`Layer.shape`)."""
    m = cfg.model
    configs, width, image = [], input_features, None
    for i, (kind, hidden) in enumerate(zip(cell_kinds(cfg), m.hidden)):
        in_shape, image, out = layer_class(kind).shape(width, image, hidden)
        section = SECTIONS.get(kind)
        configs.append(LayerConfig(
            in_features=width, out_features=out, kind=kind,
            objective=m.objective, threshold_scale=m.threshold_scale,
            temperature=m.temperature, peer_norm=m.peer_norm, peer_momentum=m.peer_momentum,
            epochs=cfg.train.epochs,
            normalize_input=i == 0,  # later FF layers get normalised outputs
            seed=cfg.train.seed * 1000 + i, optim=cfg.optim, frozen=i in cfg.train.freeze,
            in_shape=in_shape, noise=m.cell_noise,
            options=dict(vars(getattr(cfg, section))) if section else {}, index=i))
        width = out
    widths = [input_features, *(c.out_features for c in configs)]
    for c in configs:
        c.widths = widths
    return configs


def make_layer(config: LayerConfig, device: torch.device | str = "cpu") -> Layer:
    return layer_class(config.kind)(config, device)


def check_kinds(cfg: "Config") -> list[str]:
    """Validates `model.cell` against each kind's own rules; returns the kind per layer."""
    n = len(cfg.model.hidden)
    given = [k.strip() for k in cfg.model.cell.split(",")]
    if len(given) not in (1, n):
        raise ConfigError(f"model.cell lists {len(given)} kinds for {n} layers; give one kind "
                          f"for all or one per layer, e.g. model.cell=ae or ae,dae,ae")
    kinds = cell_kinds(cfg)
    bad = [k for k in kinds if k not in kind_names()]
    if bad:
        raise ConfigError(f"model.cell has unknown kinds {sorted(set(bad))}; choose from "
                          f"{', '.join(kind_names())}")
    classes = [KINDS[k] for k in kinds]
    algorithm = cfg.train.algorithm
    refused = sorted({k for k, c in zip(kinds, classes) if algorithm not in c.algorithms})
    if refused and algorithm == "supervised":
        raise ConfigError("UFF cells learn without labels; set train.algorithm = "
                          "'unsupervised' (with train.negatives = 'none')")
    if refused:
        allowed = sorted({a for k in refused for a in KINDS[k].algorithms})
        raise ConfigError(f"layer kind(s) {refused} train under train.algorithm = "
                          f"{' or '.join(allowed)}, not {algorithm!r}; set model.cell to a "
                          f"kind of that algorithm (e.g. 'pepita' for train.algorithm = "
                          f"'pepita', 'oneclass' for 'oneclass', 'ff' or a UFF cell "
                          f"otherwise)")
    if cfg.model.collaboration != "none" and not all(c.collaborative for c in classes):
        raise ConfigError("collaborative FF needs FF-goodness layers only; set "
                          "model.collaboration = 'none' with UFF cells")
    if cfg.train.negatives == "none" and any(c.needs_negatives for c in classes):
        raise ConfigError("FF-goodness layers (model.cell 'ff') need negatives; set "
                          "train.negatives = 'hybrid', or make every layer a UFF cell")
    for cls in dict.fromkeys(classes):
        cls.check_config(cfg)
    for i, cls in enumerate(classes):
        if cls.image_input and i > 0 and not classes[i - 1].image_input:
            raise ConfigError(f"layer {i} is a {kinds[i]} cell after a {kinds[i - 1]!r} layer, "
                              f"which has no image shape; put conv-ae/conv-dae cells first")
    return kinds
