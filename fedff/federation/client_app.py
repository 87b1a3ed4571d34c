"""The ClientApp: one data owner.

On a train message it loads the global arrays, trains the layers the coordinator names
for `federation.local_epochs` on its own partition (in this process, or through its own
layer workers when its node config names them) and replies with those layers' arrays,
its example count and timings. On an evaluate message it scores the global model on its
share of the test set.

Where the settings come from:
- the run config (`[tool.flwr.app.config]`, `flwr run --run-config`): `config` (a named
  fedff config or a TOML path) and `overrides` ("key=value key=value");
- the node config (`flower-supernode --node-config`): `partition-id`, `num-partitions`,
  and optionally `data-dir`, `workers` ("host:port,host:port", this site's chain) and
  the chain's TLS/token settings (`worker-tls-ca`, ..., see `_pipeline_builder`).
"""

from __future__ import annotations

import shlex
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedff import config as fedff_config
from fedff.config import Config
from fedff.federation.task import client_data, client_evaluate, client_train


def config_from_run(run_config: dict[str, Any]) -> Config:
    """The fedff Config a run config describes (the same on the server and every client)."""
    overrides = shlex.split(str(run_config.get("overrides", "")))
    return fedff_config.load(str(run_config.get("config", "digits-ff")), overrides)


def node_config(cfg: Config, node: dict[str, Any]) -> tuple[Config, int, int, list[str]]:
    """(cfg with this site's data dir, partition id, number of partitions, worker chain)."""
    if "partition-id" not in node or "num-partitions" not in node:
        raise fedff_config.ConfigError(
            "this SuperNode has no partition-id/num-partitions in its node config; start it "
            "with --node-config \"partition-id=0 num-partitions=2\"")
    if node.get("data-dir"):
        cfg.data.data_dir = str(node["data-dir"])
    workers = [a.strip() for a in str(node.get("workers", "")).split(",") if a.strip()]
    return cfg, int(node["partition-id"]), int(node["num-partitions"]), workers


def _pipeline_builder(addresses: list[str], context: Context, server_round: int):
    """Builds the Pipeline over this site's workers, with the node config's worker TLS
    (`worker-tls-ca`, `worker-tls-cert`, `worker-tls-key`, `worker-mtls`) and token
    (`worker-token-file`), the same settings as `fedff pipeline`'s flags; workers off
    this host without a token or mTLS need `worker-insecure=true`. The workers serve one
    round of one Flower run at a time: each round takes the site's workers over (the
    operator gave them to this SuperNode in its node config) and loads the global model,
    so the ClientApp of an unfinished round (a site that crashed mid-round, whose
    ClientApp outlived it) is refused by the workers instead of training into the next
    round's model."""
    node = dict(context.node_config)
    run_id = f"flower-{context.run_id}-node-{context.node_id}-round-{server_round}"
    from fedff.pipeline.driver import Pipeline
    from fedff.wire.security import Security

    def get(key: str) -> str | None:
        return str(node[key]) if node.get(key) else None

    security = Security.from_args(get("worker-tls-ca"), get("worker-tls-cert"),
                                  get("worker-tls-key"), bool(node.get("worker-mtls")),
                                  get("worker-token-file"))

    def build(cfg: Config, spec):
        return Pipeline(cfg, spec, addresses, security,
                        insecure=str(node.get("worker-insecure", "")).lower() in ("1", "true"),
                        run_id=run_id, reset_workers=True)
    return build


def setup(fixed: Config | None, context: Context) -> tuple[Config, Any, int, list[str]]:
    """(config, this client's data, partition id, worker chain) for one message."""
    cfg = fixed if fixed is not None else config_from_run(dict(context.run_config))
    cfg, pid, n, workers = node_config(fedff_config.from_dict(cfg.to_dict()),
                                       dict(context.node_config))
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    return cfg, client_data(cfg, pid, n), pid, workers


def train_reply(fixed: Config | None, msg: Message, context: Context) -> Message:
    cfg, ds, pid, workers = setup(fixed, context)
    settings: ConfigRecord = msg.content["config"]
    server_round = int(settings["server-round"])
    arrays, metrics = client_train(
        cfg, ds, msg.content["arrays"], server_round,
        [int(i) for i in settings["train-layers"]], partition_id=pid,
        build=_pipeline_builder(workers, context, server_round) if workers else None)
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}),
                   reply_to=msg)


def evaluate_reply(fixed: Config | None, msg: Message, context: Context) -> Message:
    cfg, ds, _, _ = setup(fixed, context)
    metrics = client_evaluate(cfg, ds, msg.content["arrays"])
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def make_client_app(fixed: Config | None = None) -> ClientApp:
    """A ClientApp for `fixed` (fedff simulate), or one that reads the run config
    (`flwr run` against a SuperLink: the module-level `app`)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return train_reply(fixed, msg, context)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return evaluate_reply(fixed, msg, context)

    return app


app = make_client_app()
