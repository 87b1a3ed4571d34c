"""Run outputs a person or a script reads: metrics as JSON and CSV, a learning-curve plot."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from fedff import files


def write_json(path: Path, data: Any) -> None:
    files.write_text(path, json.dumps(data, indent=2))


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        elif isinstance(value, list):
            flat.update({f"{name}.{i}": v for i, v in enumerate(value)})
        else:
            flat[name] = value
    return flat


def write_csv(path: Path, records: list[dict[str, Any]]) -> None:
    rows = [_flatten(r) for r in records]
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


ERRORS = (("error_goodness", "goodness per label"), ("error_head", "softmax head"))
SERIES = {"error_goodness": ERRORS, "error_head": ERRORS,
          "test_error": (("test_error", "1 - AUROC (one-class)"),)}


def plot_learning_curve(history: list[dict[str, Any]], path: Path, title: str,
                        reported: str = "error_goodness", x: str = "epoch") -> None:
    """Test error (%) per epoch for every classifier evaluated; the one behind
    `test_error` is drawn solid and marked in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    evaluated = [r for r in history if "test_error" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    series = SERIES.get(reported, SERIES["error_head"])
    for key, label in series:
        pts = [(r[x], 100 * r[key]) for r in evaluated if key in r]
        if pts:
            ax.plot(*zip(*pts), marker="." if len(pts) < 30 else None,
                    label=label + (" (reported)" if key == reported else ""),
                    linestyle="-" if key == reported else "--")
    ax.set_xlabel(x)
    ax.set_ylabel("1 - AUROC (%)" if reported == "test_error" else "test error (%)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs and rounds are whole
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
