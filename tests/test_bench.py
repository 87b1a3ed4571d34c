"""scripts/bench_ff.py as a user runs it: a table on stdout, the same figures in JSON, and
each block's MFU taken against the roof samples on either side of that block."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def test_bench_ff_prints_a_table_and_writes_paired_mfu(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_ff.py"), "--threads", "1",
         "--steps", "2", "--blocks", "2", "--variants", "ff-random (3x1000)", "--out", str(out)],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "ff-random (3x1000)" in run.stdout and "MFU" in run.stdout
    result = json.loads(out.read_text())
    roofs = result["roof_samples"]
    row = result["variants"]["ff-random (3x1000)"]
    assert len(roofs) == 3 and len(row["block_seconds"]) == 2  # before, then after each
    for i, seconds in enumerate(row["block_seconds"]):
        gflops = row["gflop_per_batch"] * 2 / seconds
        assert row["block_mfu"][i] == pytest.approx(gflops / ((roofs[i] + roofs[i + 1]) / 2))
    assert row["mfu"] == statistics.median(row["block_mfu"])
    assert 0 < row["mfu"] < 2 and result["peak_rss_mb"] > 0
    # FLOPs from the shapes: 3 x 1000 on 784 inputs, 200 rows forward + weight gradient,
    # the 100-row neutral pass, the head (2000 -> 10) forward + weight gradient
    per_row = 2 * (784 * 1000 + 1000 * 1000 + 1000 * 1000)
    expected = 200 * per_row * 2 + 100 * per_row + 100 * 2 * 2000 * 10 * 2
    assert row["gflop_per_batch"] * 1e9 == pytest.approx(expected)


def test_bench_wire_counts_the_bytes_each_hop_sends(tmp_path):
    """digits, 3 x 48/40/32, batch 100 (50 + 50 rows of 64 features): the driver sends the
    examples (float) and labels, wrong labels (int64); each worker its activations,
    neutral rows and head taps. bf16 halves the float bytes and nothing else; the sparse
    wire sends fewer (digits are about half zeros, as are ReLU outputs)."""
    out = tmp_path / "wire.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_wire.py"), "--config", "digits-ff",
         "--set", "model.hidden=[48, 40, 32]", "--set", "train.negatives=random",
         "--set", "train.batch_size=50", "--batches", "3",
         "--wires", "float32,bfloat16,float32+sparse",
         "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "driver->w0" in run.stdout and "bfloat16" in run.stdout
    fp32, bf16, sparse = json.loads(out.read_text())["rows"]
    assert fp32["bytes_per_sample"][0] == 64 * 4 + 2 * 8  # example, label, wrong label
    assert bf16["bytes_per_sample"][0] == 64 * 2 + 2 * 8
    # worker 0 -> 1: 2 rows (positive, negative) of 48, a neutral row, and the label
    assert fp32["bytes_per_sample"][1] == (2 + 1) * 48 * 4 + 8
    assert bf16["bytes_per_sample"][1] == (2 + 1) * 48 * 2 + 8
    for hop in range(3):
        assert sparse["bytes_per_sample"][hop] < 0.8 * fp32["bytes_per_sample"][hop]


def test_bench_time_to_accuracy_reports_when_the_validation_target_is_first_met(tmp_path):
    out = tmp_path / "tta.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_time_to_accuracy.py"),
         "--configs", "digits-ff", "--seeds", "0,1",
         "--validation", "300", "--target", "0.7", "--max-epochs", "3", "--threads", "1",
         "--out", str(out)], capture_output=True, text=True, timeout=300,
        env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"})
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    for r in result["runs"]:
        first = next(c for c in r["curve"] if c["val_error"] <= 0.7)  # the first epoch at it
        assert r["reached"]["epoch"] == first["epoch"]
        assert r["reached"]["seconds"] == first["seconds"] > 0
        assert 0 <= r["reached"]["test_error"] <= 1 and len(r["curve"]) == 3
        assert r["torch_threads"] == 1  # --threads reached torch (not OMP_NUM_THREADS)
        assert {"error_goodness", "error_head"} <= r["curve"][0].keys()
    row = result["rows"][0]
    assert row["epoch_to_target"] == statistics.median(r["reached"]["epoch"]
                                                       for r in result["runs"])
    assert out.with_suffix(".png").stat().st_size > 5_000 and "target" in run.stdout
    # a search run as separate processes: one table of both files' runs, nothing trained
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"runs": [
        {**result["runs"][0], "label": "digits-ff@optim.lr=0.01", "seed": 5},
        {**result["runs"][0], "unfinished": True}]}))
    merged = tmp_path / "merged.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_time_to_accuracy.py"),
         "--merge", str(out), str(other), "--target", "0.7", "--out", str(merged)],
        capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(merged.read_text())["rows"]
    assert [(r["label"], r["seeds"]) for r in rows] == [
        ("digits-ff", [0, 1]), ("digits-ff@optim.lr=0.01", [5])]  # the unfinished run left out


def test_the_validation_split_is_held_out_of_training():
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_time_to_accuracy import split
    from fedff.data.datasets import load_digits

    ds = load_digits()
    train, val_x, _ = split(ds, 300)
    assert train.train_x.shape[0] + 300 == ds.train_x.shape[0]
    rows = {tuple(r.tolist()) for r in train.train_x}
    assert not any(tuple(r.tolist()) in rows for r in val_x[:50] if
                   (ds.train_x == r).all(1).sum() == 1)  # unique images never in both
    assert torch.equal(split(ds, 300)[1], val_x)  # the same split every time


def test_the_link_relay_delays_each_direction_and_passes_every_byte():
    """bench_link.py's --delay relay (for kernels without sch_netem): a round trip through
    it takes twice the one-way delay, and a stream larger than its budget arrives whole
    and in order."""
    import asyncio
    import socket
    import time

    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_link

    async def echo(reader, writer):
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        writer.close()

    async def main() -> tuple[list[float], bytes, bytes]:
        target = await asyncio.start_server(echo, "127.0.0.1", 0)
        with socket.socket() as s:  # a free port for the relay
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        relay = asyncio.create_task(bench_link.relay(
            port, f"127.0.0.1:{target.sockets[0].getsockname()[1]}", 25.0, "100mbit"))
        await asyncio.sleep(0.2)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        trips = []
        for _ in range(3):
            start = time.perf_counter()
            writer.write(b"x")
            await writer.drain()
            await reader.readexactly(1)
            trips.append(time.perf_counter() - start)
        blob = os.urandom(3 << 20)  # over 10 times the relay's 256 KiB budget
        writer.write(blob)
        await writer.drain()
        back = await reader.readexactly(len(blob))
        writer.close()
        relay.cancel()
        target.close()
        return trips, blob, back

    trips, blob, back = asyncio.run(main())
    assert all(0.050 <= t < 0.5 for t in trips), trips
    assert back == blob


def test_bench_link_names_an_unknown_profile_before_touching_the_network():
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_link.py"),
                          "--profiles", "none,10gbit"], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 2
    assert "unknown --profiles 10gbit; choose from none, 1gbit" in run.stderr


def test_bench_pipeline_prints_every_wire_stream_against_raw_and_the_activation_stream(capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_pipeline

    keys = [key for _, key in bench_pipeline.WIRE_ROWS]
    runs = {key: [100.0 * (i + 1), 200.0 * (i + 1)] for i, key in enumerate(keys)}
    bench_pipeline.print_wire({"streams": bench_pipeline.wire_summary(runs),
                               "raw_all": runs["raw"], "batch": "test"})
    rows = capsys.readouterr().out.splitlines()[2:]
    assert len(rows) == len(keys)
    for i, (row, (label, _)) in enumerate(zip(rows, bench_pipeline.WIRE_ROWS)):
        mbs, to_raw, act_to = row[len(label):].split()
        assert row.startswith(label) and float(mbs) == 150 * (i + 1)
        assert float(to_raw) == i + 1 and float(act_to) == round(len(keys) / (i + 1), 2)


def test_the_raw_streams_of_bench_pipeline_deliver_every_byte():
    """(a)'s baselines: the same bytes object again and again, each message copied from
    a tensor first, copied messages each answered, and fedff's frames without acks; the
    sink's byte count (or the count of messages or assembled batches) must match what
    was sent (they assert)."""
    from concurrent import futures

    import grpc

    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_pipeline

    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "bench.Raw", bench_pipeline.RAW_HANDLERS)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        for copy in (False, True):
            assert bench_pipeline.raw_stream_mbs(f"127.0.0.1:{port}", 8, 1 << 20, copy) > 0
        assert bench_pipeline.acked_stream_mbs(f"127.0.0.1:{port}", 8, 1 << 20) > 0
        assert bench_pipeline.frames_stream_mbs(f"127.0.0.1:{port}", 8, 300, 1000) > 0
    finally:
        server.stop(0)
