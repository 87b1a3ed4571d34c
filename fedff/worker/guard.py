"""Who may drive a worker, beyond holding the token: authorisation and a bounded log.

A token (or a client certificate) proves that a peer belongs to the deployment; it does
not say which run the peer drives. Three rules close that gap:
- **run binding**: the first CONFIGURE binds a worker to the run id it carries (kept in
  its checkpoint, so a restart stays bound). Every later call must name that run in its
  `fedff-run` metadata; a CONFIGURE or SetState for another run is refused unless it
  asks for an explicit reset (`fedff pipeline --reset-workers`). Reading the weights
  (GetState) needs the run id too, which only the run's own driver and chain hold.
- **downstream allow-list**: the operator, not the driver, decides where activations of
  a site's data may go: `--next` (then the driver's choice is ignored) or
  `--allow-downstream`; without either, only a loopback address is accepted.
- **bounded logging**: a refused call costs one short line per offending host and
  interval, so a flood of bad messages cannot fill the disk.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Any

import grpc

from fedff.errors import FedffError
from fedff.wire.security import RUN_HEADER, is_loopback


class Refused(FedffError):
    """A call this worker will not serve; `code` is the gRPC status to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def caller_run(context: grpc.ServicerContext) -> str | None:
    """The run id a call names in its metadata (None if it names none)."""
    return dict(context.invocation_metadata() or ()).get(RUN_HEADER)


def check_caller(bound: str | None, caller: str | None, worker: str) -> None:
    """A bound worker serves calls of its own run only."""
    if bound and caller != bound:
        raise Refused(grpc.StatusCode.PERMISSION_DENIED,
                      f"{worker} serves run {bound[:12]}; this call names "
                      f"{'no run' if not caller else 'run ' + caller[:12]}. Only that run's "
                      f"driver and chain may use it; another run takes it over with an "
                      f"explicit reset (fedff pipeline --reset-workers)")


def check_claim(current: dict[str, Any], setup: dict[str, Any], worker: str) -> bool:
    """May `setup` (a CONFIGURE or SetState) replace what this worker holds? True if it
    replaces another run's state (an explicit reset), False for the same run or a free
    worker; a claim on another run's worker without `reset` is refused."""
    run = setup.get("run")
    if not isinstance(run, str) or not run or len(run) > 128:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                      "the setup has no run id ('run': a string of 1-128 characters); "
                      "fedff drivers send one")
    bound = current.get("run")
    if not bound or bound == run:
        return False
    if setup.get("reset") is True:
        return True
    raise Refused(grpc.StatusCode.PERMISSION_DENIED,
                  f"{worker} serves run {bound[:12]} (layers [{current.get('first')}, "
                  f"{current.get('last')})); a CONFIGURE for run {run[:12]} would discard "
                  f"its training. If that run is over, start the new one with "
                  f"--reset-workers (the old checkpoint is kept as previous-run.pt)")


def check_downstream(setup: dict[str, Any], next_address: str | None,
                     allowed: tuple[str, ...], worker: str) -> None:
    """The driver may name a downstream only where the operator allows one."""
    downstream = setup.get("downstream")
    if not downstream or next_address:  # the last worker, or --next decides
        return
    if not isinstance(downstream, str):
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                      f"downstream must be a 'host:port' string, got {downstream!r}")
    if downstream in allowed or (not allowed and is_loopback(downstream)):
        return
    raise Refused(grpc.StatusCode.PERMISSION_DENIED,
                  f"{worker} will not send activations to {downstream}: its operator "
                  f"allowed {', '.join(allowed) if allowed else 'loopback addresses only'}. "
                  f"Start the worker with --next {downstream} (or --allow-downstream "
                  f"{downstream})")


def peer_host(peer: str) -> str:
    """'ipv4:10.0.0.5:51234' -> 'ipv4:10.0.0.5': one entry per host, not per connection."""
    return peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer


class RefusalLog:
    """At most one line per offending host every `every` seconds and `burst` lines per
    interval in all; what is held back is counted and reported with the next line."""

    def __init__(self, logger: logging.Logger, name: str, every: float = 60.0,
                 burst: int = 10, hosts: int = 1024):
        self.logger, self.name, self.every, self.burst, self.hosts = (
            logger, name, every, burst, hosts)
        self._lock = threading.Lock()
        self._last: OrderedDict[str, tuple[float, int]] = OrderedDict()  # host: (t, held)
        self._window = (0.0, 0)  # (start, lines written in it)
        self.refused = 0

    def note(self, peer: str, code: grpc.StatusCode, message: str) -> None:
        host, now = peer_host(peer), time.monotonic()
        with self._lock:
            self.refused += 1
            last, held = self._last.pop(host, (-self.every, 0))
            start, lines = self._window
            if now - start >= self.every:
                start, lines = now, 0
            if now - last < self.every or lines >= self.burst:
                self._last[host] = (last, held + 1)
            else:
                self._last[host] = (now, 0)
                lines += 1
                more = f" (and {held} more since the last line)" if held else ""
                self.logger.warning("%s: refused %s from %s%s: %s", self.name, code.name,
                                    host, more, message[:300])
            self._window = (start, lines)
            while len(self._last) > self.hosts:
                self._last.popitem(last=False)
