"""`fedff simulate`: N clients on one host, on Flower's simulation engine (Ray).

Each simulated client is a virtual SuperNode whose node config carries `partition-id`
and `num-partitions`; Ray runs `federation.client_cpus` cores' worth of clients at a time.
The ServerApp runs in this process, so its progress bar and outputs are the user's.

This rests on Flower's `run_simulation`, which Flower 1.41 marks deprecated in favour of
`flwr run` (which fedff supports too: `flwr run .`, see the README). The `flwr run` path
runs the ServerApp in a subprocess of a background SuperLink: no progress bar here, and
a slower start. So `fedff simulate` keeps `run_simulation` and drops only its
deprecation notice, which would otherwise be the first line a user sees.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any

from fedff.config import Config, ConfigError
from fedff.federation.client_app import make_client_app
from fedff.federation.server_app import make_server_app


def check_simulation(cfg: Config) -> None:
    f = cfg.federation
    if f.min_clients > f.clients:
        raise ConfigError(f"federation.min_clients = {f.min_clients} but only "
                          f"{f.clients} clients are simulated; lower min_clients or raise "
                          f"federation.clients")
    cores = os.cpu_count() or 1
    if f.client_cpus > cores:
        raise ConfigError(f"federation.client_cpus = {f.client_cpus} but this host has "
                          f"{cores} cores; no client could ever start")


def _not_the_deprecation_notice(record: logging.LogRecord) -> bool:
    """Drops Flower's notice that `run_simulation` is deprecated (see the docstring)."""
    return "`run_simulation` function is deprecated" not in str(record.args or record.msg)


def backend_config(cfg: Config) -> dict[str, Any]:
    return {"client_resources": {"num_cpus": cfg.federation.client_cpus, "num_gpus": 0.0},
            "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False}}


def simulate(cfg: Config, out_dir: Path, resume: bool = False, show_progress: bool = True,
             verbose: bool = False) -> dict[str, Any]:
    """Runs the whole federation; returns the coordinator's metrics.json summary."""
    check_simulation(cfg)
    if not cfg.train.threads:  # each client uses the cores Ray reserves for it
        cfg = copy.deepcopy(cfg)
        cfg.train.threads = max(1, int(cfg.federation.client_cpus))
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    logging.getLogger("flwr").addFilter(_not_the_deprecation_notice)
    from flwr.simulation import run_simulation

    results: list[dict[str, Any]] = []
    run_simulation(
        server_app=make_server_app(cfg, str(out_dir), resume, show_progress, results),
        client_app=make_client_app(cfg),
        num_supernodes=cfg.federation.clients,
        backend_config=backend_config(cfg),
        verbose_logging=verbose)
    if not results:
        raise RuntimeError(f"the simulation ended without a result; see the log above and "
                           f"{out_dir}/metrics.json")
    return results[0]
