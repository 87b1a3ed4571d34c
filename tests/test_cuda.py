"""The engine on a CUDA device: the same negatives as on the CPU for a seed, learning, and
checkpoints that move between devices. Skipped where torch sees no GPU (CI has none)."""

import json
import subprocess
import sys

import pytest
import torch

from fedff import config
from fedff.data.datasets import load_digits
from fedff.engine.evaluate import evaluate
from fedff.engine.network import FFNetwork, InputSpec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DIGITS = load_digits()
SPEC = InputSpec(DIGITS.features, DIGITS.image_shape, 10)
SETTINGS = {
    "random": ["train.negatives=random"],
    "hard": ["train.negatives=hard"],
    "hybrid": ["train.algorithm=unsupervised", "train.negatives=hybrid", "train.classify=head"],
    "dae": ["train.algorithm=unsupervised", "train.negatives=none", "model.cell=dae",
            "train.classify=head"],
    "cff-all": ["train.negatives=random", "model.collaboration=all"],
}


def small(*overrides: str) -> config.Config:
    return config.load("digits-ff", ["model.hidden=200,200", "optim.lr=0.002", *overrides])


def train(net: FFNetwork, epochs: int, batches: int | None = None) -> None:
    for epoch in range(epochs):
        net.set_epoch(epoch)
        order = torch.randperm(len(DIGITS.train_y), generator=net.generator)
        for idx in order.split(net.cfg.train.batch_size)[:batches]:
            net.train_batch(DIGITS.train_x[idx], DIGITS.train_y[idx])


def weights(net: FFNetwork) -> list[torch.Tensor]:
    return [t for layer in net.layers for t in layer.state_dict()["module"].values()]


@pytest.mark.parametrize("setting", SETTINGS)
def test_cuda_takes_the_same_steps_as_the_cpu(setting):
    """Same seed, same negatives and masks: after 5 steps the weights agree to float
    rounding; a different draw of negatives would move them far apart."""
    cfg = small(*SETTINGS[setting])
    cpu, gpu = FFNetwork(cfg, SPEC, "cpu"), FFNetwork(cfg, SPEC, "cuda")
    train(cpu, 1, batches=5)
    train(gpu, 1, batches=5)
    for a, b in zip(weights(cpu), weights(gpu)):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-3), (a - b).abs().max()


@pytest.mark.parametrize("setting", ["random", "hard"])
def test_supervised_ff_learns_digits_on_cuda(setting):
    net = FFNetwork(small(*SETTINGS[setting]), SPEC, "cuda")
    train(net, 8)
    result = evaluate(net, DIGITS.test_x, DIGITS.test_y)
    assert result["error_goodness"] < 0.10


def test_cuda_checkpoint_loads_on_the_cpu_and_scores_the_same():
    cfg = small()
    gpu = FFNetwork(cfg, SPEC, "cuda")
    train(gpu, 2)
    cpu = FFNetwork(cfg, SPEC, "cpu")
    cpu.load_state_dict(gpu.state_dict())
    a = evaluate(gpu, DIGITS.test_x, DIGITS.test_y)
    b = evaluate(cpu, DIGITS.test_x, DIGITS.test_y)
    assert abs(a["error_goodness"] - b["error_goodness"]) <= 2 / len(DIGITS.test_y)


def test_cli_trains_on_cuda(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "fedff", "train", "--device", "cuda",
                           "--set", "train.epochs=2", "--out", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["device"].startswith("cuda") and metrics["epochs"] == 2
