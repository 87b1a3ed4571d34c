"""A layer-worker chain over emulated network links: samples/s against loopback.

Each of the 3 workers and the driver runs in its own network namespace, joined to one
bridge by a veth pair; with a link profile, both ends of every veth are shaped, so every
host's link has the profile's rate in each direction: a token bucket (`tc tbf`) for the
rate-only profiles, `tc netem` (half the one-way delay and the rate on each end, so any
two hosts see the profile's delay) for those with a delay, which need a kernel with
sch_netem. Traffic never leaves those namespaces. Needs root, `ip` and `tc`. Every
(profile, wire dtype, window) is measured --reps times, alternating; medians are
reported, with each row's ratio to the unshaped row of the same wire and window.

    sudo python scripts/bench_link.py --data-dir ../shared/data --out bench_link.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
PROFILES = {"none": None, "1gbit": ("1gbit", 0.0), "100mbit": ("100mbit", 0.0),
            "1gbit-0.5ms": ("1gbit", 0.5), "100mbit-10ms": ("100mbit", 10.0)}
BITS = {"gbit": 1e9, "mbit": 1e6}
PREFIX, BRIDGE, PORT = "10.77.0", "ffbr0", 7001
HOSTS = ["drv", "w0", "w1", "w2"]  # the driver, then the chain in order


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def address(host: str) -> str:
    return f"{PREFIX}.{10 + HOSTS.index(host)}"


@contextmanager
def network() -> Iterator[None]:
    """The bridge and one namespace per host; removed afterwards, whatever happens."""
    try:
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "link", "set", BRIDGE, "up")
        for host in HOSTS:
            ns, veth = f"ff-{host}", f"ff-{host}-br"
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "link", "set", veth, "master", BRIDGE)
            sh("ip", "link", "set", veth, "up")
            sh("ip", "-n", ns, "addr", "add", f"{address(host)}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield
    finally:
        for host in HOSTS:
            subprocess.run(["ip", "netns", "del", f"ff-{host}"], capture_output=True)
            subprocess.run(["ip", "link", "del", f"ff-{host}-br"], capture_output=True)
        subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)


def shape(profile: str) -> None:
    """netem on both ends of every host's veth (replacing any earlier profile)."""
    for host in HOSTS:
        for dev, ns in ((f"ff-{host}-br", None), ("eth0", f"ff-{host}")):
            prefix = ["ip", "netns", "exec", ns] if ns else []
            subprocess.run([*prefix, "tc", "qdisc", "del", "dev", dev, "root"],
                           capture_output=True)
            if PROFILES[profile] is None:
                continue
            rate, delay_ms = PROFILES[profile]
            if delay_ms:
                qdisc = ["netem", "delay", f"{delay_ms / 2}ms", "rate", rate, "limit", "100000"]
            else:  # a bucket of 10 ms at the rate, a queue of 100 ms
                bucket = int(float(rate[:-4]) * BITS[rate[-4:]] / 8 / 100)
                qdisc = ["tbf", "rate", rate, "burst", str(bucket), "latency", "100ms"]
            try:
                sh(*prefix, "tc", "qdisc", "add", "dev", dev, "root", *qdisc)
            except subprocess.CalledProcessError as err:
                sys.exit(f"bench_link.py: `tc qdisc add ... {' '.join(qdisc)}` failed: "
                         f"{err.stderr.strip()}; a delay needs the kernel's sch_netem "
                         f"(modprobe sch_netem), or choose rate-only --profiles "
                         f"none,1gbit,100mbit")


@contextmanager
def workers(root: Path, token: Path, window: int) -> Iterator[list[str]]:
    """The chain's workers, each in its namespace, each sending on to the next."""
    procs, chain = [], [f"{address(h)}:{PORT}" for h in HOSTS[1:]]
    try:
        for i, host in enumerate(HOSTS[1:]):
            nxt = ["--next", chain[i + 1]] if i + 1 < len(chain) else []
            log = open(root / f"{host}.log", "w")
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", f"ff-{host}", sys.executable, "-m", "fedff", "worker",
                 "--listen", chain[i], "--token-file", str(token), "--insecure",
                 "--threads", "1", "--window", str(window),
                 "--checkpoint-dir", str(root / host), *nxt],
                stdout=log, stderr=subprocess.STDOUT))
        yield chain
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def measure(args: argparse.Namespace, profile: str, wire: str, window: int) -> float:
    """samples/s of --batches training batches, driven from the driver's namespace."""
    shape(profile)
    with tempfile.TemporaryDirectory() as tmp:
        root, token = Path(tmp), Path(tmp) / "token"
        token.write_text(os.urandom(16).hex())
        with workers(root, token, window) as chain:
            drive = subprocess.run(
                ["ip", "netns", "exec", "ff-drv", sys.executable, __file__, "--drive",
                 ",".join(chain), "--token-file", str(token), "--wire", wire,
                 "--window", str(window), "--batches", str(args.batches),
                 "--config", args.config, *(["--data-dir", args.data_dir]
                                            if args.data_dir else [])],
                capture_output=True, text=True, timeout=900)
            if drive.returncode != 0:
                logs = "".join((root / f"{h}.log").read_text()[-800:] for h in HOSTS[1:])
                raise RuntimeError(f"driver failed: {drive.stderr[-2000:]}\n{logs}")
    return float(json.loads(drive.stdout.strip().splitlines()[-1])["samples_per_s"])


def drive(args: argparse.Namespace) -> None:
    """In the driver's namespace: a warm-up, then --batches timed batches."""
    import torch

    from fedff import config
    from fedff.engine.network import InputSpec
    from fedff.pipeline.driver import Pipeline
    from fedff.train import load_data
    from fedff.wire.security import Security

    torch.set_num_threads(1)
    cfg = config.load(args.config, ["train.negatives=random",
                                    *([f"data.data_dir={args.data_dir}"]
                                      if args.data_dir else [])])
    ds = load_data(cfg)
    spec = InputSpec(ds.features, ds.image_shape, ds.num_classes)
    pipe = Pipeline(cfg, spec, args.drive.split(","),
                    Security.from_args(None, None, None, False, args.token_file),
                    window=args.window, insecure=True, wire_dtype=args.wire.split("+")[0],
                    wire_sparse=args.wire.endswith("+sparse"))
    size = cfg.train.batch_size
    try:
        for b in range(args.batches + 10):
            if b == 10:  # the first 10 batches warm up the chain
                list(pipe.end_epoch())
                started = time.perf_counter()
            rows = slice(b * size, (b + 1) * size)
            pipe.train_batch(ds.train_x[rows], ds.train_y[rows])
        list(pipe.end_epoch())
        seconds = time.perf_counter() - started
    finally:
        pipe.close()
    print(json.dumps({"samples_per_s": args.batches * size / seconds}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--config", default="mnist-ff-3x1000-short")
    ap.add_argument("--profiles", default="none,1gbit,100mbit",
                    help=f"comma list of: {', '.join(PROFILES)}")
    ap.add_argument("--wires", default="float32,bfloat16",
                    help="comma list of wire dtypes, each optionally +sparse (--wire-sparse)")
    ap.add_argument("--windows", default="4")
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="bench_link.json")
    ap.add_argument("--drive", help=argparse.SUPPRESS)  # internal: the driver's side
    ap.add_argument("--token-file", help=argparse.SUPPRESS)
    ap.add_argument("--wire", help=argparse.SUPPRESS)
    ap.add_argument("--window", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.drive:
        return drive(args)
    if os.geteuid() != 0:
        sys.exit("bench_link.py needs root (network namespaces and tc); run it with sudo")
    cells = [(p, w, int(n)) for p in args.profiles.split(",") for w in args.wires.split(",")
             for n in args.windows.split(",")]
    samples: dict[tuple, list[float]] = {c: [] for c in cells}
    with network():
        for rep in range(args.reps):  # alternate, so drift hits every cell alike
            for cell in cells:
                samples[cell].append(measure(args, *cell))
                print(f"rep {rep + 1}/{args.reps} {cell}: {samples[cell][-1]:.0f} samples/s",
                      file=sys.stderr)
    rows = []
    for (profile, wire, window), values in samples.items():
        base = statistics.median(samples[("none", wire, window)]) \
            if ("none", wire, window) in samples else None
        rate = statistics.median(values)
        rows.append({"profile": profile, "wire": wire, "window": window,
                     "samples_per_s": rate, "all": values,
                     "vs_unshaped": rate / base if base else None})
    print(f"\n{'link':<14}{'wire':<16}{'window':>7}{'samples/s':>11}{'vs unshaped':>13}")
    for r in rows:
        ratio = "-" if r["vs_unshaped"] is None else f"{r['vs_unshaped']:.2f}"
        print(f"{r['profile']:<14}{r['wire']:<16}{r['window']:>7}"
              f"{r['samples_per_s']:>11.0f}{ratio:>13}")
    Path(args.out).write_text(json.dumps({"config": args.config, "batches": args.batches,
                                          "reps": args.reps, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
