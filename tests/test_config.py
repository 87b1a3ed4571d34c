import pytest

from fedff import config
from fedff.config import ConfigError


@pytest.mark.parametrize("name", config.named_configs())
def test_every_named_config_loads(name):
    cfg = config.load(name)
    assert cfg.name == name
    assert cfg.model.hidden


def test_overrides_convert_types():
    cfg = config.load("mnist-ff-3x1000", ["train.epochs=7", "optim.lr=0.5",
                                          "model.hidden=10,20", "data.download=true"])
    assert (cfg.train.epochs, cfg.optim.lr, cfg.model.hidden, cfg.data.download) == \
        (7, 0.5, [10, 20], True)


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.epoch'.*train.epochs"):
        config.load(None, ["train.epoch=3"])


@pytest.mark.parametrize("key,suggested", [("train.lr", "optim.lr"),
                                           ("optim.lrr", "optim.lr"),
                                           ("model.epochs", "train.epochs"),
                                           ("head.peer_nrm", "model.peer_norm")])
def test_unknown_key_suggestions_search_every_section(key, suggested):
    with pytest.raises(ConfigError, match=f"unknown config key '{key}' \\(did you mean "
                                          f"'{suggested}'"):
        config.load(None, [f"{key}=3"])


def test_unknown_section_in_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[trian]\nepochs = 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'trian'.*train"):
        config.load(str(path))


@pytest.mark.parametrize("override,message", [
    ("train.epochs=0", "'train.epochs' must be > 0"),
    ("train.epochs=abc", "'train.epochs' must be an integer"),
    ("train.negatives=fancy", "choose one of: random, hard, hard-memory, hybrid"),
    ("model.hidden=0,3", "positive layer widths"),
    ("optim.momentum=1.5", r"must be in \[0, 1\)"),
    ("head.layers=5", "outside 0..2"),
    ("train.negatives=hybrid", "needs train.algorithm = 'unsupervised'"),
    ("train.epochs", "must look like key=value"),
    ("optim.optimizer=lamb", "choose one of: sgd, adam"),
    ("optim.beta2=1", r"must be in \[0, 1\)"),
])
def test_bad_values_name_the_key_and_fix(override, message):
    with pytest.raises(ConfigError, match=message):
        config.load("mnist-ff-3x1000", [override])


def test_uff_cells_refuse_an_optimizer_they_do_not_use():
    with pytest.raises(ConfigError, match="UFF cells, which train with AdamW"):
        config.load("mnist-uff-dae", ["optim.optimizer=adam"])


def test_unknown_named_config_lists_choices():
    with pytest.raises(ConfigError, match="named configs: .*mnist-ff-3x1000"):
        config.load("mnist-ff-9x9")


def test_round_trip_through_dict():
    cfg = config.load("fashion-cff-3x1000", ["train.seed=3"])
    assert config.from_dict(cfg.to_dict()) == cfg
