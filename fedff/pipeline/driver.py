"""The driver: streams a dataset into a chain of layer workers and runs the epochs.

`Pipeline` implements the same `Network` protocol (fedff/engine/network.py) as the
in-process `FFNetwork`, so the training loop, `evaluate` and a federation client drive
either. The difference is that `train_batch` returns as soon as the batch is on its
way; the chain trains up to `window` batches at once, one per worker, and the metrics
arrive with the acks. Its `state_dict()` gathers every worker's layers into the
in-process checkpoint format, so `fedff eval` scores a pipeline run as it is.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from collections import deque
from typing import Any

import grpc
import torch

from fedff.config import Config, ConfigError
from fedff.engine.network import (FFNetwork, InputSpec, check_batch, goodness_layers,
                                  label_overlays, load_memory, memory_state,
                                  prediction_memory, training_rows, visit_index, wrong_labels)
from fedff.errors import ShapeError
from fedff.ff import negatives as neg
from fedff.v1 import worker_pb2 as pb
from fedff.v1 import worker_pb2_grpc as pb_grpc
from fedff.wire.frames import WIRE_DTYPES, Batch, decode_feedback
from fedff.wire.link import Link, PeerError
from fedff.wire.security import Security, check_exposure
from fedff.wire.state import read_state, state_chunks

CONTROL_TIMEOUT = 60.0
REPORT_EVERY = 5.0  # seconds between "waiting for worker" lines
log = logging.getLogger("fedff.pipeline")


def split_layers(n_layers: int, n_workers: int) -> list[tuple[int, int]]:
    """Contiguous blocks, as even as possible: [first, last) per worker."""
    if not 1 <= n_workers <= n_layers:
        raise ConfigError(f"a chain of {n_workers} workers needs 1..{n_layers} workers for "
                          f"{n_layers} layers; use fewer workers or more layers")
    base, extra = divmod(n_layers, n_workers)
    blocks, first = [], 0
    for i in range(n_workers):
        last = first + base + (1 if i < extra else 0)
        blocks.append((first, last))
        first = last
    return blocks


def default_window(cfg: Config) -> int:
    """Batches in flight per link unless told: 4; PEPITA 1, since its error arrives
    `window` batches late and at the reference lr a window of 4 diverged (README)."""
    return 1 if cfg.train.algorithm == "pepita" else 4


def check_pipeline_config(cfg: Config) -> None:
    if cfg.train.algorithm == "supervised" and cfg.train.negatives == "hard":
        raise ConfigError("train.negatives = 'hard' needs the head's prediction for a batch "
                          "before that batch enters the chain, which a pipeline only has a "
                          "round trip later; use --set train.negatives=hard-memory (each "
                          "example's prediction from its previous visit) for a worker chain, "
                          "or train in-process with `fedff train`")


class Pipeline:
    def __init__(self, cfg: Config, spec: InputSpec, addresses: list[str],
                 security: Security = Security(), window: int = 4,
                 connect_timeout: float = 60.0, give_up_after: float | None = 600.0,
                 insecure: bool = False, run_id: str | None = None,
                 reset_workers: bool = False, wire_dtype: str = "float32",
                 wire_sparse: bool = False):
        check_pipeline_config(cfg)
        check_exposure(addresses, security, insecure, "drive")
        # Workers serve one run (worker/guard.py): every call names it. A resumed run
        # passes its own id; `reset_workers` takes over workers another run holds.
        self.run_id, self.reset_workers = run_id or uuid.uuid4().hex, reset_workers
        if wire_dtype not in WIRE_DTYPES:
            raise ConfigError(f"--wire-dtype {wire_dtype!r}: choose one of "
                              f"{', '.join(WIRE_DTYPES)}")
        self.wire_dtype = wire_dtype  # how every hop sends activations (frames.lighter)
        self.wire_sparse = wire_sparse  # and their zeros, as bits (wire/sparse.py)
        security = replace(security, run=self.run_id)
        self.cfg, self.spec, self.addresses, self.security = cfg, spec, addresses, security
        self.device = torch.device("cpu")
        self.supervised = cfg.train.algorithm == "supervised"
        self.blocks = split_layers(len(cfg.model.hidden), len(addresses))
        self.window, self.give_up_after = window, give_up_after
        self.generator = torch.Generator().manual_seed(cfg.train.seed)
        self.memory = prediction_memory(cfg, spec)
        self.epoch = 0
        self.batch_id = 0  # the last id handed to the link
        self._visits: dict[int, torch.Tensor | None] = {}  # training batches in flight
        self._metrics: deque[dict[str, float]] = deque()
        self._results: dict[int, dict[str, torch.Tensor]] = {}
        self._channels = [security.channel(a) for a in addresses]
        self._stubs = [pb_grpc.LayerWorkerStub(c) for c in self._channels]
        self._wait_ready(connect_timeout)
        self.setups = [self._setup(i) for i in range(len(addresses))]
        # From the end: a worker's downstream is configured before it starts sending.
        statuses = [self._control(i, pb.CONFIGURE, json.dumps(self.setups[i]))
                    for i in reversed(range(len(addresses)))]
        self.batch_id = max(int(s.trained_through) for s in statuses)
        self.link = self._new_link()

    @property
    def num_layers(self) -> int:
        return len(self.cfg.model.hidden)

    # -- setup -------------------------------------------------------------------------
    def _setup(self, i: int) -> dict[str, Any]:
        first, last = self.blocks[i]
        last_worker = i == len(self.addresses) - 1
        setup = {"run": self.run_id, "config": self.cfg.to_dict(),
                 "features": self.spec.features, "num_classes": self.spec.num_classes,
                 "first": first, "last": last, "head": last_worker,
                 "downstream": None if last_worker else self.addresses[i + 1],
                 "wire_dtype": self.wire_dtype, "wire_sparse": self.wire_sparse}
        return {**setup, "reset": True} if self.reset_workers else setup

    def _wait_ready(self, timeout: float) -> None:
        """Waits for every worker, saying every few seconds which one and what to check."""
        for address, channel in zip(self.addresses, self._channels):
            ready, deadline = grpc.channel_ready_future(channel), time.monotonic() + timeout
            while True:
                try:
                    ready.result(timeout=max(0.0, min(REPORT_EVERY, deadline - time.monotonic())))
                    break
                except grpc.FutureTimeoutError as e:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise PeerError(f"worker {address} not reachable after {timeout:.0f} "
                                        f"s; start it with `fedff worker --listen {address}` "
                                        f"(and the same TLS/token flags as this driver)") from e
                    log.warning("waiting for worker %s (%.0f s of %.0f): is `fedff worker` "
                                "running there, is the port open from here, and do its "
                                "TLS flags match this driver's?", address, timeout - left,
                                timeout)

    def _control(self, i: int, command: int, config_json: str = "") -> pb.WorkerStatus:
        try:
            return self._stubs[i].Control(pb.ControlRequest(command=command,
                                                            config_json=config_json),
                                          timeout=CONTROL_TIMEOUT,
                                          metadata=self.security.metadata())
        except grpc.RpcError as e:
            raise PeerError(f"worker {self.addresses[i]}: {e.code().name}: {e.details()}") from e

    def _new_link(self) -> Link:
        return Link(self.addresses[0], self._on_ack, self.security, window=self.window,
                    give_up_after=self.give_up_after, name="driver",
                    wire_dtype=self.wire_dtype, wire_sparse=self.wire_sparse)

    def abort(self, reason: str) -> None:
        """Makes the waiting driver fail now with `reason` (the launcher gave up on a worker)."""
        self.link.fail(reason)

    def statuses(self) -> list[pb.WorkerStatus]:
        return [self._control(i, pb.STATUS) for i in range(len(self.addresses))]

    def close(self, shutdown_workers: bool = False) -> None:
        self.link.close()
        if shutdown_workers:
            for i in range(len(self.addresses)):
                try:
                    self._control(i, pb.SHUTDOWN)
                except PeerError:
                    pass
        for channel in self._channels:
            channel.close()

    # -- training ----------------------------------------------------------------------
    def _on_ack(self, ack: pb.Ack) -> None:
        """A training batch's metrics, and the head's prediction for its examples where
        the memory keeps them; an inference's results, for `_infer`."""
        if ack.metrics:
            self._metrics.append(dict(ack.metrics))
        training, index = ack.batch_id in self._visits, self._visits.pop(ack.batch_id, None)
        if not ack.feedback.tensors:
            return
        feedback = decode_feedback(ack.feedback, ack.feedback_data)
        if not training:
            self._results[ack.batch_id] = feedback
        elif self.memory is not None and index is not None and "probs" in feedback:
            self.memory.remember(index, feedback["probs"])

    def _send(self, kind: int, tensors: dict[str, torch.Tensor] | None = None, n_pos: int = 0,
              head: bool = False, index: torch.Tensor | None = None) -> int:
        self.batch_id += 1
        if kind == pb.TRAIN:  # before the send: the ack may come back at once
            self._visits[self.batch_id] = index
        self.link.send(Batch(batch_id=self.batch_id, kind=kind, epoch=self.epoch, n_pos=n_pos,
                             head=head, tensors=tensors or {}))
        return self.batch_id

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def train_batch(self, x: torch.Tensor, labels: torch.Tensor,
                    index: torch.Tensor | None = None) -> dict[str, float]:
        """Sends one batch on its way; returns the metrics of an earlier one, if any.
        `hard-memory` negatives come from the examples' previous visit: every earlier
        epoch's acks are in (end_epoch waited for them), as in one process."""
        check_batch(self.spec, x, labels)
        if self.supervised:  # the first worker builds the overlays and the neutral rows
            if self.memory is not None:
                index = visit_index(index, x)
                wrong = self.memory.wrong_labels(labels, index, self.generator,
                                                 self.cfg.train.negatives_per_example)
            else:
                wrong = wrong_labels(self.cfg, self.spec, labels, self.generator)
            tensors = {"examples": x, "labels": labels, "wrong": wrong}
        else:
            rows = training_rows(self.cfg, self.spec, x, labels, self.generator)
            tensors = {"x": rows, "labels": labels}
        self._send(pb.TRAIN, tensors, n_pos=x.shape[0], index=index)
        return self._metrics.popleft() if self._metrics else {}

    def end_epoch(self) -> list[dict[str, float]]:
        """Waits for every batch's answer (and so every signal sent back up), then marks
        the epoch's end (every worker checkpoints) and waits for the chain to drain."""
        self.link.wait_acked(self.batch_id)
        self.link.wait_acked(self._send(pb.END_EPOCH))
        out = list(self._metrics)
        self._metrics.clear()
        return out

    # -- inference (what evaluate() calls) -----------------------------------------------
    def _infer(self, rows: torch.Tensor, head: bool) -> dict[str, torch.Tensor]:
        bid = self._send(pb.EVAL, {"x": rows}, head=head)
        self.link.wait_acked(bid)
        return self._results.pop(bid)

    @torch.no_grad()
    def label_scores(self, x: torch.Tensor) -> torch.Tensor:
        rows = label_overlays(self.cfg, self.spec.num_classes, x)
        scores = self._infer(rows, head=False)["scores"]
        return scores.view(self.num_layers, x.shape[0], self.spec.num_classes)

    @torch.no_grad()
    def head_logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.supervised:
            x = neg.neutral(x, self.spec.num_classes, self.cfg.train.label_strength)
        return self._infer(x, head=True)["logits"]

    def goodness_layers(self) -> list[int]:
        return goodness_layers(self.cfg)

    def in_process(self) -> FFNetwork:
        """The chain's layers gathered into one process (for the probes)."""
        local = FFNetwork(self.cfg, self.spec)
        local.load_state_dict(self.state_dict())
        return local

    # -- state -------------------------------------------------------------------------
    def _get_state(self, i: int) -> dict[str, Any]:
        try:
            return read_state(self._stubs[i].GetState(
                pb.StateRequest(), timeout=CONTROL_TIMEOUT, metadata=self.security.metadata()))
        except grpc.RpcError as e:
            raise PeerError(f"worker {self.addresses[i]}: {e.code().name}: {e.details()}") from e

    def state_dict(self) -> dict[str, Any]:
        """The whole network in the in-process checkpoint format (plus the chain's place)."""
        blocks = [self._get_state(i)["block"] for i in range(len(self.addresses))]
        return {"config": self.cfg.to_dict(), "spec": self.spec.__dict__,
                "layers": [ls for b in blocks for ls in b["layers"]],
                "head": blocks[-1]["head"], "epoch": self.epoch,
                "generator": self.generator.get_state(), **memory_state(self.memory),
                "pipeline": {"batch_id": self.batch_id, "run": self.run_id}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Pushes a network state (from a pipeline or an in-process run) into the chain."""
        if len(state["layers"]) != self.num_layers:
            raise ShapeError(f"checkpoint has {len(state['layers'])} layers, the chain has "
                             f"{self.num_layers}")
        self.link.close()
        for i, (first, last) in enumerate(self.blocks):
            worker_state = {"setup": self.setups[i], "epoch": int(state["epoch"]),
                            "trained_through": self.batch_id, "acks": {},
                            "block": {"first": first, "last": last,
                                      "layers": state["layers"][first:last],
                                      "head": state["head"] if i == len(self.blocks) - 1
                                      else None}}
            try:
                self._stubs[i].SetState(state_chunks(worker_state), timeout=CONTROL_TIMEOUT,
                                        metadata=self.security.metadata())
            except grpc.RpcError as e:
                raise PeerError(f"worker {self.addresses[i]}: {e.code().name}: "
                                f"{e.details()}") from e
        self.generator.set_state(state["generator"])
        load_memory(self.memory, state)
        self.epoch = int(state["epoch"])
        self.link = self._new_link()



@dataclass
class ChainOptions:
    addresses: list[str] = field(default_factory=list)  # remote workers, in chain order
    local: int = 0  # or: start this many workers on this host
    worker_threads: int = 1
    window: int = 4
    checkpoint_every: int = 100
    keep_workers: bool = False  # remote workers: leave them running afterwards
    insecure: bool = False  # drive remote workers without a token or mutual TLS
    reset_workers: bool = False  # take over remote workers that serve another run
    wire_dtype: str = "float32"  # activations on every hop: float32 | bfloat16 | float16
    wire_sparse: bool = False  # and their zeros as bits (lossless)
    worker_args: list[str] = field(default_factory=list)  # e.g. TLS flags for local workers


def resumed_run(out: Path, resume: bool) -> str | None:
    """The run id a resumed run goes on with, so that its workers still serve it."""
    from fedff import files
    from fedff.train import CHECKPOINT

    if not resume or not (out / CHECKPOINT).exists():
        return None
    saved = files.load(out / CHECKPOINT, keys=("network",))
    return saved["network"].get("pipeline", {}).get("run")


def run_pipeline(cfg: Config, out: Path, options: ChainOptions,
                 security: Security = Security(), show_progress: bool = True,
                 resume: bool = False) -> dict[str, Any]:
    """`fedff train`'s loop and outputs, with the layers in a chain of workers."""
    from fedff.pipeline.launcher import LocalChain
    from fedff.train import run

    check_pipeline_config(cfg)
    pipelines: list[Pipeline] = []

    def build(cfg: Config, ds: Any, device: torch.device) -> Pipeline:
        spec = InputSpec(ds.features, ds.image_shape, ds.num_classes)
        pipelines.append(Pipeline(cfg, spec, addresses, security, window=options.window,
                                  insecure=options.insecure, run_id=resumed_run(out, resume),
                                  reset_workers=options.reset_workers,
                                  wire_dtype=options.wire_dtype,
                                  wire_sparse=options.wire_sparse))
        return pipelines[-1]

    def give_up(reason: str) -> None:  # the launcher stopped restarting a worker
        for p in pipelines:
            p.abort(reason)

    def train() -> dict[str, Any]:
        try:
            return run(cfg, out, show_progress=show_progress, resume=resume, build=build)
        finally:
            for p in pipelines:
                p.close(shutdown_workers=not options.local and not options.keep_workers)

    if not options.local:
        addresses = options.addresses
        return train()
    with LocalChain(options.local, out / "workers", threads=options.worker_threads,
                    extra_args=options.worker_args, window=options.window,
                    checkpoint_every=options.checkpoint_every, on_failure=give_up) as chain:
        addresses = chain.addresses
        return train()
