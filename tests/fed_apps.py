"""ClientApps with injected faults, for tests/test_simulation.py.

Ray's client workers import this module by name (the tests put tests/ on PYTHONPATH), so
the apps here are plain module-level code around fedff's own handlers.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedff.config import Config
from fedff.federation.client_app import evaluate_reply, train_reply


def recording_app(cfg: Config, folder: str) -> ClientApp:
    """fedff's client, which also writes every train reply's arrays and example count."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = train_reply(cfg, msg, context)
        pid = int(context.node_config["partition-id"])
        arrays = {k: v.numpy().tolist() for k, v in reply.content["arrays"].items()}
        n = int(reply.content["metrics"]["num-examples"])
        Path(folder, f"client{pid}.json").write_text(json.dumps({"n": n, "arrays": arrays}))
        return reply

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return evaluate_reply(cfg, msg, context)

    return app


def faulty_app(cfg: Config, fault: str, partition: int, seconds: float = 0.0) -> ClientApp:
    """fedff's client, except partition `partition`: it hangs for `seconds` ("hang") or
    raises ("raise"); with partition -1 every client raises."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        if partition in (pid, -1):
            if fault == "raise":
                raise RuntimeError(f"injected failure on partition {pid}")
            time.sleep(seconds)
        return train_reply(cfg, msg, context)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return evaluate_reply(cfg, msg, context)

    return app


def tests_dir() -> str:
    return os.path.dirname(os.path.abspath(__file__))
