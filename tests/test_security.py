"""Secure by default: workers listen on loopback, an exposed worker or driver needs a
token or mutual TLS (or an explicit --insecure), and a driver waiting for a worker says
so while it waits."""

from __future__ import annotations

import logging
import subprocess
import sys
import time

import pytest

from fedff import config
from fedff.cli import build_parser, main
from fedff.data.datasets import load_digits
from fedff.engine.network import InputSpec
from fedff.wire.link import PeerError
from fedff.wire.security import Security, SecurityError, check_exposure, is_loopback

DIGITS = load_digits()
SPEC = InputSpec(DIGITS.features, DIGITS.image_shape, DIGITS.num_classes)


@pytest.mark.parametrize("address,loopback", [
    ("127.0.0.1:7001", True), ("127.3.2.1:1", True), ("localhost:7001", True),
    ("[::1]:7001", True), ("0.0.0.0:7001", False), ("[::]:7001", False),
    ("10.0.0.5:7001", False), ("hostA:7001", False),
])
def test_only_this_machines_addresses_count_as_loopback(address, loopback):
    assert is_loopback(address) is loopback


def test_the_worker_listens_on_loopback_unless_told_otherwise():
    args = build_parser().parse_args(["worker"])
    assert args.listen == "127.0.0.1:7001" and not args.insecure


def test_an_exposed_worker_without_credentials_is_refused_with_the_fix(capsys):
    assert main(["worker", "--listen", "0.0.0.0:0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fedff: error: serving on 0.0.0.0:0")
    for fix in ("--token-file", "--mtls", "--insecure", "loopback"):
        assert fix in err


def worker_process(tmp_path, *flags: str) -> tuple[subprocess.Popen, str]:
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-m", "fedff", "worker", "--listen", "0.0.0.0:0",
                             "--ready-file", str(ready), *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "worker did not start"
        time.sleep(0.1)
    return proc, ready.read_text().strip()


@pytest.mark.parametrize("credentials", ["token", "insecure"])
def test_an_exposed_worker_serves_with_a_token_or_with_insecure_and_a_warning(tmp_path,
                                                                               credentials):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    flags = ["--token-file", str(token)] if credentials == "token" else ["--insecure"]
    proc, address = worker_process(tmp_path, *flags)
    try:
        assert address.startswith("0.0.0.0:")
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert ("--insecure: serving on 0.0.0.0" in err) is (credentials == "insecure"), err


def test_a_driver_refuses_exposed_workers_without_credentials_before_connecting():
    from fedff.pipeline.driver import Pipeline

    cfg = config.load("digits-ff", ["train.negatives=random"])
    with pytest.raises(SecurityError, match="driving workers at 10.0.0.5:7001 without "
                                            "credentials.*--insecure"):
        Pipeline(cfg, SPEC, ["127.0.0.1:7001", "10.0.0.5:7001"])
    check_exposure(["10.0.0.5:7001"], Security(token="t"), False, "drive")  # a token will do


def test_a_waiting_driver_reports_every_few_seconds_then_fails(monkeypatch, caplog):
    from fedff.pipeline import driver

    monkeypatch.setattr(driver, "REPORT_EVERY", 0.5)
    cfg = config.load("digits-ff", ["train.negatives=random"])
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="fedff.pipeline"):
        with pytest.raises(PeerError, match="127.0.0.1:9 not reachable after 2 s"):
            driver.Pipeline(cfg, SPEC, ["127.0.0.1:9"], connect_timeout=2.0)
    waits = [r.getMessage() for r in caplog.records if "waiting for worker" in r.getMessage()]
    assert len(waits) >= 2 and "127.0.0.1:9" in waits[0] and "TLS flags" in waits[0], waits
    assert time.monotonic() - started < 10
