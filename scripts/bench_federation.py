"""Benchmark of a simulated federation: round overhead and the simulation's peak memory.

Runs `fedff simulate` as a child process (the product's own command) and samples the
proportional set size (PSS: shared pages split between the processes that map them, so
Ray's shared object store is counted once) of the whole process tree: the coordinator,
Ray's services and its client workers. Afterwards it reads the run's metrics.json:

- round overhead = round time - the time during which at least one client was training
  (the union of the clients' training intervals; with every client in parallel this is
  the slowest client's training). Reported per round, as a median, and for round 1
  alone (which also starts Ray's client workers).

    python scripts/bench_federation.py --data-dir ../shared/data \\
        --config mnist-ff-3x1000-short --set federation.rounds=3 --out bench_federation.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path


def children_of(pid: int) -> set[int]:
    """pid and all its descendants, from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, p in parents.items():
            if p == parent and child not in tree:
                tree.add(child)
                frontier.append(child)
    return tree


def pss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class TreeSampler(threading.Thread):
    def __init__(self, pid: int, every: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.every, self.peak, self.peak_processes = pid, every, 0.0, 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            tree = children_of(self.pid)
            total = sum(pss_mb(p) for p in tree)
            if total > self.peak:
                self.peak, self.peak_processes = total, len(tree)
            self.stop.wait(self.every)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="mnist-ff-3x1000-short")
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--data-dir", default=os.environ.get("FEDFF_DATA_DIR", ""))
    ap.add_argument("--run-dir", default="runs/bench_federation")
    ap.add_argument("--out", default="bench_federation.json")
    args = ap.parse_args()

    cmd = [sys.executable, "-m", "fedff", "simulate", "--config", args.config,
           "--out", args.run_dir, "--quiet"]
    for item in args.overrides:
        cmd += ["--set", item]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    start = time.perf_counter()
    child = subprocess.Popen(cmd)
    sampler = TreeSampler(child.pid)
    sampler.start()
    code = child.wait()
    sampler.stop.set()
    sampler.join()
    wall = time.perf_counter() - start
    if code != 0:
        print(f"fedff simulate failed with exit status {code}", file=sys.stderr)
        return code
    summary = json.loads((Path(args.run_dir) / "metrics.json").read_text())
    rounds = summary["history"]
    table = [(r["round"], r["round_seconds"], r["client_training_seconds"],
              r["slowest_client_seconds"], r["overhead_seconds"], r["overhead_fraction"],
              100 * r["test_error"]) for r in rounds]
    print(f"{'round':>5} {'round s':>8} {'training s':>10} {'slowest s':>9} "
          f"{'overhead s':>10} {'overhead':>8} {'test err %':>10}")
    for row in table:
        print(f"{row[0]:>5} {row[1]:>8.2f} {row[2]:>10.2f} {row[3]:>9.2f} {row[4]:>10.2f} "
              f"{row[5]:>8.3f} {row[6]:>10.2f}")
    later = [r["overhead_fraction"] for r in rounds[1:]] or [rounds[0]["overhead_fraction"]]
    result = {
        "command": " ".join(cmd), "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "clients": summary["config"]["federation"]["clients"],
        "rounds": len(rounds), "wall_seconds": wall,
        "median_overhead_fraction_after_round_1": statistics.median(later),
        "round_1_overhead_fraction": rounds[0]["overhead_fraction"],
        "peak_pss_mb": sampler.peak, "processes_at_peak": sampler.peak_processes,
        "test_error": summary["test_error"], "per_round": rounds,
    }
    print(f"median overhead after round 1: {result['median_overhead_fraction_after_round_1']:.3f}"
          f"; round 1: {result['round_1_overhead_fraction']:.3f}; peak PSS of the process "
          f"tree: {sampler.peak:.0f} MB ({sampler.peak_processes} processes); "
          f"final test error {100 * summary['test_error']:.2f} %")
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
