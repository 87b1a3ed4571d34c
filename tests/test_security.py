"""Secure by default: workers listen on loopback, an exposed worker or driver needs a
token or mutual TLS (or an explicit --insecure), and a driver waiting for a worker says
so while it waits."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time

import pytest
import torch

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
    from test_pipeline import AS_RUN, configure, good_batch, serve, train_call

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
                    reply = call(request, timeout=10, metadata=AS_RUN)
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
    from test_pipeline import RUN, configure, serve

    def setup(hidden: list[int]) -> str:
        cfg = config.load("digits-ff", ["train.negatives=random", f"model.hidden={hidden}"])
        return json.dumps({"run": RUN, "config": cfg.to_dict(), "features": 64, "num_classes": 10,
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


# -- authorisation beyond the token: run binding, downstream allow-list, bounded logs ------
def _two_workers(tmp_path, **first_options):
    """Two in-process workers on loopback that outlive a driver (remote workers)."""
    from test_pipeline import serve

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    return serve(tmp_path / "a", **first_options), serve(tmp_path / "b")


def test_a_worker_serves_only_its_run_until_an_explicit_reset(tmp_path):
    import grpc

    from fedff.pipeline.driver import Pipeline
    from fedff.v1 import worker_pb2 as pb
    from fedff.v1 import worker_pb2_grpc as pb_grpc
    from fedff.wire.security import RUN_HEADER
    from fedff.engine.network import FFNetwork
    from test_pipeline import small

    cfg = small("train.epochs=1")
    servers = _two_workers(tmp_path)
    addresses = [s.address for s in servers]
    try:
        first = Pipeline(cfg, SPEC, addresses)
        first.train_batch(DIGITS.train_x[:20], DIGITS.train_y[:20])
        list(first.end_epoch())
        trained = first.state_dict()
        first.close(shutdown_workers=False)

        with pytest.raises(PeerError, match="PERMISSION_DENIED.*serves run "
                                            f"{first.run_id[:12]}.*--reset-workers"):
            Pipeline(cfg, SPEC, addresses)  # another run: refused, nothing changed
        channel = grpc.insecure_channel(addresses[0])
        stub = pb_grpc.LayerWorkerStub(channel)
        for meta in ([], [(RUN_HEADER, "another-run")]):  # reading the weights needs the run
            with pytest.raises(grpc.RpcError) as err:
                list(stub.GetState(pb.StateRequest(), timeout=10, metadata=meta))
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as err:  # nor may a stranger stop it
            stub.Control(pb.ControlRequest(command=pb.SHUTDOWN), timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert stub.Control(pb.ControlRequest(command=pb.STATUS), timeout=10).configured
        channel.close()

        resumed = Pipeline(cfg, SPEC, addresses, run_id=first.run_id)  # the same run goes on
        net = FFNetwork(cfg, SPEC)
        net.load_state_dict(resumed.state_dict())
        assert torch.equal(net.state_dict()["layers"][0]["module"]["weight"],
                           trained["layers"][0]["module"]["weight"])
        resumed.close(shutdown_workers=False)

        second = Pipeline(cfg, SPEC, addresses, reset_workers=True)  # explicit: takes over
        assert second.state_dict()["layers"][0]["steps"] == 0
        for s in servers:
            assert (s.servicer.opt.checkpoint_dir / "previous-run.pt").exists()
            assert s.servicer.core.run == second.run_id
        second.close(shutdown_workers=False)
    finally:
        for s in servers:
            s.stop()


def test_a_resumed_pipeline_run_keeps_its_run_on_remote_workers(tmp_path):
    from fedff.pipeline.driver import ChainOptions, run_pipeline
    from test_pipeline import small

    servers = _two_workers(tmp_path)
    options = ChainOptions(addresses=[s.address for s in servers], keep_workers=True)
    try:
        run_pipeline(small("train.epochs=1"), tmp_path / "run", options, show_progress=False)
        summary = run_pipeline(small("train.epochs=2"), tmp_path / "run", options,
                               show_progress=False, resume=True)
        assert summary["epochs"] == 2
        with pytest.raises(PeerError, match="--reset-workers"):  # a new run is refused
            run_pipeline(small("train.epochs=1"), tmp_path / "other", options,
                         show_progress=False)
    finally:
        for s in servers:
            s.stop()


@pytest.mark.parametrize("flags,downstream,allowed", [
    ({}, "127.0.0.1:{port}", True),  # loopback, the default
    ({}, "attacker.invalid:7001", False),
    ({"allow_downstream": ("hostB:7001",)}, "hostB:7001", True),
    ({"allow_downstream": ("hostB:7001",)}, "127.0.0.1:{port}", False),
    ({"next_address": "127.0.0.1:{port}"}, "attacker.invalid:7001", True),  # --next decides
])
def test_activations_go_only_where_the_operator_allows(tmp_path, flags, downstream, allowed):
    import grpc

    from fedff.v1 import worker_pb2 as pb
    from fedff.v1 import worker_pb2_grpc as pb_grpc
    from test_pipeline import serve, small

    last = serve(tmp_path / "b")
    port = last.address.rsplit(":", 1)[1]
    options = {k: (v.format(port=port) if isinstance(v, str) else v) for k, v in flags.items()}
    first = serve(tmp_path / "a", **options)
    setup = {"run": "r1", "config": small().to_dict(), "features": SPEC.features,
             "num_classes": 10, "first": 0, "last": 1, "head": False,
             "downstream": downstream.format(port=port)}
    channel = grpc.insecure_channel(first.address)
    stub = pb_grpc.LayerWorkerStub(channel)
    request = pb.ControlRequest(command=pb.CONFIGURE, config_json=json.dumps(setup))
    try:
        if allowed:
            status = stub.Control(request, timeout=10)
            assert status.configured and first.servicer.core.run == "r1"
            assert status.downstream == (options.get("next_address") or setup["downstream"])
        else:
            with pytest.raises(grpc.RpcError) as err:
                stub.Control(request, timeout=10)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert f"--next {setup['downstream']}" in err.value.details()
            assert first.servicer.block is None  # nothing was built
    finally:
        channel.close()
        first.stop()
        last.stop()


def test_refusals_are_logged_once_per_host_and_interval(caplog):
    import grpc

    from fedff.worker.guard import RefusalLog

    log = logging.getLogger("fedff.test.refusals")
    refusals = RefusalLog(log, "w", every=0.5, burst=3)
    with caplog.at_level(logging.WARNING, logger="fedff.test.refusals"):
        for i in range(1000):  # one host, many connections
            refusals.note(f"ipv4:10.0.0.5:{40000 + i}", grpc.StatusCode.INVALID_ARGUMENT, "bad")
        for host in range(50):  # many hosts: the burst bound holds
            refusals.note(f"ipv4:10.0.1.{host}:1", grpc.StatusCode.INVALID_ARGUMENT, "bad")
        time.sleep(0.6)
        refusals.note("ipv4:10.0.0.5:1", grpc.StatusCode.INVALID_ARGUMENT, "bad")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4 and refusals.refused == 1051
    assert lines[0] == "w: refused INVALID_ARGUMENT from ipv4:10.0.0.5: bad"
    assert "(and 999 more since the last line)" in lines[-1]
