"""The rules a run config must satisfy: fixed choices, ranges, and the combinations that
make sense; `validate` raises ConfigError naming the key and the fix.

Kept apart from fedff/config.py (the dataclasses and how a config is read) because the
rules grow with every algorithm, while the reading does not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedff.errors import ConfigError
from fedff.layers import registry
from fedff.oneclass.objectives import OBJECTIVES

if TYPE_CHECKING:
    from fedff.config import Config

CHOICES: dict[str, tuple[str, ...]] = {
    "data.dataset": ("digits", "mnist", "fashion-mnist"),
    "optim.optimizer": ("sgd", "adam"),
    "optim.schedule": ("half-constant-linear", "constant", "step"),
    "model.objective": ("hinton", "low", "symba", *OBJECTIVES),  # FF | one-class (fedff/oneclass)
    "model.collaboration": ("none", "earlier", "all"),
    "train.algorithm": ("supervised", "unsupervised", "pepita", "oneclass"),
    "pepita.feedback": ("fixed", "mirror"),
    "pepita.modulation": ("minus", "plus"),
    "pepita.last_error": ("pass1", "pass2"),
    "pepita.normalize": ("none", "length"),
    "oneclass.normalize": ("rms", "l2", "none"),
    "oneclass.score": ("last", "sum"),
    "train.negatives": ("random", "hard", "hard-memory", "hybrid", "none"),
    "train.device": ("cpu", "cuda", "auto"),
    "train.classify": ("goodness", "head", "probe"),
    "federation.schedule": ("all", "progressive"),
    "federation.partitioner": ("iid", "dirichlet", "classes"),
}
POSITIVE = ("train.epochs", "train.batch_size", "train.eval_every", "optim.lr", "head.lr",
            "train.negatives_per_example",
            "model.temperature", "model.threshold_scale", "federation.clients",
            "federation.rounds", "federation.local_epochs", "federation.min_clients",
            "federation.round_timeout", "federation.connect_timeout",
            "federation.rounds_per_layer", "federation.alpha",
            "federation.classes_per_client", "federation.client_cpus", "federation.server_lr",
            "probe.epochs", "pepita.f_scale", "optim.decay", "oneclass.nu",
            "probe.batch_size", "probe.lr", "probe.knn_k")
NON_NEGATIVE = ("train.threads", "data.train_limit", "data.test_limit", "train.hybrid_blur_steps",
                "optim.weight_decay", "head.weight_decay", "model.peer_norm",
                "probe.examples", "probe.weight_decay", "probe.mlp_hidden",
                "probe.knn_examples", "federation.server_warmup", "optim.warmup", "pepita.wm_lr",
                "pepita.wm_wd", "pepita.wm_epochs", "pepita.wm_every", "oneclass.normal")
UNIT_INTERVAL = ("optim.momentum", "optim.beta2", "optim.dampening", "head.momentum",
                 "model.peer_momentum",
                 "model.cell_noise", "federation.server_momentum", "pepita.dropout",
                 "oneclass.nu", "oneclass.contamination")


def validate(cfg: Config) -> Config:
    """Checks ranges and combinations; raises ConfigError naming the key and the fix."""
    def get(key: str) -> Any:
        section, _, name = key.partition(".")
        return getattr(getattr(cfg, section), name)

    for key, allowed in CHOICES.items():
        if get(key) not in allowed:
            raise ConfigError(f"config key '{key}' = {get(key)!r} is not valid; "
                              f"choose one of: {', '.join(allowed)}")
    for key in POSITIVE:
        if not get(key) > 0:
            raise ConfigError(f"config key '{key}' must be > 0, got {get(key)!r}")
    for key in NON_NEGATIVE:
        if get(key) < 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {get(key)!r}")
    for key in UNIT_INTERVAL:
        if not 0 <= get(key) < 1:
            raise ConfigError(f"config key '{key}' must be in [0, 1), got {get(key)!r}")
    if not cfg.model.hidden or min(cfg.model.hidden) <= 0:
        raise ConfigError(f"config key 'model.hidden' needs one or more positive layer widths, "
                          f"got {cfg.model.hidden!r}; e.g. --set model.hidden=1000,1000,1000")
    sup = cfg.train.algorithm == "supervised"  # PEPITA's rules: its kind's check_config
    if sup and cfg.train.negatives in ("hybrid", "none"):
        raise ConfigError(f"train.negatives = {cfg.train.negatives!r} needs train.algorithm = "
                          f"'unsupervised'; use random, hard or hard-memory for supervised FF")
    elif cfg.train.algorithm == "unsupervised" and cfg.train.negatives not in ("hybrid", "none"):
        raise ConfigError(f"train.algorithm = 'unsupervised' makes negatives from hybrid images "
                          f"(or none, for UFF cells); set train.negatives = 'hybrid' or 'none' "
                          f"(got {cfg.train.negatives!r})")
    check_negatives_per_example(cfg)
    registry.check_kinds(cfg)
    if cfg.train.algorithm == "unsupervised" and cfg.train.classify == "goodness":
        raise ConfigError("unsupervised FF has no label overlay to score per label; "
                          "set train.classify = 'head' or 'probe'")
    if cfg.train.classify == "probe" and (sup or not cfg.probe.enabled):
        raise ConfigError("train.classify = 'probe' reports the linear probe of an "
                          "unsupervised network; set train.algorithm = 'unsupervised' and "
                          "probe.enabled = true")
    bad = [i for i in cfg.probe.layers if not 0 <= i < len(cfg.model.hidden)]
    if bad:
        raise ConfigError(f"config key 'probe.layers' has layer indices {bad} outside "
                          f"0..{len(cfg.model.hidden) - 1}")
    for key in ("federation.fraction_train", "federation.fraction_evaluate"):
        if not 0 <= get(key) <= 1:
            raise ConfigError(f"config key '{key}' must be in [0, 1], got {get(key)!r}")
    if cfg.federation.fraction_train == 0:
        raise ConfigError("config key 'federation.fraction_train' = 0 trains nobody; "
                          "give a share in (0, 1]")
    n = len(cfg.model.hidden)
    bad = [i for i in cfg.train.freeze if not 0 <= i < n]
    if bad:
        raise ConfigError(f"config key 'train.freeze' has layer indices {bad} outside "
                          f"0..{n - 1} (indices count hidden layers from 0)")
    bad = [i for i in cfg.head.layers if not 0 <= i < n]
    if bad:
        raise ConfigError(f"config key 'head.layers' has layer indices {bad} outside 0..{n - 1} "
                          f"(indices count hidden layers from 0)")
    return cfg


def check_negatives_per_example(cfg: Config) -> None:
    k = cfg.train.negatives_per_example
    if k == 1:
        return
    if cfg.train.algorithm != "supervised":
        raise ConfigError(f"train.negatives_per_example = {k} draws k wrong labels per "
                          f"example, which only supervised FF has; set it to 1")
    if cfg.model.objective == "symba":
        raise ConfigError(f"model.objective = 'symba' pairs each positive with one negative; "
                          f"set train.negatives_per_example = 1 (got {k})")
    if k > 9:  # the digit datasets' 10 classes leave 9 wrong labels
        raise ConfigError(f"train.negatives_per_example = {k}: an example has only 9 wrong "
                          f"labels to draw from; choose 1..9")
