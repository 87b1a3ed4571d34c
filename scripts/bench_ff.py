"""Benchmark of the in-process FF engine: speed, memory and model FLOP utilisation.

For each variant it times blocks of real training steps and reports the median block:
samples/s, the implied epoch time, achieved GFLOP/s and that as a fraction of a dense
fp32 4096^3 matmul measured in the same run (model FLOP utilisation, MFU), and the
process's peak RSS. The matmul is timed before the first block and after every block;
each block's MFU is against the two samples around it and the median block is
reported, because these machines are shared and noisy.

FLOPs are counted honestly, from the shapes: per layer and per row, 2*in*out for the
forward pass and 2*in*out for the weight gradient (no input gradient is needed: FF
layers never send one). Training rows are positives plus negatives; supervised FF adds
the neutral-label forward pass that the head reads (and hard negatives are drawn from);
the head adds its own forward and weight gradient. Elementwise work is not counted, so
MFU is a lower bound of how busy the cores are.

    python scripts/bench_ff.py --data-dir ../shared/data            # MNIST if present
    python scripts/bench_ff.py --blocks 7 --steps 40 --out bench_ff.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

from fedff import config
from fedff.data.datasets import Dataset, load_dataset
from fedff.data.idx import DataError
from fedff.engine.network import FFNetwork, InputSpec

VARIANTS = {  # name: (config, overrides)
    "ff-hard (3x1000)": ("mnist-ff-3x1000", []),
    "ff-random (3x1000)": ("mnist-ff-3x1000", ["train.negatives=random"]),
    "cff-all (3x1000)": ("mnist-ff-3x1000", ["model.collaboration=all"]),
    "ff-unsupervised (3x1000)": ("mnist-ff-3x1000", [
        "train.algorithm=unsupervised", "train.negatives=hybrid", "train.classify=head"]),
    "pepita (1x1024)": ("mnist-pepita-1x1024", []),
}


class MatmulRoof:
    """GFLOP/s of a dense fp32 n x n x n matmul, sampled between the timed blocks.

    Each block's MFU is taken against the mean of the samples just before and after it,
    so a neighbour on a shared machine that slows both for a while cancels out.
    """

    def __init__(self, n: int = 4096):
        self.n = n
        self.a, self.b = torch.randn(n, n), torch.randn(n, n)
        self.a @ self.b  # warm-up: allocator, thread pool
        self.samples: list[float] = []

    def sample(self) -> float:
        start = time.perf_counter()
        self.a @ self.b
        self.samples.append(2 * self.n**3 / (time.perf_counter() - start) / 1e9)
        return self.samples[-1]


def flops_per_batch(net: FFNetwork, batch: int) -> float:
    widths = [net.spec.features, *net.cfg.model.hidden]
    per_row = sum(2 * widths[i] * widths[i + 1] for i in range(len(widths) - 1))
    if net.cfg.train.algorithm == "pepita":  # two forward passes, the weight gradients,
        return batch * (3 * per_row + 2 * widths[-1] * widths[0])  # and F e (fixed F)
    flops = 2 * batch * per_row * 2  # positives + negatives, forward + weight gradient
    head_in = sum(net.cfg.model.hidden[i] for i in net.head_layers)
    flops += batch * 2 * head_in * net.spec.num_classes * 2
    if net.supervised:  # the neutral-label pass that feeds the head
        flops += batch * per_row
    return flops


def load(data_dir: str | None) -> Dataset:
    try:
        return load_dataset("mnist", data_dir)
    except DataError:
        g = torch.Generator().manual_seed(0)
        print("MNIST not found: timing on random data of MNIST's shape")
        x = torch.rand(60000, 784, generator=g)
        y = torch.randint(0, 10, (60000,), generator=g)
        return Dataset("random-784", x, y, x[:1000], y[:1000], (28, 28))


def bench_variant(variant: tuple[str, list[str]], ds: Dataset, steps: int, blocks: int,
                  roof: MatmulRoof) -> dict:
    cfg = config.load(*variant)
    net = FFNetwork(cfg, InputSpec(ds.features, ds.image_shape, ds.num_classes))
    b = cfg.train.batch_size
    order = torch.randperm(ds.train_x.shape[0])
    cursor = 0

    def step() -> None:
        nonlocal cursor
        idx = order[cursor:cursor + b]
        cursor = (cursor + b) % (ds.train_x.shape[0] - b)
        net.train_batch(ds.train_x[idx], ds.train_y[idx])

    for _ in range(5):  # warm-up: allocator, thread pool
        step()
    flops = flops_per_batch(net, b)
    block_times, block_mfu, before = [], [], roof.sample()
    for _ in range(blocks):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        block_times.append(time.perf_counter() - start)
        after = roof.sample()
        block_mfu.append(flops * steps / block_times[-1] / 1e9 / ((before + after) / 2))
        before = after
    t = statistics.median(block_times) / steps
    return {"batch_size": b, "seconds_per_batch": t, "samples_per_s": b / t,
            "epoch_seconds": 60000 / b * t,
            "gflop_per_batch": flops / 1e9, "gflops": flops / t / 1e9,
            "mfu": statistics.median(block_mfu), "block_mfu": block_mfu,
            "block_seconds": block_times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", help="folder with mnist/ (else random data)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--steps", type=int, default=30, help="batches per timed block")
    parser.add_argument("--blocks", type=int, default=5, help="timed blocks (median taken)")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", default="bench_ff.json", help="JSON output path")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ds = load(args.data_dir)
    roof = MatmulRoof()
    rows = {name: bench_variant(VARIANTS[name], ds, args.steps, args.blocks, roof)
            for name in args.variants}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    roofs = roof.samples
    print(f"\nmatmul roof (fp32 4096^3, {args.threads} threads): median "
          f"{statistics.median(roofs):.1f} GFLOP/s of {len(roofs)} samples "
          f"({min(roofs):.0f}-{max(roofs):.0f}), one before and after every block")
    print(f"{'variant':<26}{'samples/s':>11}{'epoch s':>9}{'GFLOP/s':>9}{'MFU':>7}")
    for name, r in rows.items():
        print(f"{name:<26}{r['samples_per_s']:>11.0f}{r['epoch_seconds']:>9.1f}"
              f"{r['gflops']:>9.1f}{r['mfu']:>7.2f}")
    print(f"peak RSS: {peak:.0f} MiB")
    result = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
              "torch": torch.__version__, "dataset": ds.name,
              "matmul_roof_gflops": statistics.median(roofs), "roof_samples": roofs,
              "variants": rows, "peak_rss_mb": peak, "steps_per_block": args.steps,
              "blocks": args.blocks}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
