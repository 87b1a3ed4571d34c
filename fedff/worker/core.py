"""A layer worker's place in the chain, without gRPC: what it does with each batch id.

Per batch id, a worker does exactly one of three things (see proto/fedff/v1/worker.proto):
- the next id in sequence: run the block on it (stages.py), send the output downstream,
  and answer upstream once the downstream has answered;
- an id it has already trained (the upstream re-sent it after a reconnect): answer from
  the ack cache, or, after its own restart, ask the downstream to replay its answer;
- anything else (a gap, a malformed frame, a tensor of the wrong shape): refuse it
  (`WireError` / `ShapeError`, INVALID_ARGUMENT on the wire), with nothing applied.
The block and the head are the engine's own `LayerBlock`, unchanged.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict, deque
from dataclasses import replace
from typing import Any

import grpc
import torch

from fedff.config import ConfigError, from_dict
from fedff.engine.block import LayerBlock
from fedff.memory import release_free_memory
from fedff.v1 import worker_pb2 as pb
from fedff.wire.frames import Batch, WireError, decode_feedback, header_for, payload
from fedff.wire.link import Link
from fedff.wire.security import Security
from fedff.worker import checkpoints, codec, top_down
from fedff.worker.options import WorkerOptions
from fedff.worker.session import InFlight, Session
from fedff.worker.stages import Inline, Job, Stager, make_runner
from fedff.layers.contract import Pending

log = logging.getLogger("fedff.worker")


class WorkerCore:
    """The block, its link downstream, the batches in flight and the answers cached."""

    def __init__(self, options: WorkerOptions, security: Security = Security()):
        self.opt, self.security = options, security
        self.lock = threading.RLock()
        self.session: Session | None = None
        self.block: LayerBlock | None = None
        self.setup: dict[str, Any] = {}
        self.link: Link | None = None
        self.runner: Inline | Stager | None = None
        self.epoch = -1
        self.received_through = 0  # last id accepted; frontier(): last id fully applied
        self.own_durable = 0
        self.acks: OrderedDict[int, pb.Ack] = OrderedDict()
        self.inflight: dict[int, InFlight] = {}
        self.waiting: dict[int, list[Pending]] = {}  # top-down: pass 1 done, pass 2 not
        self.modulated: dict[int, torch.Tensor] = {}  # top-down, first worker: x_err
        self.errors_cached: deque[int] = deque()  # top-down: the acks that carry an error
        self.errors_back = threading.Condition(self.lock)  # top-down: an error came back
        self.replay: dict[str, Any] | None = None  # top-down: restarted mid-epoch (top_down)
        saved = checkpoints.load(options.checkpoint_dir)
        if saved is not None:
            self.configure(saved["setup"], saved)
            self.own_durable = self.received_through
            log.info("%s: resumed from %s at batch %d", options.name, options.checkpoint_dir,
                     self.received_through)

    # -- setup ---------------------------------------------------------------------------
    def configure(self, setup: dict[str, Any], state: dict[str, Any] | None = None,
                  reset: bool = False) -> None:
        """A fresh block, link and caches for `setup` (what Control(CONFIGURE) carries),
        loaded with `state` if given. Everything is built and loaded before the block in
        service is replaced, so a setup or state that fails leaves the worker as it was.
        `reset`: the setup takes over another run's worker; its checkpoint is set aside."""
        try:
            cfg = from_dict(setup["config"])
            codec.check_block_size(cfg, setup, self.opt.param_limit)
            block = LayerBlock(cfg, int(setup["features"]), int(setup["num_classes"]),
                               int(setup["first"]), int(setup["last"]), bool(setup["head"]),
                               self.opt.device)
            if state is not None:
                block.load_state_dict(state["block"])
                loaded = (int(state["epoch"]), int(state["trained_through"]),
                          checkpoints.read_acks(state))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"bad CONFIGURE request: {type(e).__name__}: {e}") from e
        n = len(cfg.model.hidden)
        downstream = self.opt.next_address or setup.get("downstream")
        if not downstream and setup["last"] < n:
            raise ConfigError(f"this worker holds layers [{setup['first']}, {setup['last']}) "
                              f"of {n} but has no downstream; pass its address")
        with self.lock:
            if reset:
                log.warning("%s: run %s replaced by run %s (explicit reset); the old "
                            "checkpoint is kept as previous-run.pt", self.opt.name,
                            str(self.setup.get("run"))[:12], str(setup.get("run"))[:12])
                checkpoints.set_aside(self.opt.checkpoint_dir)
            self.close()
            self.runner = make_runner(block, self._stage_done, self._stage_failed)
            self.block, self.setup = block, setup
            self.epoch, self.received_through, self.own_durable = -1, 0, 0
            if state is not None:
                self.epoch, self.received_through, self.acks = loaded
            else:
                self.acks.clear()
            self.replay = None if state is None else state.get("replay")
            self.inflight.clear()
            self.waiting.clear()
            self.modulated.clear()
            self.errors_cached.clear()
            self.link = None
            if setup["last"] < n:
                self.link = Link(downstream, self._on_downstream_ack,
                                 replace(self.security, run=self.run),
                                 window=self.opt.window, chunk_bytes=self.opt.chunk_bytes,
                                 retain=self.opt.retained,
                                 name=self.opt.name,
                                 wire_dtype=setup.get("wire_dtype", "float32"),
                                 wire_sparse=setup.get("wire_sparse", False))

    @property
    def run(self) -> str | None:
        """The run this worker is bound to (None: free)."""
        run = self.setup.get("run")
        return run if isinstance(run, str) and run else None

    def durable(self) -> int:
        if self.link is None:
            return self.own_durable
        return min(self.own_durable, self.link.durable_through)

    def frontier(self) -> int:
        """The last id up to which every update is applied (CFF all defers some)."""
        waiting = [i for i, f in self.inflight.items() if f.pending is not None or f.staged]
        waiting += list(self.waiting)  # top-down: pass 2 not applied yet
        return min(waiting) - 1 if waiting else self.received_through

    # -- checkpoints ---------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        assert self.block is not None
        return checkpoints.worker_state(self.setup, self.block.state_dict(), self.epoch,
                                        self.frontier(), self._durable_acks())

    def checkpoint(self, snapshot: dict[str, Any] | None = None) -> None:
        """Writes the live state, or `snapshot` (the block's state at one batch id)."""
        with self.lock:
            if self.block is None or self.opt.checkpoint_dir is None:
                return
            state = self.state() if snapshot is None else checkpoints.worker_state(
                self.setup, snapshot["block"], snapshot["epoch"],
                snapshot["trained_through"], self._durable_acks(), snapshot.get("replay"))
            checkpoints.save(self.opt.checkpoint_dir, state)
            self.own_durable = state["trained_through"]

    def _durable_acks(self) -> OrderedDict[int, pb.Ack]:
        """The acks a checkpoint keeps. A top-down learner's carry its error up (with
        factorised feedback, batch x 1024 floats each, written every 100 batches), and a
        restarted top-down worker needs none of them: it resumes only at window 1, where
        the upstream had every batch up to the checkpoint answered (top_down.resume);
        they stay out."""
        if self.block is None or not self.block.top_down:
            return self.acks
        return OrderedDict((bid, ack) for bid, ack in self.acks.items()
                           if not any(t.name == "signal" for t in ack.feedback.tensors))

    def wait_idle(self, timeout: float) -> None:
        if self.runner is not None:
            self.runner.wait_idle(timeout)

    def _snapshot(self, job: Job, bid: int) -> dict[str, Any] | None:
        assert self.block is not None
        return checkpoints.snapshot(self.block, job.snapshots, max(self.epoch, 0), bid)

    def _applied(self, bid: int, job: Job | None = None) -> None:
        """A training update is in the weights; checkpoint on the shared schedule."""
        if self.opt.checkpoint_every and bid % self.opt.checkpoint_every == 0:
            self.checkpoint(None if job is None else self._snapshot(job, bid))

    # -- a batch from upstream (called under the lock) -----------------------------------
    def accept(self, batch: Batch, session: Session) -> Batch | None:
        """Handles one batch; returns what goes downstream now, if anything."""
        bid = batch.batch_id
        if bid <= self.received_through:
            return self._answer_again(bid, session)
        if bid != self.received_through + 1:
            raise WireError(f"batch {bid} arrived but this worker has received through "
                            f"{self.received_through}; send batches in order")
        if batch.kind == pb.REPLAY:
            raise WireError(f"cannot replay batch {bid}: {self.opt.name} never trained it "
                            f"(lost in a crash of two neighbours); restart the run with "
                            f"--resume")
        job = self._job(batch)  # refuses a bad batch before anything is applied
        session.expect(bid)
        self.inflight[bid] = InFlight(kind=batch.kind, staged=True)
        self.received_through = bid
        assert self.runner is not None
        try:
            finished = self.runner.run(job)
        except Exception:  # an inline stage failed: the batch was not accepted
            del self.inflight[bid]
            self.received_through = bid - 1
            raise
        return self._after_stages(job) if finished else None  # else: _stage_done

    def _job(self, batch: Batch) -> Job:
        assert self.block is not None and self.runner is not None
        codec.check_kind(batch)
        job = Job(batch)
        if batch.kind == pb.TRAIN:
            job.packet = codec.train_packet(batch, self.block, int(self.setup["num_classes"]))
        elif batch.kind == pb.EVAL:
            job.x = codec.eval_input(batch, self.block)
            job.taps = codec.taps(batch, job.x.shape[0]) if batch.head else None
        if self.block.top_down and batch.kind != pb.EVAL:
            inputs = {**codec.pass2_inputs(batch, self.block), **self.modulated}
            self.modulated.clear()
            if self.replay is not None:
                inputs = top_down.resume(self, job, inputs)
            unknown = sorted(set(inputs) - set(self.waiting))
            if unknown:
                raise WireError(f"pass-2 inputs of batches {unknown} arrived, but this worker "
                                f"holds no pass 1 of them; send each batch's pass 2 once, "
                                f"after its error came back")
            job.finishing = {bid: (self.waiting.pop(bid), x2) for bid, x2 in inputs.items()}
            top_down.plan_checkpoint(self, job)
        every = self.opt.checkpoint_every
        due = batch.kind == pb.END_EPOCH or (batch.kind == pb.TRAIN and every
                                             and batch.batch_id % every == 0)
        if due and self.runner.takes_snapshots:
            job.snapshots = []
        return job

    def _answer_again(self, bid: int, session: Session) -> Batch | None:
        session.expect(bid)
        if bid in self.acks:
            session.fill(bid, self.acks[bid], self.durable())
        elif bid in self.inflight:
            pass  # answered when the downstream answers
        elif self.block is not None and self.block.top_down:
            # its error is gone (not checkpointed, or older than the errors kept); the
            # upstream acknowledged it before this worker's checkpoint (window 1)
            session.fill(bid, pb.Ack(batch_id=bid), self.durable())
        elif self.link is not None:
            self.inflight[bid] = InFlight(kind=pb.REPLAY)
            return Batch(batch_id=bid, kind=pb.REPLAY)
        else:
            session.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"batch {bid} was trained here but its answer is no longer cached; "
                          f"restart the run with --resume")
        return None

    def _stage_done(self, job: Job) -> None:
        """The last layer thread finished a job: continue as an inline run does."""
        with self.lock:
            out = self._after_stages(job)
        if out is not None:  # outside the lock: the send may wait for the window
            assert self.link is not None
            self.link.send(out)

    def _stage_failed(self, job: Job, error: BaseException) -> None:
        with self.lock:
            if self.session is not None:
                self.session.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"{self.opt.name} failed on batch {job.batch.batch_id}: "
                                   f"{type(error).__name__}: {error}")

    # -- after the block's stages: answer, or pass it on -----------------------------------
    def _after_stages(self, job: Job) -> Batch | None:
        assert self.block is not None
        batch, bid = job.batch, job.batch.batch_id
        flight = self.inflight[bid]
        flight.staged = False
        if batch.kind == pb.TRAIN:
            head = self.block.head
            if head is not None and head.epoch != batch.epoch:
                head.set_epoch(batch.epoch)
            self.epoch = batch.epoch
            return self._train_done(job)
        if batch.kind == pb.EVAL:
            assert job.x is not None
            return self._eval_done(batch, job.x, torch.stack(job.scores), job.taps)
        flight.snapshot = self._snapshot(job, bid)  # END_EPOCH
        if self.link is None:
            del self.inflight[bid]
            self.answer(bid, pb.END_EPOCH, job.metrics, {}, flight.snapshot)
            return None
        flight.metrics = job.metrics
        return Batch(batch_id=bid, kind=pb.END_EPOCH, epoch=batch.epoch,
                     tensors=top_down.pass2_out(self, job))

    def _train_done(self, job: Job) -> Batch | None:
        assert self.block is not None and job.packet is not None
        if self.block.top_down:
            return top_down.done(self, job)
        batch, nxt, metrics, pending = job.batch, job.packet, job.metrics, job.pending
        bid, last = batch.batch_id, self.link is None
        feedback: dict[str, torch.Tensor] = {}
        if last:
            if pending is not None:  # CFF all, last worker: every score is known now
                feedback["scores"], finish_metrics = self.block.finish(pending, None)
                metrics.update(finish_metrics)
                pending = None
            probs, head_metrics = self.block.train_head(nxt)
            metrics.update(head_metrics)
            if probs is not None and self.block.cfg.train.negatives == "hard-memory":
                feedback["probs"] = probs  # the driver remembers them for the next visit
        if pending is None:  # the update is in the weights
            self._applied(bid, job)
        if last:
            self.inflight.pop(bid, None)
            self.answer(bid, pb.TRAIN, metrics, feedback)
            return None
        self.inflight[bid] = InFlight(kind=pb.TRAIN, metrics=metrics, pending=pending)
        return codec.packet_batch(batch, nxt)

    def _eval_done(self, batch: Batch, out: torch.Tensor, scores: torch.Tensor,
                   taps: dict[int, torch.Tensor] | None) -> Batch | None:
        assert self.block is not None
        bid = batch.batch_id
        if self.link is None:
            feedback = {"scores": scores}
            if taps is not None and self.block.head is not None:
                feedback["logits"] = self.block.head.logits(self.block.head_features(taps))
            elif taps is not None and self.block.top_down:  # its output layer's logits
                feedback["logits"] = out
            self.inflight.pop(bid, None)
            self.answer(bid, pb.EVAL, {}, feedback)
            return None
        self.inflight[bid] = InFlight(kind=pb.EVAL, scores=scores)
        return codec.eval_batch(batch, out, taps)

    # -- answers from downstream -----------------------------------------------------------
    def _on_downstream_ack(self, ack: pb.Ack) -> None:
        with self.lock:
            flight = self.inflight.pop(ack.batch_id, None)
            if flight is None:
                return
            later = decode_feedback(ack.feedback, ack.feedback_data)
            metrics = dict(flight.metrics)
            feedback: dict[str, torch.Tensor] = {}
            if flight.kind == pb.REPLAY:
                feedback, metrics = later, {}
            elif flight.top_down:
                feedback = top_down.error_up(self, ack.batch_id, later)
                self.errors_back.notify_all()
            elif flight.kind == pb.TRAIN and flight.pending is not None:
                assert self.block is not None
                feedback["scores"], finish_metrics = self.block.finish(flight.pending,
                                                                       later.get("scores"))
                metrics.update(finish_metrics)
                self._applied(ack.batch_id)
            elif flight.kind == pb.EVAL:
                assert flight.scores is not None
                parts = [flight.scores] + ([later["scores"]] if "scores" in later else [])
                feedback["scores"] = torch.cat(parts)
                if "logits" in later:
                    feedback["logits"] = later["logits"]
            if flight.kind == pb.TRAIN and "probs" in later:  # the head's, on to the driver
                feedback["probs"] = later["probs"]
            metrics.update(ack.metrics)
            self.answer(ack.batch_id, flight.kind, metrics, feedback, flight.snapshot)

    def answer(self, bid: int, kind: int, metrics: dict[str, float],
                feedback: dict[str, torch.Tensor],
                snapshot: dict[str, Any] | None = None) -> None:
        """Caches the answer for bid and sends it upstream, in id order."""
        if kind == pb.END_EPOCH:
            self.checkpoint(snapshot)
            release_free_memory()
        ack = pb.Ack(batch_id=bid, metrics=metrics, feedback=header_for(feedback),
                     feedback_data=payload(feedback))
        self.acks[bid] = ack
        while len(self.acks) > self.opt.ack_cache:
            self.acks.popitem(last=False)
        if "signal" in feedback:
            top_down.forget_old_errors(self, bid)
        if self.session is not None:
            self.session.fill(bid, ack, self.durable())

    # -- inference outside the stream, and shutdown ----------------------------------------
    def infer(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's output and scores for a Forward request (no taps, no update)."""
        assert self.block is not None
        return self.block.infer(codec.eval_input(batch, self.block))

    def close(self) -> None:
        with self.lock:
            if self.runner is not None:
                self.runner.close()
            if self.link is not None:
                self.link.close()

