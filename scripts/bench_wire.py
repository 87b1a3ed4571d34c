"""Bytes on the wire per training sample, per hop of a worker chain, for each wire format.

Runs a real chain of in-process workers (gRPC on loopback) on the first --batches batches
of the dataset for each of --wires (a dtype, `+sparse` for `--wire-sparse`), and reads
what every `Link` queued (tensor bytes, re-sends not counted): the driver's hop carries
the examples and labels, each worker's hop the activations, neutral rows and head taps.
How sparse the activations are depends on the weights: `--from` starts from a trained
run's checkpoint.pt (the same config). Prints a table, writes JSON.

    python scripts/bench_wire.py --data-dir ../shared/data --out bench_wire.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from fedff import config, files
from fedff.data.datasets import load_dataset
from fedff.engine.network import InputSpec
from fedff.pipeline.driver import Pipeline
from fedff.worker.options import WorkerOptions
from fedff.worker.server import WorkerServer


def measure(cfg, ds, workers: int, batches: int, wire: str, start: dict | None) -> dict:
    spec = InputSpec(ds.features, ds.image_shape, ds.num_classes)
    with tempfile.TemporaryDirectory() as root:
        servers = [WorkerServer("127.0.0.1:0", WorkerOptions(
            name=f"w{i}", checkpoint_dir=Path(root) / str(i))).start() for i in range(workers)]
        try:
            dtype, _, sparse = wire.partition("+")
            pipe = Pipeline(cfg, spec, [s.address for s in servers], wire_dtype=dtype,
                            wire_sparse=sparse == "sparse")
            if start is not None:
                pipe.load_state_dict(start)
            size, started = cfg.train.batch_size, time.perf_counter()
            for b in range(batches):
                rows = slice(b * size, (b + 1) * size)
                pipe.train_batch(ds.train_x[rows], ds.train_y[rows],
                                 torch.arange(rows.start, rows.stop))
            list(pipe.end_epoch())
            seconds = time.perf_counter() - started
            samples = batches * size
            hops = [pipe.link.bytes_sent] + [s.servicer.core.link.bytes_sent
                                             for s in servers[:-1]]
            pipe.close()
        finally:
            for s in servers:
                s.stop()
    return {"wire": wire, "bytes_per_sample": [h / samples for h in hops],
            "total_bytes_per_sample": sum(hops) / samples, "samples_per_s": samples / seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--config", default="mnist-ff-3x1000-short")
    ap.add_argument("--set", action="append", default=["train.negatives=random"],
                    dest="overrides")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--batches", type=int, default=50)
    ap.add_argument("--wires", default="float32,bfloat16,float16,float32+sparse,bfloat16+sparse")
    ap.add_argument("--from", dest="start", default=None, metavar="CHECKPOINT",
                    help="a trained run's checkpoint.pt to start from (default: fresh weights)")
    ap.add_argument("--out", default="bench_wire.json")
    args = ap.parse_args()
    cfg = config.load(args.config, args.overrides)
    ds = load_dataset(cfg.data.dataset, args.data_dir, False, 0, 0)
    start = None
    if args.start is not None:
        start = files.load(Path(args.start), keys=("network",))["network"]
    rows = [measure(cfg, ds, args.workers, args.batches, w, start) for w in args.wires.split(",")]
    base = rows[0]["total_bytes_per_sample"]
    hops = ["driver->w0"] + [f"w{i}->w{i + 1}" for i in range(args.workers - 1)]
    print(f"{'wire':<16}" + "".join(f"{h:>14}" for h in hops) + f"{'total':>12}{'ratio':>8}")
    for r in rows:
        r["ratio_to_first"] = r["total_bytes_per_sample"] / base
        print(f"{r['wire']:<16}" + "".join(f"{b:>14,.0f}" for b in r["bytes_per_sample"])
              + f"{r['total_bytes_per_sample']:>12,.0f}{r['ratio_to_first']:>8.3f}")
    Path(args.out).write_text(json.dumps({"config": cfg.to_dict(), "from": args.start,
                                          "hops": hops, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
