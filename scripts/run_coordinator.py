"""Submit a fedff run to a federation, follow it, and exit with its real status.

`flwr run` returns as soon as the SuperLink accepted the run, with status 0 even when the
run later fails. This script submits the run (`flwr run APP CONNECTION`), polls
`flwr ls CONNECTION --run-id ID --format json` until the run is finished, shows its
status and elapsed time on a progress line, and then:

- exit 0 when the run finished as `completed`;
- exit 1 when it failed or was stopped, after printing the end of the run's log
  (`flwr log ID CONNECTION --show`), where the coordinator lists every client error;
- exit 2 on a usage problem (no such connection, flwr missing, submission refused);
- exit 3 when --timeout passes first (the run is stopped with `flwr stop`).

A SuperLink that stops answering while the run is followed (it restarted, or its
machine did) is waited for; once it is back the run's status tells what happened.
A restarted SuperLink ends the run it held (`finished:failed`): with `--resume-lost N`
the run is submitted again with `resume=true`, and fedff's ServerApp continues after its
last checkpointed round (the run config's `out-dir` must be the same, and on the
coordinator's disk). The JSON line printed at the end lists every submission, its status
and the outages it saw.

CONNECTION is a SuperLink connection in the Flower config (`$FLWR_HOME/config.toml`,
default ~/.flwr/config.toml; see deploy/federation/README.md), e.g. a remote SuperLink
with TLS, or `local` for Flower's local simulation SuperLink.

    python scripts/run_coordinator.py --connection site-link \\
        --run-config 'config="mnist-ff-3x1000-short" overrides="federation.rounds=5"'
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from typing import Any

from tqdm import tqdm

FINISHED_OK = "finished:completed"


class CoordinatorError(RuntimeError):
    pass


def flwr(*args: str, timeout: float = 120) -> str:
    exe = shutil.which("flwr")
    if exe is None:
        raise CoordinatorError("the `flwr` command is not on PATH; install fedff "
                               "(pip install -e .) in this environment")
    done = subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise CoordinatorError(f"`flwr {' '.join(args)}` failed ({done.returncode}): "
                               f"{(done.stdout + done.stderr).strip()[-1500:]}")
    return done.stdout


def parse_json(text: str) -> dict[str, Any]:
    """flwr's --format json output (the last JSON object it printed)."""
    start = text.find("{")
    if start < 0:
        raise CoordinatorError(f"flwr printed no JSON: {text.strip()[-500:]}")
    return json.loads(text[start:])


def submit(app: str, connection: str, run_config: list[str]) -> int:
    args = ["run", app, connection, "--format", "json"]
    for item in run_config:
        args += ["--run-config", item]
    reply = parse_json(flwr(*args, timeout=600))
    if not reply.get("success", True) or "run-id" not in reply:
        raise CoordinatorError(f"the SuperLink refused the run: {reply}")
    return int(reply["run-id"])


def status(connection: str, run_id: int) -> tuple[str, str]:
    reply = parse_json(flwr("ls", connection, "--run-id", str(run_id), "--format", "json"))
    if reply.get("success") is False:  # e.g. "Connection to the SuperLink is unavailable"
        raise CoordinatorError(str(reply.get("error-message", reply)).strip())
    runs = reply.get("runs") or []
    if not runs:
        raise CoordinatorError(f"run {run_id} is not known to {connection}: {reply}")
    run = runs[0]
    return str(run.get("status", "unknown")), str(run.get("elapsed", ""))


def show_log(connection: str, run_id: int, lines: int) -> None:
    try:
        text = flwr("log", str(run_id), connection, "--show", timeout=60)
    except (CoordinatorError, subprocess.TimeoutExpired) as err:
        print(f"(could not fetch the run's log: {err})", file=sys.stderr)
        return
    print("\n".join(text.splitlines()[-lines:]), file=sys.stderr)


def follow(connection: str, run_id: int, poll: float, deadline: float | None,
           quiet: bool, outages: list[dict[str, float]]) -> str:
    """Polls until the run finishes or the deadline passes. A SuperLink that stops
    answering (restarting, or its machine rebooting) is waited for and the outage noted:
    the run's fate is only known once it is back."""
    bar = tqdm(desc=f"run {run_id}", bar_format="{desc} [{elapsed}]", disable=quiet)
    lost: float | None = None
    try:
        while True:
            try:
                state, elapsed = status(connection, run_id)
            except (CoordinatorError, subprocess.TimeoutExpired) as err:
                if "not known" in str(err):
                    raise
                lost = time.monotonic() if lost is None else lost
                state, elapsed = "SuperLink unreachable", f"{time.monotonic() - lost:.0f}"
            else:
                if lost is not None:
                    outages.append({"seconds": round(time.monotonic() - lost, 1)})
                    lost = None
            bar.set_description_str(f"run {run_id}: {state}, run time {elapsed} s")
            if state.startswith("finished"):
                return state
            if deadline is not None and time.monotonic() > deadline:
                if lost is None:
                    flwr("stop", str(run_id), connection)
                return "timeout"
            time.sleep(poll)
    finally:
        bar.close()


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], str]:
    """Submits and follows the run; with --resume-lost, a run that ended unfinished
    across a SuperLink outage is submitted again with resume=true (the ServerApp then
    continues after its last checkpointed round), at most --resume-lost times."""
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    runs, run_config = [], list(args.run_config)
    while True:
        run_id = submit(args.app, args.connection, run_config)
        print(f"submitted run {run_id} to {args.connection}", file=sys.stderr)
        outages: list[dict[str, float]] = []
        state = follow(args.connection, run_id, args.poll, deadline, args.quiet, outages)
        runs.append({"run-id": run_id, "status": state, "superlink_outages": outages})
        if state in (FINISHED_OK, "timeout") or not outages or len(runs) > args.resume_lost:
            return runs, state
        print(f"run_coordinator: run {run_id} ended as {state} after the SuperLink was "
              f"unreachable for {outages[-1]['seconds']:.0f} s; submitting it again with "
              f"resume=true", file=sys.stderr)
        run_config = [*args.run_config, "resume=true"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--app", default=".", help="the Flower app to submit (default: .)")
    ap.add_argument("--connection", required=True,
                    help="SuperLink connection name in the Flower config")
    ap.add_argument("--run-config", action="append", default=[], metavar="K=V ...",
                    help="run config overrides, as for `flwr run --run-config`")
    ap.add_argument("--poll", type=float, default=2.0, help="seconds between status checks")
    ap.add_argument("--timeout", type=float, help="give up (and stop the run) after S s")
    ap.add_argument("--resume-lost", type=int, default=0, metavar="N",
                    help="submit a run that a SuperLink restart ended again, resuming "
                         "from its checkpoint (run config out-dir), up to N times")
    ap.add_argument("--log-lines", type=int, default=60,
                    help="lines of the run's log to print when it failed")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    try:
        runs, state = run(args)
    except (CoordinatorError, subprocess.TimeoutExpired) as err:
        print(f"run_coordinator: error: {err}", file=sys.stderr)
        return 2
    run_id = runs[-1]["run-id"]
    print(json.dumps({"run-id": run_id, "status": state, "runs": runs}))
    if state == FINISHED_OK:
        return 0
    if state == "timeout":
        print(f"run_coordinator: run {run_id} did not finish within {args.timeout:.0f} s; "
              f"stopped it", file=sys.stderr)
        return 3
    print(f"run_coordinator: run {run_id} ended as {state}; its log:", file=sys.stderr)
    show_log(args.connection, run_id, args.log_lines)
    return 1


if __name__ == "__main__":
    sys.exit(main())
