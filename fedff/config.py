"""Run configuration: dataclasses, TOML files, named configs and `key=value` overrides.

A config is plain data so it can travel: it is written next to every checkpoint, sent to
remote layer workers and to federation clients. Every value is validated here, once, so
the engine can trust what it receives and a user learns about a typo before training.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import tomllib
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from fedff.config_rules import CHOICES, validate
from fedff.errors import ConfigError
from fedff.layers import registry
from fedff.layers.optim import OptimConfig
from fedff.oneclass.options import OneclassConfig
from fedff.pepita.options import PepitaConfig

__all__ = ["Config", "ConfigError", "OptimConfig", "all_keys", "apply", "from_dict", "load",
           "validate"]


@dataclass
class DataConfig:
    dataset: str = "digits"  # digits (embedded) | mnist | fashion-mnist
    data_dir: str = ""  # "" -> $FEDFF_DATA_DIR, then the download cache
    download: bool = False  # fetch missing files from the public mirrors into the cache
    train_limit: int = 0  # use only the first N training examples (0 = all)
    test_limit: int = 0


@dataclass
class ModelConfig:
    hidden: list[int] = field(default_factory=lambda: [1000, 1000, 1000])
    objective: str = "hinton"  # hinton: positives have high goodness | low: the opposite
    #                            | symba: pairwise, positive above its negative (SymBa)
    threshold_scale: float = 1.0  # theta = threshold_scale * units in the layer
    temperature: float = 1.0
    peer_norm: float = 0.03
    peer_momentum: float = 0.9
    collaboration: str = "none"  # none | earlier (gamma_<k) | all (gamma_{t != k})
    # What each layer is: a kind of fedff.layers.registry, "ff" (FF goodness) or a UFF
    # cell (ae, dae, conv-ae, conv-dae, gan); one kind for every layer, or a comma list
    # with one per layer, e.g. "conv-ae,conv-ae,ae".
    cell: str = "ff"
    cell_noise: float = 0.3  # dae cells: share of inputs zeroed


@dataclass
class TrainConfig:
    algorithm: str = "supervised"  # supervised (label overlay) | unsupervised (hybrid images)
    negatives: str = "hard"  # supervised: random | hard | hard-memory; unsup.: hybrid | none
    # supervised: k different wrong labels per example, k negative rows; their loss is
    # averaged, so k > 1 lowers the negatives' gradient noise for (k + 1) / 2 the compute
    negatives_per_example: int = 1
    epochs: int = 100
    batch_size: int = 100
    seed: int = 0
    device: str = "cpu"  # cpu | cuda | auto
    threads: int = 0  # torch intra-op threads (0 = torch's default)
    hybrid_blur_steps: int = 10
    label_strength: float = 1.0  # value written into the one-hot label pixels
    eval_every: int = 1  # evaluate on the test set every N epochs (and always at the end)
    classify: str = "goodness"  # the reported test_error: goodness (per label) | head
    freeze: list[int] = field(default_factory=list)  # hidden layers that do not learn


@dataclass
class HeadConfig:
    """The linear softmax head read on normalised activities (neutral-label pass)."""

    layers: list[int] = field(default_factory=list)  # [] -> hidden layers >= 2 (sup.) / last 3
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.003


@dataclass
class ProbeConfig:
    """Probes on frozen latents, run after the last epoch (fedff/uff/probe.py).

    On by default for unsupervised networks; `train.classify = "probe"` reports the linear
    probe's error as test_error.
    """

    enabled: bool = True  # unsupervised networks only
    layers: list[int] = field(default_factory=list)  # [] -> every layer, concatenated
    examples: int = 0  # labelled training examples the probe sees (0 = all)
    epochs: int = 20
    batch_size: int = 256
    lr: float = 0.001
    weight_decay: float = 0.0001
    mlp_hidden: int = 0  # > 0: also an MLP probe with one hidden layer this wide
    knn_k: int = 20
    knn_examples: int = 10000  # the k-NN memory bank (0 = all probe examples)


@dataclass
class FederationConfig:
    """A federation of data owners (`fedff simulate`, the Flower apps in fedff.federation).

    A federated run trains `rounds x local_epochs` epochs per client, so train.epochs is
    set to that product (the layers' lr schedules run over the whole federation).
    """

    clients: int = 10  # simulated clients (`fedff simulate`); partitions of the training set
    rounds: int = 10
    local_epochs: int = 1
    fraction_train: float = 1.0  # share of connected clients sampled each round
    fraction_evaluate: float = 1.0  # share asked to evaluate the global model on local data
    min_clients: int = 2  # wait for this many; a round with fewer replies keeps the model
    round_timeout: float = 600.0  # seconds to wait for a round's replies
    connect_timeout: float = 300.0  # seconds to wait for min_clients to connect
    schedule: str = "all"  # all: every layer every round | progressive: one layer at a time
    rounds_per_layer: int = 1  # progressive: rounds each layer trains before it is frozen
    partitioner: str = "iid"  # iid | dirichlet (label skew) | classes (k classes each)
    alpha: float = 0.5  # dirichlet concentration
    classes_per_client: int = 2  # classes partitioner
    client_cpus: float = 1.0  # simulation: CPU cores reserved per running client
    # The coordinator's step on the clients' mean (strategy.ServerOptimizer); 1, 0, 0 is
    # plain FedAvg.
    server_lr: float = 1.0
    server_momentum: float = 0.0
    server_warmup: int = 0  # rounds over which server_lr rises linearly from 1


@dataclass
class Config:
    name: str = "custom"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    pepita: PepitaConfig = field(default_factory=PepitaConfig)
    oneclass: OneclassConfig = field(default_factory=OneclassConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _section_types() -> dict[str, type]:
    return {f.name: f.type for f in fields(Config) if f.name != "name"}


def _fail_unknown(key: str, known: list[str]) -> None:
    """Suggests the key of that name in another section first (train.lr -> optim.lr),
    then the closest spelling among all keys."""
    name = key.rpartition(".")[2]
    same_name = [k for k in known if k.rpartition(".")[2] == name]
    close = same_name or difflib.get_close_matches(key, known, n=1)
    if not close:  # a misspelt field in any section: match on the field names
        fields_ = {k.rpartition(".")[2]: k for k in known}
        close = [fields_[m] for m in difflib.get_close_matches(name, list(fields_), n=1)]
    hint = f" (did you mean '{close[0]}'?)" if close else f"; valid keys: {', '.join(known)}"
    raise ConfigError(f"unknown config key '{key}'{hint}")


def choices(key: str) -> tuple[str, ...]:
    """The values a key may take, where it has a fixed set (layer kinds: the registry)."""
    if key == "model.cell":
        return tuple(registry.kind_names())
    return CHOICES.get(key, ())


def all_keys() -> list[str]:
    keys = ["name"]
    for section in fields(Config):
        if section.name == "name":
            continue
        keys += [f"{section.name}.{f.name}" for f in fields(section.default_factory())]
    return keys


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Converts a TOML or command-line value to the type of the field's default."""
    if isinstance(default, bool):
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        try:
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        except (TypeError, ValueError):
            pass
    elif isinstance(default, float):
        try:
            if not isinstance(value, bool):
                return float(value)
        except (TypeError, ValueError):
            pass
    elif isinstance(default, list):
        items = value
        if isinstance(value, str):
            items = [v for v in value.strip("[]").split(",") if v.strip()]
        try:
            return [int(v) for v in items]
        except (TypeError, ValueError):
            pass
    elif isinstance(default, str):
        return str(value)
    kinds = {bool: "true or false", int: "an integer", float: "a number", list: "a list of "
             "integers such as 1000,1000", str: "a string"}
    raise ConfigError(f"config key '{key}' must be {kinds[type(default)]}, got {value!r}")


def apply(cfg: Config, key: str, value: Any) -> None:
    """Sets `section.field` on cfg, converting and checking the value."""
    if key == "name":
        cfg.name = str(value)
        return
    section_name, _, field_name = key.partition(".")
    known = all_keys()
    if key not in known:
        _fail_unknown(key, known)
    section = getattr(cfg, section_name)
    setattr(section, field_name, _coerce(key, value, getattr(section, field_name)))


def merge(cfg: Config, tree: dict[str, Any], prefix: str = "") -> None:
    for key, value in tree.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            if full not in _section_types():
                _fail_unknown(full, list(_section_types()))
            merge(cfg, value, prefix=f"{full}.")
        else:
            apply(cfg, full, value)


SHAPE_KEYS = ("data.dataset", "model.hidden", "model.cell", "head.layers")


def resumed(cfg: Config, saved: dict[str, Any]) -> tuple[Config, list[str]]:
    """The config a resumed run trains with: the network's shape from the checkpoint's
    config `saved`, every other value from `cfg` (the command line), as nanoGPT does.
    Also returns the shape keys where the two differed."""
    out, changed = copy.deepcopy(cfg), []
    for key in SHAPE_KEYS:
        section, _, name = key.partition(".")
        value = saved.get(section, {}).get(name, getattr(getattr(cfg, section), name))
        if value != getattr(getattr(cfg, section), name):
            changed.append(f"{key}={value!r}")
            setattr(getattr(out, section), name, value)
    return validate(out), changed


def named_configs() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("fedff.configs").iterdir()
                  if p.name.endswith(".toml"))


def load(name_or_path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Builds a Config from a named config or a TOML path, then `key=value` overrides."""
    cfg = Config()
    if name_or_path:
        path = Path(name_or_path)
        if path.suffix == ".toml" or path.exists():
            if not path.is_file():
                raise ConfigError(f"config file '{path}' does not exist; give a TOML file path "
                                  f"or one of the named configs: {', '.join(named_configs())}")
            text = path.read_text()
        elif name_or_path in named_configs():
            text = resources.files("fedff.configs").joinpath(f"{name_or_path}.toml").read_text()
        else:
            raise ConfigError(f"unknown config '{name_or_path}'; named configs: "
                              f"{', '.join(named_configs())} (or give a .toml path)")
        try:
            tree = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config '{name_or_path}' is not valid TOML: {err}") from err
        cfg.name = path.stem if path.suffix == ".toml" else name_or_path
        merge(cfg, tree)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override '{item}' must look like key=value, "
                              f"e.g. --set train.epochs=10")
        apply(cfg, key.strip(), value.strip())
    return validate(cfg)


def from_dict(tree: dict[str, Any]) -> Config:
    cfg = Config()
    merge(cfg, tree)
    return validate(cfg)
