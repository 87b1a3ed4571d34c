"""Side-by-side speed of two source trees: one benchmark script, run alternately.

Runs `scripts/<bench>` from the old tree and from the new tree (each with its own
`fedff` on PYTHONPATH) `--reps` times, alternating which goes first, reads each run's
JSON and prints, for every number whose key ends in `--metric` (samples/s by default),
the median of the paired new/old ratios with their range. The machines here are shared
and noisy: pairs taken minutes apart cancel most of the drift that separate sittings
would not.

    git worktree add /tmp/old <commit>
    python scripts/bench_compare.py --old /tmp/old --reps 3 -- bench_ff.py --threads 2 \\
        --data-dir ../shared/data
    python scripts/bench_compare.py --old /tmp/old --reps 3 --metric samples_s,efficiency \\
        -- bench_pipeline.py --skip wire,rss --reps 1 --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def flatten(tree: object, prefix: str = "") -> dict[str, float]:
    if isinstance(tree, dict):
        out: dict[str, float] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}/"))
        return out
    if isinstance(tree, (int, float)) and not isinstance(tree, bool):
        return {prefix.rstrip("/"): float(tree)}
    return {}


def run_once(tree: Path, bench: str, args: list[str], out: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    subprocess.run([sys.executable, str(tree / "scripts" / bench), *args, "--out", str(out)],
                   env=env, check=True, cwd=tree, stdout=subprocess.DEVNULL)
    return flatten(json.loads(out.read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", type=Path, required=True, help="the baseline source tree")
    parser.add_argument("--new", type=Path, default=REPO, help="default: this tree")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--metric", default="samples_per_s",
                        help="compare the numbers whose key ends with this (comma list)")
    parser.add_argument("--out", default="bench_compare.json")
    parser.add_argument("bench", help="a script in scripts/, e.g. bench_ff.py")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    a = parser.parse_args()
    bench_args = [x for x in a.args if x != "--"]
    runs: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(a.reps):
            order = ("old", "new") if rep % 2 == 0 else ("new", "old")
            for side in order:
                tree = (a.old if side == "old" else a.new).resolve()
                print(f"rep {rep + 1}/{a.reps}: {side} ({tree})", flush=True)
                runs[side].append(run_once(tree, a.bench, bench_args,
                                           Path(tmp) / f"{side}{rep}.json"))
    suffixes = tuple(a.metric.split(","))
    keys = [k for k in runs["new"][0] if k.endswith(suffixes) and k in runs["old"][0]]
    rows = {}
    print(f"\n{'metric':<52}{'old':>10}{'new':>10}{'new/old':>9}  range")
    for key in keys:
        old = [r[key] for r in runs["old"]]
        new = [r[key] for r in runs["new"]]
        ratios = [n / o for n, o in zip(new, old)]
        rows[key] = {"old": old, "new": new, "ratios": ratios,
                     "median_ratio": statistics.median(ratios)}
        print(f"{key:<52}{statistics.median(old):>10.0f}{statistics.median(new):>10.0f}"
              f"{statistics.median(ratios):>9.3f}  {min(ratios):.3f}-{max(ratios):.3f}")
    Path(a.out).write_text(json.dumps({"bench": a.bench, "args": bench_args,
                                       "old": str(a.old), "new": str(a.new),
                                       "reps": a.reps, "rows": rows}, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
