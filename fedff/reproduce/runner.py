"""`fedff reproduce TABLE`: run a results table's rows in order, resumably, into one folder.

Layout of `--out DIR` (default runs/reproduce/<table>[-quick]):
- `<row>/`: each run's own outputs (metrics.json, checkpoint.pt, plots), exactly what
  `fedff train` / `simulate` / `pipeline` write; `<row>/row.json` marks it finished;
- `results.json`: every row's figure beside the published and the README's;
- `table.md`: the same as a Markdown table in the README's format;
- `comparison.png`: measured, published and README figures side by side.
A second call skips finished rows and resumes an unfinished one from its checkpoint.
`--quick` runs every row on a tiny budget (a few hundred examples, one epoch or round):
it checks the machinery end to end, not the numbers.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from fedff import config as config_mod
from fedff import files
from fedff.config import ConfigError
from fedff.reproduce.tables import TABLES, Row, Table

QUICK = ("data.train_limit=600", "data.test_limit=300", "train.epochs=1")
QUICK_FEDERATION = ("federation.clients=2", "federation.min_clients=2", "federation.rounds=1",
                    "federation.local_epochs=1")


def table(name: str) -> Table:
    if name not in TABLES:
        raise ConfigError(f"unknown table '{name}'; `fedff reproduce --list` names them: "
                          f"{', '.join(TABLES)}")
    return TABLES[name]


def listing() -> str:
    lines = []
    for t in TABLES.values():
        seconds = sum(r.seconds for r in t.rows)
        cost = f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"
        lines.append(f"{t.name:<11} {len(t.rows):>2} runs, about {cost} on 2 cores: "
                     f"{t.title}")
    return "\n".join(lines)


def slug(row: Row) -> str:
    return re.sub(r"[^a-z0-9]+", "-", row.name.lower()).strip("-")[:60]


def row_config(row: Row, quick: bool, extra: list[str]) -> config_mod.Config:
    overrides = [*row.overrides, *extra]
    if quick:
        overrides += [*QUICK, *(QUICK_FEDERATION if row.command == "simulate" else ())]
    return config_mod.load(row.config, overrides)


def run_row(row: Row, cfg: config_mod.Config, out: Path, resume: bool) -> dict[str, Any]:
    """One row through the command the README used; returns its metrics.json summary."""
    if row.command == "simulate":
        from fedff.federation.simulation import simulate

        return simulate(cfg, out, resume=resume, show_progress=True)
    if row.command == "pipeline":
        from fedff.pipeline.driver import ChainOptions, run_pipeline

        return run_pipeline(cfg, out, ChainOptions(local=row.workers), resume=resume)
    from fedff.train import run

    return run(cfg, out, resume=resume)


def measured(row: Row, summary: dict[str, Any]) -> float:
    value = summary.get(row.metric)
    if value is None:
        raise RuntimeError(f"the run of '{row.name}' reported no {row.metric}")
    return 100.0 * float(value)


def reproduce(name: str, out: Path, quick: bool = False, extra: list[str] = ()
              ) -> dict[str, Any]:
    """Runs every unfinished row of table `name`; writes and returns results.json."""
    t = table(name)
    out.mkdir(parents=True, exist_ok=True)
    configs = [row_config(r, quick, list(extra)) for r in t.rows]  # bad keys fail first
    weights = [1.0 if quick else r.seconds for r in t.rows]
    bar = tqdm(total=sum(weights), desc=f"{name}: 0/{len(t.rows)} runs", unit="s",
               dynamic_ncols=True, bar_format="{desc} |{bar}| {percentage:3.0f}% "
               "[{elapsed}<{remaining}]")
    results = []
    for i, (row, cfg, weight) in enumerate(zip(t.rows, configs, weights)):
        folder = out / slug(row)
        done = folder / "row.json"
        if done.exists():
            result = json.loads(done.read_text())
        else:
            started = time.perf_counter()
            summary = run_row(row, cfg, folder, resume=(folder / "checkpoint.pt").exists())
            result = {"name": row.name, "command": row.command, "config": row.config,
                      "overrides": list(row.overrides), "metric": row.metric,
                      "value": measured(row, summary), "reference": row.reference,
                      "reference_value": row.reference_value,
                      "readme_value": row.readme_value,
                      "seconds": time.perf_counter() - started, "out": str(folder)}
            files.write_text(done, json.dumps(result, indent=2))
        results.append(result)
        bar.set_description(f"{name}: {i + 1}/{len(t.rows)} runs")
        bar.update(weight)
    bar.close()
    report = {"table": name, "title": t.title, "quick": quick, "metric": t.metric_label,
              "rows": results,
              "mean": _mean([r["value"] for r in results]) if t.mean_row else None}
    files.write_text(out / "results.json", json.dumps(report, indent=2))
    files.write_text(out / "table.md", markdown(t, results, quick))
    plot(t, results, out / "comparison.png")
    return report


def _pct(value: float | None) -> str:
    return "" if value is None else f"{value:.2f} %"


def markdown(t: Table, results: list[dict[str, Any]], quick: bool) -> str:
    head = [f"## {t.title}", ""]
    if quick:
        head += ["*--quick: a tiny budget per row; the figures check the machinery only.*",
                 ""]
    lines = [f"| run | {t.metric_label} | reference | fedff README | training time |",
             "| --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r['name']} (`{r['command']} --config {r['config']}"
                     + "".join(f" --set {o}" for o in r["overrides"]) + "`) | "
                     f"**{_pct(r['value'])}** | {r['reference']} | "
                     f"{_pct(r['readme_value'])} | {r['seconds']:,.0f} s |")
    if t.mean_row:
        lines.append("| **mean** | **" + _pct(_mean([r["value"] for r in results])) + "** | "
                     + " | ".join(_pct(_mean([r[k] for r in results]))
                                  for k in ("reference_value", "readme_value")) + " | |")
    return "\n".join([*head, *lines, "", *t.notes]).rstrip() + "\n"


def _mean(values: list[float | None]) -> float | None:
    return None if None in values else sum(values) / len(values)


def plot(t: Table, results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results)
    fig, ax = plt.subplots(figsize=(8, 0.55 * n + 1.5))
    ys = list(range(n))
    series = (("value", "this run", 0.0), ("readme_value", "fedff README", 0.27),
              ("reference_value", "published", -0.27))
    for key, label, shift in series:
        xs = [r[key] if r[key] is not None else 0.0 for r in results]
        ax.barh([y + shift for y in ys], xs, height=0.26, label=label)
    ax.set_yticks(ys, [r["name"] for r in results], fontsize=8)
    ax.invert_yaxis()
    values = [r[k] for r in results for k, _, _ in series if r[k] is not None]
    if t.metric_label.endswith("AUROC"):  # 50 % is chance: start where the bars differ
        ax.set_xlim(left=max(0.0, min(values) - 5.0), right=100.0)
    ax.set_xlabel(f"{t.metric_label} (%)")
    ax.set_title(t.title, fontsize=9)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
