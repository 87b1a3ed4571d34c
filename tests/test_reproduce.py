"""`fedff reproduce`: every README results table runs end to end at a tiny budget, writes
its outputs, and a second call resumes instead of starting over."""

from __future__ import annotations

import json
import os

import pytest

from fedff.cli import main
from fedff.reproduce import runner
from fedff.reproduce.tables import TABLES


def test_list_names_every_table_with_its_cost(capsys):
    assert main(["reproduce", "--list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == list(TABLES)
    assert all("runs, about" in line for line in out)


def test_an_unknown_table_is_one_line_naming_the_tables(capsys):
    assert main(["reproduce", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedff: error: unknown table 'nope'") and "oneclass" in err


def test_every_row_is_a_valid_config():
    for table in TABLES.values():
        for row in table.rows:
            for quick in (False, True):
                runner.row_config(row, quick, [])  # raises on an unknown key or value


@pytest.mark.data
@pytest.mark.slow
@pytest.mark.parametrize("name", list(TABLES))
def test_every_table_reproduces_quickly_end_to_end(tmp_path, name, monkeypatch):
    data = os.environ["FEDFF_DATA_DIR"]
    out = tmp_path / name
    report = runner.reproduce(name, out, quick=True, extra=[f"data.data_dir={data}"])
    table = TABLES[name]
    assert [r["name"] for r in report["rows"]] == [r.name for r in table.rows]
    saved = json.loads((out / "results.json").read_text())
    assert saved == report and saved["quick"] is True
    lines = (out / "table.md").read_text().splitlines()
    for row, result in zip(table.rows, report["rows"]):
        assert 0.0 <= result["value"] <= 100.0
        assert (out / runner.slug(row) / "metrics.json").exists()
        line = next(x for x in lines if x.startswith(f"| {row.name} ("))
        assert f"**{result['value']:.2f} %**" in line and row.reference in line
    assert (out / "comparison.png").stat().st_size > 10_000
    if table.mean_row:  # one experiment in parts (one class per row): their mean too
        values = [r["value"] for r in report["rows"]]
        assert report["mean"] == pytest.approx(sum(values) / len(values))
        assert f"| **mean** | **{report['mean']:.2f} %** |" in "\n".join(lines)

    def no_rerun(*args, **kwargs):
        raise AssertionError("a finished row ran again")

    monkeypatch.setattr(runner, "run_row", no_rerun)  # finished rows are skipped
    assert runner.reproduce(name, out, quick=True, extra=[f"data.data_dir={data}"]) == report


def test_an_unfinished_row_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    """The run of a row that was interrupted continues with resume=True; finished rows
    are read back, not run."""
    calls = []

    def fake_run(row, cfg, out, resume):
        calls.append((row.name, resume))
        out.mkdir(parents=True, exist_ok=True)
        (out / "checkpoint.pt").write_bytes(b"")
        return {row.metric: 0.5}

    monkeypatch.setattr(runner, "run_row", fake_run)
    out = tmp_path / "oc"
    runner.reproduce("workers", out, quick=True)
    assert calls == [(r.name, False) for r in TABLES["workers"].rows]
    first = TABLES["workers"].rows[0]
    (out / runner.slug(first) / "row.json").unlink()  # as if killed before it finished
    calls.clear()
    report = runner.reproduce("workers", out, quick=True)
    assert calls == [(first.name, True)]
    assert [r["value"] for r in report["rows"]] == [50.0, 50.0]
