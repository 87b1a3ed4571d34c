"""Benchmark of the layer-worker pipeline: wire throughput, pipeline efficiency, worker RSS.

(a) wire: MB/s of fedff's activation stream (tensors -> frames -> gRPC Train stream ->
    tensors at the receiver, with the window and acks of the real `Link`) against raw
    gRPC streams of bytes messages of the same chunk size (one object sent again and
    again; each message copied from a tensor first; copied, on a bidirectional stream
    that answers each message) and against fedff's frames on a stream without acks (the
    codec alone), to a receiver in another process, measured alternately in the same
    run; medians of --reps.
(b) efficiency: samples/s of a K-worker chain on this host (real worker processes) over
    samples/s of the in-process engine with the same cores, net and batches, for each K
    in --chains. The two are timed alternately, --reps times; the median ratio is
    reported. The first epoch of each measurement warms up and is not timed.
(c) memory: every worker's RSS after each of --rss-epochs epochs.

    python scripts/bench_pipeline.py --data-dir ../shared/data --out bench_pipeline.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import queue
import statistics
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import torch

from fedff import config
from fedff.data.datasets import Dataset, load_dataset
from fedff.engine.network import FFNetwork, InputSpec
from fedff.pipeline.driver import Pipeline, default_window
from fedff.pipeline.launcher import LocalChain
from fedff.train import train_epoch
from fedff.v1 import worker_pb2 as pb
from fedff.v1 import worker_pb2_grpc as pb_grpc
from fedff.wire.frames import (CHUNK_BYTES, Assembler, Batch, encode, parse_frame,
                               serialize_frame)
from fedff.wire.rpc import add_worker_to_server
from fedff.wire.link import Link
from fedff.wire.security import CHANNEL_OPTIONS, SERVER_OPTIONS

# -- (a) wire ---------------------------------------------------------------------------


class SinkServicer(pb_grpc.LayerWorkerServicer):
    """Assembles every batch into tensors and acks it, as a worker does (reading on one
    thread, answering from another); no training."""

    def Train(self, request_iterator, context):
        yield pb.TrainReply(ready=pb.Ready(worker="sink"))
        replies: queue.Queue = queue.Queue()

        def consume() -> None:
            assembler = Assembler()
            try:
                for frame in request_iterator:
                    batch = assembler.add(frame)
                    if batch is not None:
                        replies.put(pb.TrainReply(ack=pb.Ack(batch_id=batch.batch_id),
                                                  durable_through=batch.batch_id))
            except grpc.RpcError:
                pass  # the sender hung up
            finally:
                replies.put(None)

        threading.Thread(target=consume, daemon=True).start()
        while (reply := replies.get()) is not None:
            yield reply


def _raw_sink(requests, context):
    n = 0
    for chunk in requests:
        n += len(chunk)
    return n.to_bytes(8, "little")


def _raw_echo(requests, context):
    """One reply per message, as soon as it is read: the least an acked stream costs."""
    for n, _ in enumerate(requests, 1):
        yield n.to_bytes(8, "little")


def _frame_sink(frames, context):
    """Parses and assembles every batch as a worker does, but answers once, at the end."""
    assembler, n = Assembler(), 0
    for frame in frames:
        n += assembler.add(frame) is not None
    return n.to_bytes(8, "little")


RAW_HANDLERS = {"Sink": grpc.stream_unary_rpc_method_handler(_raw_sink),
                "Echo": grpc.stream_stream_rpc_method_handler(_raw_echo),
                "Frames": grpc.stream_unary_rpc_method_handler(
                    _frame_sink, request_deserializer=parse_frame)}


def serve_sinks(port_queue) -> None:
    torch.set_num_threads(1)
    server = grpc.server(futures.ThreadPoolExecutor(4), options=SERVER_OPTIONS)
    add_worker_to_server(SinkServicer(), server)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("bench.Raw",
                                                                          RAW_HANDLERS)])
    port_queue.put(server.add_insecure_port("127.0.0.1:0"))
    server.start()
    server.wait_for_termination()


def raw_stream_mbs(address: str, total_mb: int, chunk: int, copy: bool = False) -> float:
    """`copy`: each message is copied out of a tensor first, the least any sender of
    fresh tensors does (gRPC Python sends bytes objects); else one bytes object is sent
    again and again."""
    channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    sink = channel.stream_unary("/bench.Raw/Sink")
    x = torch.randn(chunk // 4)
    payload = x.numpy().tobytes()
    n = total_mb * 2**20 // chunk
    start = time.perf_counter()
    messages = (x.numpy().tobytes() for _ in range(n)) if copy else (payload for _ in range(n))
    got = int.from_bytes(sink(messages), "little")
    seconds = time.perf_counter() - start
    channel.close()
    assert got == n * chunk
    return got / seconds / 1e6


def acked_stream_mbs(address: str, total_mb: int, chunk: int) -> float:
    """Raw bytes (each copied from a tensor) on a bidirectional stream that answers every
    message, the replies read on the caller's thread: gRPC Python's own cost of a stream
    with an ack per message, without fedff's window, frames or assembly."""
    channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    echo = channel.stream_stream("/bench.Raw/Echo")
    x = torch.randn(chunk // 4)
    n = total_mb * 2**20 // chunk
    start = time.perf_counter()
    last = 0
    for reply in echo(x.numpy().tobytes() for _ in range(n)):
        last = int.from_bytes(reply, "little")
    seconds = time.perf_counter() - start
    channel.close()
    assert last == n
    return n * chunk / seconds / 1e6


def frames_stream_mbs(address: str, total_mb: int, rows: int, width: int) -> float:
    """fedff's codec alone: batches encoded, serialised (serialize_frame), parsed and
    assembled into tensors at the receiver, on a stream with no acks and no window."""
    channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    send = channel.stream_unary("/bench.Raw/Frames", request_serializer=serialize_frame)
    x = torch.randn(rows, width)
    nbytes = x.numel() * 4
    n = max(1, total_mb * 2**20 // nbytes)
    batches = (Batch(batch_id=i, kind=pb.TRAIN, n_pos=rows // 2, tensors={"x": x})
               for i in range(1, n + 1))
    start = time.perf_counter()
    got = int.from_bytes(send(f for b in batches for f in encode(b)), "little")
    seconds = time.perf_counter() - start
    channel.close()
    assert got == n, (got, n)
    return n * nbytes / seconds / 1e6


def activation_stream_mbs(address: str, total_mb: int, rows: int, width: int) -> float:
    x = torch.randn(rows, width)
    nbytes = x.numel() * 4
    n = max(1, total_mb * 2**20 // nbytes)
    link = Link(address, on_ack=lambda ack: None, window=8, name="bench")
    start = time.perf_counter()
    for i in range(1, n + 1):
        link.send(Batch(batch_id=i, kind=pb.TRAIN, n_pos=rows // 2, tensors={"x": x}))
    link.wait_acked(n)
    seconds = time.perf_counter() - start
    link.close()
    return n * nbytes / seconds / 1e6


def bench_wire(reps: int, total_mb: int) -> dict:
    ctx = mp.get_context("spawn")
    ports = ctx.Queue()
    proc = ctx.Process(target=serve_sinks, args=(ports,), daemon=True)
    proc.start()
    address = f"127.0.0.1:{ports.get(timeout=60)}"
    # The same message size on all: one 300 x 1000 float32 batch fits one chunk.
    message = min(CHUNK_BYTES, 300 * 1000 * 4)
    measure = {  # in the order they alternate
        "raw": lambda: raw_stream_mbs(address, total_mb, message),
        "raw_copy": lambda: raw_stream_mbs(address, total_mb, message, copy=True),
        "raw_acked": lambda: acked_stream_mbs(address, total_mb, message),
        "frames": lambda: frames_stream_mbs(address, total_mb, 300, 1000),
        "activation": lambda: activation_stream_mbs(address, total_mb, 300, 1000)}
    runs: dict[str, list[float]] = {key: [] for key in measure}
    try:
        raw_stream_mbs(address, 64, message)  # warm-up
        activation_stream_mbs(address, 64, 300, 1000)
        for _ in range(reps):
            for key, stream in measure.items():
                runs[key].append(stream())
    finally:
        proc.terminate()
    s = wire_summary(runs)
    return {"streams": s, **{f"{key}_all": v for key, v in runs.items()},
            **{f"{key}_mb_s": row["mb_s"] for key, row in s.items()},
            # the activation stream's ratios under the names earlier runs reported
            "ratio": s["activation"]["to_raw"], "ratio_to_copy": s["raw_copy"]["activation_to"],
            "ratio_to_acked": s["raw_acked"]["activation_to"],
            "ratio_to_frames": s["frames"]["activation_to"],
            "acked_to_raw": s["raw_acked"]["to_raw"], "frames_to_raw": s["frames"]["to_raw"],
            "batch": "300 x 1000 float32 (1.2 MB)", "message_bytes": message}


def wire_summary(runs: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Per stream: median MB/s, the median of its per-run ratios to the raw stream, and
    of the activation stream's per-run ratios to it (ratios of runs side by side are
    steadier than ratios of medians on a shared machine)."""
    raw, act = runs["raw"], runs["activation"]
    return {key: {"mb_s": statistics.median(v),
                  "to_raw": statistics.median(x / r for x, r in zip(v, raw)),
                  "activation_to": statistics.median(a / x for a, x in zip(act, v))}
            for key, v in runs.items()}


# -- (b) efficiency ---------------------------------------------------------------------


def epoch_rate(net, ds: Dataset, epoch: int) -> float:
    start = time.perf_counter()
    train_epoch(net, ds, epoch, show=False)
    return ds.train_x.shape[0] / (time.perf_counter() - start)


def inprocess_rate(cfg, ds: Dataset, threads: int) -> float:
    torch.set_num_threads(threads)
    net = FFNetwork(cfg, InputSpec(ds.features, ds.image_shape, ds.num_classes))
    epoch_rate(net, ds, 0)  # warm-up
    return epoch_rate(net, ds, 1)


def chain_rate(cfg, ds: Dataset, k: int, worker_threads: int, root: Path,
               window: int) -> float:
    torch.set_num_threads(1)
    with LocalChain(k, root / f"chain{k}", threads=worker_threads, window=window) as chain:
        pipe = Pipeline(cfg, InputSpec(ds.features, ds.image_shape, ds.num_classes),
                        chain.addresses, window=window)
        try:
            epoch_rate(pipe, ds, 0)
            return epoch_rate(pipe, ds, 1)
        finally:
            pipe.close()


def bench_efficiency(cfg, ds: Dataset, chains: list[int], reps: int, threads: int,
                     root: Path, window: int) -> dict:
    rows: dict[str, dict] = {}
    for k in chains:
        base, piped, ratios = [], [], []
        for _ in range(reps):
            b = inprocess_rate(cfg, ds, threads)
            p = chain_rate(cfg, ds, k, 1, root, window)
            base.append(b)
            piped.append(p)
            ratios.append(p / b)
        rows[str(k)] = {"inprocess_samples_s": statistics.median(base),
                        "chain_samples_s": statistics.median(piped),
                        "efficiency": statistics.median(ratios), "all_ratios": ratios}
    return rows


# -- (c) worker RSS ---------------------------------------------------------------------


def bench_rss(cfg, ds: Dataset, k: int, epochs: int, root: Path) -> dict:
    with LocalChain(k, root / "rss", threads=1) as chain:
        pipe = Pipeline(cfg, InputSpec(ds.features, ds.image_shape, ds.num_classes),
                        chain.addresses)
        per_epoch, peaks = [], []
        try:
            for epoch in range(epochs):
                train_epoch(pipe, ds, epoch, show=False)
                statuses = pipe.statuses()
                per_epoch.append([round(s.rss_mb, 1) for s in statuses])
                peaks.append([round(s.peak_rss_mb, 1) for s in statuses])
        finally:
            pipe.close()
    workers = list(zip(*per_epoch))
    growth = [w[-1] / w[0] - 1 for w in workers]
    return {"epochs": epochs, "rss_mb_per_epoch": per_epoch, "peak_rss_mb_per_epoch": peaks,
            "growth_first_to_last": growth, "max_abs_growth": max(abs(g) for g in growth)}


WIRE_ROWS = [("raw bytes, one object re-sent", "raw"), ("raw bytes, each copied", "raw_copy"),
             ("fedff frames, no acks", "frames"), ("raw copied, each answered", "raw_acked"),
             ("activation stream (Link)", "activation")]


def print_wire(w: dict) -> None:
    """Each stream's MB/s beside the medians of its per-run ratios to raw and of the
    activation stream's per-run ratios to it."""
    print(f"(a) wire, {w['batch']} per message, medians of {len(w['raw_all'])} runs")
    print(f"{'stream':<30} {'MB/s':>6} {'/ raw':>6} {'activation /':>13}")
    for label, key in WIRE_ROWS:
        row = w["streams"][key]
        print(f"{label:<30} {row['mb_s']:>6.0f} {row['to_raw']:>6.2f} "
              f"{row['activation_to']:>13.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--train-limit", type=int, default=20000,
                    help="examples per timed epoch (default 20000)")
    ap.add_argument("--threads", type=int, default=2, help="cores the in-process run uses")
    ap.add_argument("--chains", default="2,3")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--wire-mb", type=int, default=2048,
                    help="MB per timed stream (512 lasted under half a second here: noisy)")
    ap.add_argument("--rss-epochs", type=int, default=10)
    ap.add_argument("--rss-train-limit", type=int, default=6000)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: wire,efficiency,rss")
    ap.add_argument("--config", default="mnist-ff-3x1000",
                    help="the net of parts (b) and (c) (default: 3 x 1000 FF, random negatives)")
    ap.add_argument("--set", action="append", default=[], dest="overrides",
                    metavar="KEY=VALUE", help="config overrides, as for fedff train")
    ap.add_argument("--window", type=int, default=0,
                    help="batches in flight per link (default: fedff pipeline's for the "
                         "algorithm)")
    ap.add_argument("--out", default="bench_pipeline.json")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    ff = ["train.negatives=random"] if args.config.startswith("mnist-ff") else []
    cfg = config.load(args.config, [*ff, "train.epochs=10", f"data.dataset={args.dataset}",
                                    *args.overrides])
    result: dict = {"machine": platform.processor() or platform.machine(),
                    "cores": torch.get_num_threads(), "torch": torch.__version__,
                    "grpc": grpc.__version__, "config": args.config,
                    "overrides": [*ff, *args.overrides],
                    "window": args.window or default_window(cfg)}
    if "wire" not in skip:
        result["wire"] = w = bench_wire(args.reps, args.wire_mb)
        print_wire(w)
    with tempfile.TemporaryDirectory() as tmp:
        if "efficiency" not in skip:
            ds = load_dataset(args.dataset, args.data_dir, train_limit=args.train_limit,
                              test_limit=100)
            result["efficiency"] = eff = bench_efficiency(
                cfg, ds, [int(k) for k in args.chains.split(",")], args.reps, args.threads,
                Path(tmp), result["window"])
            print("(b) pipeline efficiency (chain samples/s over in-process samples/s)")
            print(f"{'workers':>8} {'in-process/s':>13} {'chain/s':>9} {'efficiency':>11}")
            for k, row in eff.items():
                print(f"{k:>8} {row['inprocess_samples_s']:>13.0f} "
                      f"{row['chain_samples_s']:>9.0f} {row['efficiency']:>11.2f}")
        if "rss" not in skip:
            ds = load_dataset(args.dataset, args.data_dir, train_limit=args.rss_train_limit,
                              test_limit=100)
            result["rss"] = r = bench_rss(cfg, ds, 3, args.rss_epochs, Path(tmp))
            print(f"(c) worker RSS (MiB) after epochs 1..{r['epochs']} (peak so far):")
            for i, (w, p) in enumerate(zip(zip(*r["rss_mb_per_epoch"]),
                                           zip(*r["peak_rss_mb_per_epoch"]))):
                print(f"  worker{i}: {' '.join(f'{v:.0f}({q:.0f})' for v, q in zip(w, p))}")
            print(f"  largest change first->last epoch: {100 * r['max_abs_growth']:.1f} %")
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
