import json
import subprocess
import sys

import pytest
import torch

from fedff.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedff", *args], capture_output=True,
                          text=True, timeout=300)


def test_train_writes_every_output_and_eval_reproduces_it(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--set", "train.epochs=3", "--set", "model.hidden=100,100",
                 "--out", str(out), "--quiet"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 3 and metrics["train_seconds"] > 0
    assert 0 <= metrics["test_error"] < 0.5
    assert [r["epoch"] for r in metrics["history"]] == [1, 2, 3]
    csv_lines = (out / "metrics.csv").read_text().splitlines()
    assert len(csv_lines) == 4 and "test_error" in csv_lines[0]
    assert (out / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert main(["eval", str(out / "checkpoint.pt")]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["test_error"] == pytest.approx(metrics["test_error"])


def test_resume_continues_from_the_checkpoint(tmp_path, capsys):
    out = str(tmp_path / "run")
    common = ["--set", "model.hidden=50,50", "--out", out, "--quiet"]
    assert main(["train", "--set", "train.epochs=2", *common]) == 0
    assert main(["train", "--set", "train.epochs=3", "--resume", *common]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [r["epoch"] for r in metrics["history"]] == [1, 2, 3]
    # extending the run applies the 3-epoch schedule: the same weights as 3 epochs straight
    straight = str(tmp_path / "straight")
    assert main(["train", "--set", "train.epochs=3", "--set", "model.hidden=50,50", "--out",
                 straight, "--quiet"]) == 0
    resumed = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["network"]
    direct = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)["network"]
    for a, b in zip(resumed["layers"], direct["layers"]):
        assert torch.equal(a["module"]["weight"], b["module"]["weight"])


@pytest.mark.parametrize("args,message", [
    (["train", "--quiet", "--set", "train.epoch=2"],
     "unknown config key 'train.epoch' (did you mean"),
    (["train", "--quiet", "--set", "train.batch_size=-1"], "'train.batch_size' must be > 0"),
    (["train", "--quiet", "--config", "mnist-ff-3x1000", "--data-dir", "/nonexistent"],
     "not found (looked in /nonexistent/mnist"),
    (["eval", "/nonexistent/checkpoint.pt"], "checkpoint /nonexistent/checkpoint.pt not found"),
    (["eval", "/etc/passwd"], "/etc/passwd is not a fedff checkpoint"),
])
def test_bad_input_is_one_line_naming_problem_and_fix(args, message, tmp_path, monkeypatch):
    monkeypatch.delenv("FEDFF_DATA_DIR", raising=False)
    monkeypatch.setenv("FEDFF_CACHE_DIR", str(tmp_path))  # the subprocess inherits both
    result = run_cli(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedff: error: ")
    assert message in lines[0]


def test_help_documents_every_option_of_every_subcommand():
    """Every option of every subcommand has a help text and shows in `--help` (the
    local launcher's private --exit-with-parent aside)."""
    import argparse

    from fedff.cli import build_parser

    commands = next(a for a in build_parser()._actions
                    if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == {"train", "simulate", "pipeline", "worker", "eval", "score",
                             "reproduce", "configs"}
    for name, parser in commands.items():
        text = parser.format_help()
        for action in parser._actions:
            if not action.option_strings or action.dest == "help":
                continue
            if action.help == argparse.SUPPRESS:
                assert action.dest == "exit_with_parent", (name, action.dest)
                continue
            assert action.help, (name, action.option_strings)
            assert action.option_strings[0] in text, (name, action.option_strings)


def test_configs_lists_named_configs_and_keys(capsys):
    assert main(["configs"]) == 0
    assert "mnist-ff-3x1000" in capsys.readouterr().out
    assert main(["configs", "--keys"]) == 0
    assert "train.epochs = 100" in capsys.readouterr().out


@pytest.mark.parametrize("where", [[], ["pipeline", "--local", "2",
                                        "--set", "train.negatives=random"]],
                         ids=["in-process", "chain"])
def test_resume_takes_shapes_from_the_checkpoint_and_hyperparameters_from_the_command_line(
        tmp_path, where):
    command = where[:3] if where else ["train"]
    extra = where[3:]
    out = ["--out", str(tmp_path / "run"), "--quiet", "--set", "optim.schedule=constant",
           *extra]
    assert main([*command, "--set", "train.epochs=1", "--set", "model.hidden=50,50",
                 *out]) == 0
    with pytest.warns(UserWarning, match="model.hidden=\\[50, 50\\]"):
        assert main([*command, "--resume", "--set", "train.epochs=2", "--set",
                     "model.hidden=9,9", "--set", "optim.lr=0.003", "--set",
                     "optim.momentum=0.5", "--set", "head.lr=0.07", *out]) == 0
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["network"]
    assert [layer["module"]["weight"].shape[0] for layer in saved["layers"]] == [50, 50]
    for layer in saved["layers"]:
        group = layer["optimizers"]["main"]["param_groups"][0]
        assert (group["lr"], group["momentum"]) == (0.003, 0.5)
        assert layer["config"]["optim"]["lr"] == 0.003
    assert saved["head"]["optimizer"]["param_groups"][0]["lr"] == 0.07
