"""Fault drill on a real local deployment: crash one process mid-run, let the documented
restart rule bring it back, and report what the federation did.

The deployment is scripts/deploy_local.py's (TLS, SuperNode authentication, site 0 with
two layer workers, site 1 with one), every process supervised as the deployment templates
do: restarted `--restart` seconds after it exits, its process group cleared first. Once
the run has checkpointed `--after-round` rounds, `--kill` gets SIGKILL (the process alone,
as a crash would). The report, printed and written as JSON: per round the sampled
clients, replies and failures, the round in which the killed site is back, the final
test error, the processes' exits and restarts, and every process of the deployment still
alive after it stopped (there must be none).

    python scripts/drill_restart.py --kill site1-supernode --after-round 1
    python scripts/drill_restart.py --kill superlink --after-round 2
    python scripts/drill_restart.py --kill none            # the undisturbed run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RUN_OVERRIDES = "train.negatives=random federation.min_clients=1"


sys.path.insert(0, str(ROOT / "scripts"))
import deploy_local  # noqa: E402  (a sibling script)


def rounds_done(out: Path) -> list[dict[str, Any]]:
    try:
        return json.loads((out / "metrics.json").read_text())["history"]
    except (OSError, ValueError, KeyError):
        return []  # not written yet, or being replaced


def program(cmdline: str) -> str:
    """'flower-superexec' of '/venv/bin/python3 /venv/bin/flower-superexec --flag ...'."""
    names = [word.rsplit("/", 1)[-1] for word in cmdline.split()]
    return next((n for n in names if not n.startswith("python")), names[0])


def drill(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The drill on a deployment of its own in `work`, and what was left of it after."""
    with deploy_local.deployment(work, restart=args.restart) as site:
        report = drill_on(site, args, work / "out")
    report["leftover_processes"] = deploy_local.leftovers(work)
    return report


def drill_on(site: Any, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """One run on a running deployment (deploy_local.Deployment), `args.kill` crashed
    once the run has checkpointed `args.after_round` rounds; the report of the run."""
    overrides = f"{RUN_OVERRIDES} federation.rounds={args.rounds} {args.overrides}".strip()
    run_config = [f"config='{args.config}'", f"overrides='{overrides}'", f"out-dir='{out}'"]
    report: dict[str, Any] = {"kill": args.kill, "after_round": args.after_round,
                              "restart_seconds": args.restart, "config": args.config,
                              "overrides": overrides}
    log = site.work / "logs/coordinator.log"
    coordinator = deploy_local.submit_async(
        site.env, run_config, args.timeout, "--resume-lost", str(args.resume_lost),
        stdout=open(log, "w"), stderr=subprocess.STDOUT)
    while args.kill != "none" and coordinator.poll() is None:
        if len(rounds_done(out)) >= args.after_round:
            site.procs.crash(args.kill)
            break
        time.sleep(0.5)
    report["coordinator_exit"] = coordinator.wait()
    report["coordinator_log"] = log.read_text()[-3000:]
    report["events"] = list(site.procs.events)
    if args.kill != "none":  # after its restart: one of each, no duplicates
        report["killed_unit_processes"] = settled_programs(site, args.kill)
    history = rounds_done(out)
    report["rounds"] = [{k: r.get(k) for k in ("round", "sampled", "replies", "failures",
                                                 "test_error")} for r in history]
    report["final_test_error"] = history[-1]["test_error"] if history else None
    report["resumed_after_rounds"] = json.loads(
        (out / "metrics.json").read_text()).get("resumed_after_rounds") if history else None
    report["site_back_in_round"] = back_in_round(history, args.after_round) \
        if args.kill.startswith("site") else None
    return report


def settled_programs(site: Any, unit: str, wait: float = 15.0) -> list[str]:
    """The unit's programs once the last round's ClientApp (a process per message, which
    may still be exiting when the run is reported finished) is gone, or after `wait` s."""
    deadline = time.monotonic() + wait
    while True:
        programs = sorted(program(cmd) for cmd in deploy_local.members(
            deploy_local.UNIT, site.procs.unit(unit)).values())
        if "flwr-clientapp" not in programs or time.monotonic() > deadline:
            return programs
        time.sleep(0.5)


def back_in_round(history: list[dict[str, Any]], after_round: int) -> int | None:
    """The first full round after the one the crash hit. The kill lands after round
    `after_round` checkpointed, but a fast site may have replied to the next round
    already, so the hit round is the first one short of replies, not a fixed number.
    Full means as many replies as round 1 had, when every site was up."""
    if not history:
        return None
    full = history[0]["replies"]
    later = [r for r in history if r["round"] > after_round]
    hit = next((i for i, r in enumerate(later) if r["replies"] < full), None)
    if hit is None:
        return None
    return next((r["round"] for r in later[hit + 1:] if r["replies"] == full), None)


def show(report: dict[str, Any]) -> None:
    print(f"\nkill {report['kill']} after round {report['after_round']}, restart after "
          f"{report['restart_seconds']} s; coordinator exit {report['coordinator_exit']}")
    print(f"{'round':>5} {'sampled':>8} {'replies':>8} {'test %':>7}  failures")
    for r in report["rounds"]:
        error = "-" if r["test_error"] is None else f"{100 * r['test_error']:.2f}"
        print(f"{r['round']:>5} {r['sampled']:>8} {r['replies']:>8} {error:>7}  "
              f"{'; '.join(r['failures'])[:90]}")
    for e in report["events"]:
        print(f"  t={e['t']:>6} s  {e['process']}: {e['event']}"
              + (f" (code {e['code']})" if "code" in e else ""))
    print(f"the killed unit's processes before the stop: "
          f"{report.get('killed_unit_processes')}")
    print(f"the run resumed after rounds: {report['resumed_after_rounds']}")
    print(f"site back in round: {report['site_back_in_round']}; final test error: "
          f"{report['final_test_error']}; processes left: {len(report['leftover_processes'])}")
    for line in report["leftover_processes"]:
        print(f"  left: {line}")


def main_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kill", default="site1-supernode",
                    help="superlink | site<i>-supernode | site<i>-worker<port> | none")
    ap.add_argument("--after-round", type=int, default=1)
    ap.add_argument("--restart", type=float, default=10.0,
                    help="seconds between a process's exit and its restart")
    ap.add_argument("--config", default="digits-ff")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--overrides", default="", help="more config overrides, k=v k=v")
    ap.add_argument("--resume-lost", type=int, default=1,
                    help="run_coordinator.py --resume-lost (0: a lost run stays lost)")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--work-dir", type=Path)
    ap.add_argument("--out", type=Path, default=Path("drill_restart.json"))
    return ap


def main(argv: list[str] | None = None) -> int:
    args = main_parser().parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fedff-drill-"))
    report = drill(args, work)
    show(report)
    args.out.write_text(json.dumps(report, indent=2))
    ok = report["coordinator_exit"] == 0 and not report["leftover_processes"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
