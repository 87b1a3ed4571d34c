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


def test_undecodable_bytes_get_invalid_argument_on_every_rpc_and_change_nothing(tmp_path):
    import grpc
    import torch

    from fedff.v1 import worker_pb2 as pb
    from fedff.v1 import worker_pb2_grpc as pb_grpc
    from fedff.wire.rpc import SERVICE
    from test_pipeline import configure, good_batch, serve, train_call

    server = serve(tmp_path)
    channel = grpc.insecure_channel(server.address)
    try:
        configure(channel)
        before = {k: v.clone() for k, v in server.servicer.block.layers[0].module.state_dict()
                  .items()}
        garbage = [b"\xff\xff\xff\xff", b"\x0a\xff\x01", bytes(range(256)) * 4]
        kinds = {"Control": channel.unary_unary, "GetState": channel.unary_stream,
                 "SetState": channel.stream_unary, "Train": channel.stream_stream,
                 "Forward": channel.stream_stream}
        for method, kind in kinds.items():
            call = kind(f"/{SERVICE}/{method}")  # no serializer: the bytes go as they are
            for raw in garbage:
                request = raw if method in ("Control", "GetState") else iter([raw])
                with pytest.raises(grpc.RpcError) as err:
                    reply = call(request, timeout=10)
                    list(reply) if method in ("GetState", "Train", "Forward") else reply
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, raw[:4])
                assert "not a valid fedff.v1 message" in err.value.details()
        after = server.servicer.block.layers[0].module.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        status = pb_grpc.LayerWorkerStub(channel).Control(pb.ControlRequest(command=pb.STATUS),
                                                          timeout=10)
        assert status.configured and status.trained_through == 0
        replies = train_call(channel, [good_batch(1)])
        assert any(r.ack.batch_id == 1 for r in replies if r.HasField("ack"))
    finally:
        channel.close()
        server.stop()


def test_sigterm_stops_a_worker_within_seconds_after_hundreds_of_bad_messages(tmp_path):
    import signal

    import grpc

    from fedff.wire.rpc import SERVICE

    log = open(tmp_path / "worker.log", "w")  # a file: a full pipe would block the worker
    proc = subprocess.Popen([sys.executable, "-m", "fedff", "worker", "--listen", "127.0.0.1:0",
                             "--ready-file", str(tmp_path / "ready"), "--checkpoint-dir",
                             str(tmp_path / "ckpt")],
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "ready").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        channel = grpc.insecure_channel((tmp_path / "ready").read_text().strip())
        calls = [channel.unary_unary(f"/{SERVICE}/Control"),
                 channel.stream_stream(f"/{SERVICE}/Train"),
                 channel.stream_unary(f"/{SERVICE}/SetState"),
                 channel.stream_stream(f"/{SERVICE}/Forward")]
        codes = set()
        for i in range(300):
            call, raw = calls[i % 4], bytes([i % 251]) * (1 + i % 7)
            try:
                reply = call(raw if i % 4 == 0 else iter([raw, raw]), timeout=5)
                if i % 4 in (1, 3):
                    list(reply)
            except grpc.RpcError as e:
                codes.add(e.code())
        channel.close()
        assert grpc.StatusCode.INTERNAL not in codes, codes
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        assert time.monotonic() - started < 10 and proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    text = (tmp_path / "worker.log").read_text()
    assert text.count("Traceback") == 0, text[-2000:]
    assert len(text.splitlines()) < 200, len(text.splitlines())  # was a traceback per message


def test_a_configure_larger_than_max_params_is_refused_before_anything_is_allocated(tmp_path):
    import json

    import grpc

    from fedff.memory import rss_mb
    from fedff.v1 import worker_pb2 as pb
    from fedff.v1 import worker_pb2_grpc as pb_grpc
    from test_pipeline import configure, serve

    def setup(hidden: list[int]) -> str:
        cfg = config.load("digits-ff", ["train.negatives=random", f"model.hidden={hidden}"])
        return json.dumps({"config": cfg.to_dict(), "features": 64, "num_classes": 10,
                           "first": 0, "last": len(hidden), "head": True, "downstream": None})

    server = serve(tmp_path, max_params=200_000)
    channel = grpc.insecure_channel(server.address)
    stub = pb_grpc.LayerWorkerStub(channel)
    try:
        configure(channel)  # a small block: accepted
        before = rss_mb()
        for hidden in ([100_000, 100_000], [500, 500]):  # 1e10 parameters; 0.28 M > 0.2 M
            with pytest.raises(grpc.RpcError) as err:
                stub.Control(pb.ControlRequest(command=pb.CONFIGURE, config_json=setup(hidden)),
                             timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "more than this worker's --max-params 200,000" in err.value.details()
        assert rss_mb() - before < 50
        status = stub.Control(pb.ControlRequest(command=pb.STATUS), timeout=10)
        assert status.configured and status.last_layer == 3  # the accepted block stays
    finally:
        channel.close()
        server.stop()
