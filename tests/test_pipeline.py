"""Layer workers over gRPC: same weights as in-process, crash recovery, bad input, security.

Chains here are real worker processes on this host (fedff.pipeline.launcher), on the
embedded digits, with one torch thread everywhere so that results are bit-for-bit.
"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch

from fedff import config
from fedff.data.datasets import load_digits
from fedff.engine.network import FFNetwork, InputSpec
from fedff.errors import ShapeError
from fedff.pipeline.driver import Pipeline, split_layers
from fedff.pipeline.launcher import LocalChain
from fedff.train import run, train_epoch
from fedff.v1 import worker_pb2 as pb
from fedff.v1 import worker_pb2_grpc as pb_grpc
from fedff.wire.frames import Batch, encode
from fedff.wire.rpc import train_method
from fedff.wire.link import Link, PeerError
from fedff.wire.security import RUN_HEADER, Security
from fedff.worker.server import WorkerServer
from fedff.worker.options import WorkerOptions

DIGITS = load_digits()
SPEC = InputSpec(DIGITS.features, DIGITS.image_shape, DIGITS.num_classes)
REPO = Path(__file__).resolve().parents[1]


def small(*overrides: str) -> config.Config:
    return config.load("digits-ff", ["model.hidden=[48, 40, 32]", "train.epochs=2",
                                     "train.negatives=random", *overrides])


def inprocess_state(cfg) -> dict:
    net = FFNetwork(cfg, SPEC)
    for epoch in range(cfg.train.epochs):
        train_epoch(net, DIGITS, epoch, show=False)
    return net.state_dict()


def chain_state(cfg, root: Path, workers: int = 3, kill_after: int | None = None,
                window: int = 2, victim: int = 1, **chain_kw) -> tuple[dict, LocalChain]:
    with LocalChain(workers, root, window=window, **chain_kw) as chain:
        pipe = Pipeline(cfg, SPEC, chain.addresses, window=window)
        sent = 0
        original = pipe.train_batch

        def counting(x, y, index=None):
            nonlocal sent
            sent += 1
            if sent == kill_after:
                chain.kill(victim)
            return original(x, y, index)

        pipe.train_batch = counting
        try:
            for epoch in range(cfg.train.epochs):
                train_epoch(pipe, DIGITS, epoch, show=False)
            return pipe.state_dict(), chain
        finally:
            pipe.close()


def assert_same_network(a: dict, b: dict) -> None:
    assert len(a["layers"]) == len(b["layers"])
    for la, lb in zip(a["layers"], b["layers"]):
        assert la["steps"] == lb["steps"]  # every batch trained exactly once
        for k in la["module"]:
            assert torch.equal(la["module"][k], lb["module"][k]), k
        assert la["buffers"].keys() == lb["buffers"].keys()  # FF layers: the peer mean
        for k in la["buffers"]:
            assert torch.equal(la["buffers"][k], lb["buffers"][k]), k
    assert torch.equal(a["head"]["linear"]["weight"], b["head"]["linear"]["weight"])
    assert a.keys() - {"pipeline"} == b.keys()
    if "negative_memory" in a:  # hard-memory: the same predictions remembered
        for k in ("probs", "seen"):
            assert torch.equal(a["negative_memory"][k], b["negative_memory"][k]), k


def test_split_layers():
    assert split_layers(3, 3) == [(0, 1), (1, 2), (2, 3)]
    assert split_layers(5, 2) == [(0, 3), (3, 5)]
    with pytest.raises(config.ConfigError, match="needs 1..3 workers"):
        split_layers(3, 4)


@pytest.mark.parametrize("overrides,workers", [
    ((), 3),
    (("train.negatives=hard-memory", "train.epochs=3"), 3),
    (("train.negatives=hard-memory", "train.negatives_per_example=3", "train.epochs=2"), 2),
    (("model.collaboration=earlier",), 2),
    (("train.algorithm=unsupervised", "train.negatives=hybrid", "train.classify=head"), 3),
    (("train.algorithm=unsupervised", "train.negatives=none", "train.classify=head",
      "model.cell=ae,dae,gan", "optim.lr=0.001"), 3),
])
def test_chain_trains_the_same_weights_as_one_process(tmp_path, overrides, workers):
    cfg = small(*overrides)
    piped, _ = chain_state(cfg, tmp_path, workers)
    assert_same_network(piped, inprocess_state(cfg))


def test_cff_all_layers_gets_later_scores_through_the_acks(tmp_path):
    """With a window of 1 the chain is synchronous, so every layer's update sees exactly
    the in-process gamma (up to the order of a three-term float sum). Wider windows
    overlap batches and apply each update when the later layers' scores come back."""
    cfg = small("model.collaboration=all")
    piped, _ = chain_state(cfg, tmp_path, 3, window=1)
    ref = inprocess_state(cfg)
    for la, lb in zip(piped["layers"], ref["layers"]):
        assert la["steps"] == lb["steps"]
        torch.testing.assert_close(la["module"]["weight"], lb["module"]["weight"],
                                   atol=1e-4, rtol=0)


@pytest.mark.parametrize("workers,victim,negatives", [(3, 1, "random"), (2, 0, "random"),
                                                    (3, 2, "hard-memory")])
def test_killed_worker_resumes_with_no_batch_lost_or_repeated(tmp_path, workers, victim,
                                                              negatives):
    """29 batches per epoch; a worker is killed in the middle of the second epoch and
    restarts from its checkpoint (every 5 batches); the chain re-sends what it lost.
    With 2 workers the victim holds two layers, run as two threads (stages.py). The head's
    worker killed under hard-memory negatives: no prediction is lost on the way back."""
    cfg = small("train.epochs=3", f"train.negatives={negatives}")
    piped, chain = chain_state(cfg, tmp_path, workers, kill_after=45, checkpoint_every=5,
                               victim=victim)
    w = chain.workers[victim]
    assert w.restarts == 1 and w.history == [-signal.SIGKILL]
    assert "resumed from" in w.log_file.read_text()
    assert_same_network(piped, inprocess_state(cfg))


def test_pipeline_run_writes_outputs_and_eval_matches(tmp_path):
    cfg = small()
    pipes = []
    with LocalChain(2, tmp_path / "w") as chain:
        try:
            summary = run(cfg, tmp_path / "pipe", show_progress=False,
                          build=lambda c, ds, d: pipes.append(Pipeline(c, SPEC, chain.addresses))
                          or pipes[-1])
        finally:
            for p in pipes:
                p.close()
    ref = run(cfg, tmp_path / "ref", show_progress=False)
    for key in ("test_error", "error_head", "error_goodness", "layer_errors"):
        assert summary[key] == ref[key], key
    assert (tmp_path / "pipe" / "checkpoint.pt").exists()


def test_hard_negatives_refused_in_a_chain():
    with pytest.raises(config.ConfigError, match="negatives=hard-memory"):
        Pipeline(config.load("digits-ff"), SPEC, ["127.0.0.1:1"])


# -- one worker in this process: malformed input, credentials ----------------------------


def serve(tmp_path: Path, security: Security = Security(), **kw) -> WorkerServer:
    server = WorkerServer("127.0.0.1:0", WorkerOptions(name="w", checkpoint_dir=tmp_path, **kw),
                          security).start()
    return server


RUN = "test-run"  # the run id a test's calls name (worker/guard.py)
AS_RUN = [(RUN_HEADER, RUN)]  # call metadata


def configure(channel: grpc.Channel, metadata=()) -> pb.WorkerStatus:
    cfg = small()
    setup = {"run": RUN, "config": cfg.to_dict(), "features": SPEC.features, "num_classes": 10,
             "first": 0, "last": 3, "head": True, "downstream": None}
    import json
    return pb_grpc.LayerWorkerStub(channel).Control(
        pb.ControlRequest(command=pb.CONFIGURE, config_json=json.dumps(setup)), timeout=10,
        metadata=metadata)


def train_call(channel: grpc.Channel, batches: list[Batch], chunk_bytes: int = 2**20):
    frames = [f for b in batches for f in encode(b, chunk_bytes)]
    return list(train_method(channel)(iter(frames), timeout=20, metadata=AS_RUN))


def good_batch(batch_id: int) -> Batch:
    x = torch.rand(8, SPEC.features)
    return Batch(batch_id=batch_id, kind=pb.TRAIN, n_pos=4,
                 tensors={"x": x, "labels": torch.arange(4)})


@pytest.mark.parametrize("bad,match", [
    (Batch(batch_id=1, kind=pb.TRAIN, n_pos=4, tensors={"x": torch.rand(8, 63)}),
     r"\[batch, 64\]"),
    (Batch(batch_id=1, kind=pb.TRAIN, n_pos=4,  # half precision is a lighter wire: fine
           tensors={"x": torch.zeros(8, 64, dtype=torch.int64)}), "float32"),
    (Batch(batch_id=1, kind=pb.TRAIN, n_pos=0, tensors={"x": torch.rand(8, 64)}), "n_pos"),
    (Batch(batch_id=7, kind=pb.TRAIN, n_pos=4, tensors={"x": torch.rand(8, 64)}), "in order"),
    (Batch(batch_id=1, kind=pb.TRAIN, n_pos=4, tensors={"y": torch.rand(8, 64)}),
     "no tensor 'x'"),
    (Batch(batch_id=1, kind=pb.TRAIN, n_pos=4, tensors={"x": torch.rand(8, 64),
                                                       "labels": torch.full((4,), 11)}),
     "labels must lie"),
])
def test_malformed_batches_get_invalid_argument_and_worker_keeps_serving(tmp_path, bad, match):
    server = serve(tmp_path)
    try:
        channel = grpc.insecure_channel(server.address)
        configure(channel)
        with pytest.raises(grpc.RpcError) as err:
            train_call(channel, [bad])
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert pytest.importorskip("re").search(match, err.value.details()), err.value.details()
        replies = train_call(channel, [good_batch(1), good_batch(2)])
        assert [r.ack.batch_id for r in replies if r.HasField("ack")] == [1, 2]
        assert server.servicer.block.layers[0].steps == 2  # the bad batch applied nothing
    finally:
        server.stop()


def test_oversize_and_out_of_order_chunks_refused(tmp_path):
    server = serve(tmp_path, max_batch_bytes=10_000)
    try:
        channel = grpc.insecure_channel(server.address)
        configure(channel)
        big = Batch(batch_id=1, kind=pb.TRAIN, n_pos=20, tensors={"x": torch.rand(40, 64)})
        with pytest.raises(grpc.RpcError, match="over this worker's limit") as err:
            train_call(channel, [big])
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        frames = encode(good_batch(1), chunk_bytes=512)
        frames[1], frames[2] = frames[2], frames[1]
        with pytest.raises(grpc.RpcError, match="expected chunk 1"):
            list(train_method(channel)(iter(frames), timeout=20, metadata=AS_RUN))
        assert len(train_call(channel, [good_batch(1)])) == 2  # Ready + ack
    finally:
        server.stop()


def test_token_refused_without_it(tmp_path):
    server = serve(tmp_path, Security(token="s3cret"))
    try:
        channel = grpc.insecure_channel(server.address)
        with pytest.raises(grpc.RpcError) as err:
            configure(channel)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            configure(channel, metadata=[("authorization", "Bearer wrong")])
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert configure(channel, Security(token="s3cret").metadata()).configured
    finally:
        server.stop()


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_dev_certs.py"), "--out",
                    str(out)], check=True, capture_output=True)
    return out


def test_mutual_tls_refuses_peers_without_a_certificate(tmp_path, certs):
    server_sec = Security(ca=certs / "ca.pem", cert=certs / "server.pem",
                          key=certs / "server.key", mutual=True)
    server = serve(tmp_path, server_sec)
    port = server.address.rsplit(":", 1)[1]
    address = f"localhost:{port}"
    try:
        plain = grpc.insecure_channel(address)
        no_cert = Security(ca=certs / "ca.pem").channel(address)
        for channel in (plain, no_cert):
            with pytest.raises(grpc.RpcError) as err:
                configure(channel)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        client = Security(ca=certs / "ca.pem", cert=certs / "client.pem",
                          key=certs / "client.key", mutual=True)
        assert configure(client.channel(address)).configured
    finally:
        server.stop()


def test_tls_chain_end_to_end(tmp_path, certs):
    """Workers talk TLS to each other too: mutual TLS plus a token on every hop."""
    token = tmp_path / "token"
    token.write_text("t0k3n\n")
    flags = ["--tls-ca", str(certs / "ca.pem"), "--tls-cert", str(certs / "server.pem"),
             "--tls-key", str(certs / "server.key"), "--mtls", "--token-file", str(token)]
    sec = Security.from_args(str(certs / "ca.pem"), str(certs / "client.pem"),
                             str(certs / "client.key"), True, str(token))
    cfg = small("train.epochs=1")
    with LocalChain(2, tmp_path / "w", extra_args=flags) as chain:
        addresses = [a.replace("127.0.0.1", "localhost") for a in chain.addresses]
        pipe = Pipeline(cfg, SPEC, addresses, sec)
        try:
            train_epoch(pipe, DIGITS, 0, show=False)
            state = pipe.state_dict()
        finally:
            pipe.close()
    assert_same_network(state, inprocess_state(cfg))


# -- liveness and shutdown ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_missing_downstream_waits_and_reports_instead_of_crashing(caplog):
    link = Link(f"127.0.0.1:{free_port()}", on_ack=lambda a: None, give_up_after=1.5,
                name="up")
    try:
        link.send(good_batch(1))  # queued: the window is not full
        with pytest.raises(PeerError, match="unreachable for .* is the worker running"):
            link.wait_acked(1, timeout=30)
    finally:
        link.close()


def test_an_answer_that_cannot_be_handled_fails_the_sender_at_once():
    """An ack handler that raises (e.g. a malformed error from below in a PEPITA chain)
    ends the link with that error: the sender fails in seconds, not after give_up_after."""
    import importlib.util
    from concurrent import futures

    from fedff.wire.rpc import add_worker_to_server

    spec = importlib.util.spec_from_file_location(
        "bench_pipeline", Path(__file__).resolve().parents[1] / "scripts/bench_pipeline.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    server = grpc.server(futures.ThreadPoolExecutor(4))
    add_worker_to_server(bench.SinkServicer(), server)  # acks every batch
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()

    def on_ack(ack):
        raise ShapeError(f"the answer to batch {ack.batch_id} is malformed")

    link = Link(f"127.0.0.1:{port}", on_ack=on_ack, window=1, give_up_after=600, name="up")
    failures: list[BaseException] = []

    def sender() -> None:  # a send blocks on the full window: before the fix, for ever
        try:
            for i in range(1, 4):
                link.send(good_batch(i))
            link.wait_acked(3, timeout=60)
        except PeerError as e:
            failures.append(e)

    thread = threading.Thread(target=sender, daemon=True)
    try:
        thread.start()
        thread.join(timeout=10)
        assert not thread.is_alive(), "the sender still waits on a link whose handler failed"
        assert len(failures) == 1
        assert "ShapeError: the answer to batch 1 is malformed" in str(failures[0])
    finally:
        link.close()
        server.stop(0)


def port_is_free(address: str) -> bool:
    """A new server could listen there (as gRPC does, with SO_REUSEADDR: connections of
    the stopped worker may linger in TIME_WAIT, which does not hold the port)."""
    host, port = address.rsplit(":", 1)
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, int(port)))
            s.listen()
            return True
        except OSError:
            return False


def test_ctrl_c_stops_every_worker_and_frees_the_ports(tmp_path):
    out = tmp_path / "run"
    driver = [sys.executable, "-m", "fedff", "pipeline", "--local", "3", "--set",
              "train.negatives=random", "--set", "train.epochs=200", "--out", str(out), "--quiet"]
    # As a terminal's foreground job: SIGINT at its default. A shell that started pytest
    # in the background (no job control) made it ignored, and children inherit that.
    as_foreground = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                     "os.execv(sys.argv[1], sys.argv[1:])")
    proc = subprocess.Popen([sys.executable, "-c", as_foreground, *driver],
                            stderr=subprocess.PIPE, start_new_session=True)
    ready = [out / "workers" / f"worker{i}" / "address" for i in range(3)]
    deadline = time.monotonic() + 60
    while not (all(p.exists() for p in ready) and (out / "metrics.json").exists()):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the chain did not start"
        time.sleep(0.1)
    addresses = [p.read_text().strip() for p in ready]
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()[-3000:]
    assert b"restarting" not in err  # the driver stopped the workers; none was restarted
    assert all(port_is_free(a) for a in addresses)
    left = subprocess.run(["pgrep", "-f", str(out / "workers")], capture_output=True, text=True)
    assert left.stdout.strip() == ""


def test_worker_dying_for_good_stops_the_chain_and_fails_the_driver(tmp_path):
    cfg = small("train.epochs=50")
    with pytest.raises(PeerError, match="died"):
        with LocalChain(3, tmp_path / "w", max_restarts=0) as chain:
            pipe = Pipeline(cfg, SPEC, chain.addresses)
            chain.on_failure = pipe.abort
            chain.kill(2)
            try:
                for epoch in range(cfg.train.epochs):
                    train_epoch(pipe, DIGITS, epoch, show=False)
            finally:
                pipe.close()
    assert all(w.process.poll() is not None for w in chain.workers)


def test_resumed_pipeline_run_continues_exactly(tmp_path):
    """A driver restarted with --resume pushes its checkpoint into a fresh chain."""
    from fedff.pipeline.driver import ChainOptions, run_pipeline

    out = tmp_path / "run"
    options = ChainOptions(local=3, checkpoint_every=5)
    run_pipeline(small("train.epochs=1"), out, options, show_progress=False)
    run_pipeline(small("train.epochs=2"), out, options, show_progress=False, resume=True)
    saved = torch.load(out / "checkpoint.pt", weights_only=False)
    assert [r["epoch"] for r in saved["history"]] == [1, 2]
    assert_same_network(saved["network"], inprocess_state(small("train.epochs=2")))


def test_cli_refuses_hard_negatives_before_starting_workers(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fedff", "pipeline", "--local", "3",
                           "--out", str(tmp_path / "run")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.negatives=hard-memory" in lines[0]
    assert not (tmp_path / "run" / "workers").exists()


def test_forward_and_state_rpcs(tmp_path):
    """Forward is inference on the worker's block; GetState/SetState move its full state."""
    from fedff.wire.frames import Assembler
    from fedff.wire.rpc import forward_method
    from fedff.wire.state import state_chunks

    server = serve(tmp_path)
    try:
        channel = grpc.insecure_channel(server.address)
        configure(channel)
        train_call(channel, [good_batch(1), good_batch(2)])
        x = torch.rand(5, SPEC.features)
        frames = encode(Batch(batch_id=1, kind=pb.EVAL, tensors={"x": x}))
        assembler, got = Assembler(), None
        for frame in forward_method(channel)(iter(frames), timeout=20, metadata=AS_RUN):
            got = assembler.add(frame) or got
        out, scores = server.servicer.block.infer(x)
        assert torch.equal(got.tensors["out"], out) and torch.equal(got.tensors["scores"], scores)

        stub = pb_grpc.LayerWorkerStub(channel)
        data = b"".join(c.data for c in stub.GetState(pb.StateRequest(), timeout=20,
                                                      metadata=AS_RUN))
        state = torch.load(__import__("io").BytesIO(data), weights_only=True)
        assert state["trained_through"] == 2 and len(state["block"]["layers"]) == 3
        train_call(channel, [good_batch(3)])  # move on, then put the old state back
        status = stub.SetState(state_chunks(state), timeout=20, metadata=AS_RUN)
        assert status.trained_through == 2
        restored = server.servicer.block.state_dict()
        for a, b in zip(restored["layers"], state["block"]["layers"]):
            assert torch.equal(a["module"]["weight"], b["module"]["weight"])
    finally:
        server.stop()


def test_a_bf16_wire_halves_the_activation_bytes_and_learns_like_fp32(tmp_path):
    """`--wire-dtype bfloat16`: every hop sends activations as bf16, every layer computes
    in float32 (the codec restores it); labels and goodness sums stay exact.
    `--wire-sparse` (zeros as bits) is lossless: the weights of the fp32 wire, bit for bit,
    from fewer bytes."""
    from fedff.engine.evaluate import evaluate

    cfg = small("train.epochs=2")
    results = {}
    for wire, sparse in (("float32", False), ("bfloat16", False), ("float32", True)):
        servers = [serve(tmp_path / f"{wire}{sparse}" / str(i)) for i in range(2)]
        try:
            pipe = Pipeline(cfg, SPEC, [s.address for s in servers], wire_dtype=wire,
                            wire_sparse=sparse)
            for epoch in range(cfg.train.epochs):
                train_epoch(pipe, DIGITS, epoch, show=False)
            error = evaluate(pipe, DIGITS.test_x, DIGITS.test_y)["error_goodness"]
            hop = servers[0].servicer.core.link
            results[wire, sparse] = (pipe.link.bytes_sent, hop.bytes_sent, error,
                                     pipe.state_dict())
            assert hop.wire_dtype == wire and hop.wire_sparse == sparse  # the whole chain's
            pipe.close()
        finally:
            for s in servers:
                s.stop()
    (d32, h32, e32, w32), (d16, h16, e16, _) = results["float32", False], results["bfloat16", False]
    assert 0.5 <= h16 / h32 < 0.52  # worker -> worker: activations (labels are tiny)
    assert 0.5 <= d16 / d32 < 0.6  # driver -> worker: examples halve, labels do not
    assert abs(e16 - e32) < 0.03, (e32, e16)
    ds, hs, es, ws = results["float32", True]
    assert hs < 0.8 * h32 and ds < 0.8 * d32, (hs / h32, ds / d32)
    assert es == e32
    assert_same_network(ws, {k: v for k, v in w32.items() if k != "pipeline"})
