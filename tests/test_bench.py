"""scripts/bench_ff.py as a user runs it: a table on stdout, the same figures in JSON, and
each block's MFU taken against the roof samples on either side of that block."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

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
