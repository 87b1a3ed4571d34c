"""A layer-worker chain over emulated network links: samples/s against loopback.

Each of the 3 workers and the driver runs in its own network namespace, joined to one
bridge by a veth pair; with a link profile, both ends of every veth are shaped, so every
host's link has the profile's rate in each direction: a token bucket (`tc tbf`) for the
rate-only profiles. A profile's delay is added either by `tc netem` (`--delay netem`:
half the one-way delay and the rate on each end, so any two hosts see the profile's
delay; needs a kernel with sch_netem) or, where the kernel lacks it, by a userspace relay
(`--delay relay`): in each sending host's namespace a relay takes the hop's TCP stream on
loopback and passes every read on to the next host only once the delay has passed, in
each direction, holding at most twice the link's bandwidth-delay product; the token
bucket shapes its outgoing link as before. The relay sees the same one-way delay on
every byte but not TCP's own reaction to it (the loopback leg acks at once). Traffic
never leaves those namespaces. Needs root, `ip` and `tc`. Every (profile, wire dtype,
window) is measured --reps times, alternating; medians are reported, with each row's
ratio to the unshaped row of the same wire and window.

    sudo python scripts/bench_link.py --data-dir ../shared/data --out bench_link.json
"""

from __future__ import annotations

import argparse
import asyncio
import collections
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
# name: (rate, one-way delay in ms, or None for a rate alone); "1gbit-0ms" sends every hop
# through the relay with no delay, which shows what the relay itself costs
PROFILES = {"none": None, "1gbit": ("1gbit", None), "100mbit": ("100mbit", None),
            "1gbit-0ms": ("1gbit", 0.0), "1gbit-0.5ms": ("1gbit", 0.5),
            "100mbit-10ms": ("100mbit", 10.0)}
BITS = {"gbit": 1e9, "mbit": 1e6}
PREFIX, BRIDGE, PORT, RELAY_PORT = "10.77.0", "ffbr0", 7001, 7010
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


def shape(profile: str, delay_by: str) -> None:
    """Every host's veth, both ends, shaped to the profile (replacing any earlier one):
    netem where it adds the delay, else a token bucket for the rate alone."""
    for host in HOSTS:
        for dev, ns in ((f"ff-{host}-br", None), ("eth0", f"ff-{host}")):
            prefix = ["ip", "netns", "exec", ns] if ns else []
            subprocess.run([*prefix, "tc", "qdisc", "del", "dev", dev, "root"],
                           capture_output=True)
            if PROFILES[profile] is None:
                continue
            rate, delay_ms = PROFILES[profile]
            if delay_ms is not None and delay_by == "netem":
                qdisc = ["netem", "delay", f"{delay_ms / 2}ms", "rate", rate, "limit", "100000"]
            else:  # a bucket of 10 ms at the rate, a queue of 100 ms
                qdisc = ["tbf", "rate", rate, "burst", str(int(rate_bytes(rate) / 100)),
                         "latency", "100ms"]
            try:
                sh(*prefix, "tc", "qdisc", "add", "dev", dev, "root", *qdisc)
            except subprocess.CalledProcessError as err:
                sys.exit(f"bench_link.py: `tc qdisc add ... {' '.join(qdisc)}` failed: "
                         f"{err.stderr.strip()}; a delay by netem needs the kernel's "
                         f"sch_netem (modprobe sch_netem), or pass --delay relay")


def rate_bytes(rate: str) -> float:
    return float(rate[:-4]) * BITS[rate[-4:]] / 8


# -- the delay relay --------------------------------------------------------------------


async def carry(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float,
                budget: int) -> None:
    """One direction of a hop: each read goes on `delay` seconds after it arrived; at most
    `budget` bytes are held (what the link itself would hold, about)."""
    loop = asyncio.get_running_loop()
    held: collections.deque[tuple[float, bytes]] = collections.deque()
    size = 0
    cond = asyncio.Condition()

    async def take() -> None:
        nonlocal size
        while True:
            try:
                data = await reader.read(1 << 16)
            except ConnectionError:
                data = b""  # a reset ends the direction as a close does
            async with cond:
                await cond.wait_for(lambda: size < budget)
                held.append((loop.time() + delay, data))
                size += len(data)
                cond.notify_all()
            if not data:
                return

    taker = asyncio.create_task(take())
    try:
        while True:
            async with cond:
                await cond.wait_for(lambda: bool(held))
                due, data = held.popleft()
            await asyncio.sleep(max(0.0, due - loop.time()))
            if not data:
                break
            writer.write(data)
            await writer.drain()
            async with cond:
                size -= len(data)
                cond.notify_all()
    except ConnectionError:
        pass
    finally:
        taker.cancel()
        writer.close()


async def relay(listen_port: int, target: str, delay_ms: float, rate: str) -> None:
    host, port = target.rsplit(":", 1)
    budget = max(1 << 18, int(2 * rate_bytes(rate) * delay_ms / 1e3))

    async def hop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
        except OSError:  # the worker is not listening yet: the caller sees a close, retries
            writer.close()
            return
        await asyncio.gather(carry(reader, up_writer, delay_ms / 1e3, budget),
                             carry(up_reader, writer, delay_ms / 1e3, budget))

    server = await asyncio.start_server(hop, "127.0.0.1", listen_port)
    async with server:
        await server.serve_forever()


# -- the chain --------------------------------------------------------------------------


@contextmanager
def workers(root: Path, token: Path, window: int, relayed: tuple[str, float] | None
            ) -> Iterator[list[str]]:
    """The chain's workers, each in its namespace, each sending on to the next; with
    `relayed` (rate, delay in ms), each hop's data goes through a delay relay in the
    sender's namespace. Returns the addresses the driver is given (control calls to the
    later workers go direct; the data takes the relays)."""
    procs, listen = [], [f"{address(h)}:{PORT}" for h in HOSTS[1:]]
    hops = [f"127.0.0.1:{RELAY_PORT + i}" for i in range(len(listen))] if relayed else listen
    try:
        for i, host in enumerate(HOSTS[:-1] if relayed else []):  # host i sends to worker i
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", f"ff-{host}", sys.executable, __file__,
                 "--relay", f"{RELAY_PORT + i},{listen[i]},{relayed[1]},{relayed[0]}"]))
        for i, host in enumerate(HOSTS[1:]):
            nxt = ["--next", hops[i + 1]] if i + 1 < len(listen) else []
            log = open(root / f"{host}.log", "w")
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", f"ff-{host}", sys.executable, "-m", "fedff", "worker",
                 "--listen", listen[i], "--token-file", str(token), "--insecure",
                 "--threads", "1", "--window", str(window),
                 "--checkpoint-dir", str(root / host), *nxt],
                stdout=log, stderr=subprocess.STDOUT))
        yield [hops[0], *listen[1:]]
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
    shape(profile, args.delay)
    link = PROFILES[profile]
    relayed = link if link and link[1] is not None and args.delay == "relay" else None
    with tempfile.TemporaryDirectory() as tmp:
        root, token = Path(tmp), Path(tmp) / "token"
        token.write_text(os.urandom(16).hex())
        with workers(root, token, window, relayed) as chain:
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
    ap.add_argument("--delay", choices=["netem", "relay"], default="netem",
                    help="what adds a profile's delay: tc netem (needs sch_netem) or a "
                         "userspace relay per hop")
    ap.add_argument("--out", default="bench_link.json")
    ap.add_argument("--drive", help=argparse.SUPPRESS)  # internal: the driver's side
    ap.add_argument("--token-file", help=argparse.SUPPRESS)
    ap.add_argument("--wire", help=argparse.SUPPRESS)
    ap.add_argument("--window", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--relay", help=argparse.SUPPRESS)  # internal: PORT,TARGET,DELAY_MS,RATE
    args = ap.parse_args()
    if args.drive:
        return drive(args)
    if args.relay:
        port, target, delay_ms, rate = args.relay.split(",")
        return asyncio.run(relay(int(port), target, float(delay_ms), rate))
    unknown = set(args.profiles.split(",")) - PROFILES.keys()
    if unknown:
        ap.error(f"unknown --profiles {', '.join(sorted(unknown))}; choose from "
                 f"{', '.join(PROFILES)}")
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
                                          "reps": args.reps, "delay_by": args.delay,
                                          "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
