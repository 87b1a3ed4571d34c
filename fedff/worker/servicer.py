"""The LayerWorker service: one block of layers, trained on the stream it receives.

Per batch id, a worker does exactly one of three things (see proto/fedff/v1/worker.proto):
- the next id in sequence: train (or evaluate) the block, send the output downstream,
  and answer upstream once the downstream has answered;
- an id it has already trained (the upstream re-sent it after a reconnect): answer from
  the ack cache, or, after its own restart, ask the downstream to replay its answer;
- anything else (a gap, a malformed frame, a tensor of the wrong shape): INVALID_ARGUMENT,
  with nothing applied, and the worker keeps serving.
The block and the head are the engine's own `LayerBlock`, unchanged.
"""

from __future__ import annotations

import ctypes
import io
import json
import logging
import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import grpc
import torch

from fedff.config import ConfigError, from_dict, validate
from fedff.ff import negatives as neg
from fedff.ff.block import BlockPending, LayerBlock, Packet
from fedff.ff.layer import ShapeError, lr_factor
from fedff.ff.network import overlay_rows
from fedff.train import peak_rss_mb, rss_mb
from fedff.v1 import worker_pb2 as pb
from fedff.v1 import worker_pb2_grpc as pb_grpc
from fedff.wire.frames import (CHUNK_BYTES, MAX_BATCH_BYTES, Assembler, Batch, WireError,
                               WireFrame, decode_feedback, encode, header_for, payload)
from fedff.worker.link import Link, PeerError
from fedff.worker.security import Security
from fedff.worker.stages import Job, Stager

log = logging.getLogger("fedff.worker")
CHECKPOINT = "worker.pt"
STATE_CHUNK = 2 * 2**20
_END = object()


@dataclass
class Abort:
    code: grpc.StatusCode
    message: str


def release_free_memory() -> None:
    """Returns freed heap pages to the OS (glibc), so RSS shows what the worker holds.

    Batches come and go as large short-lived buffers; without this, RSS at an epoch's end
    depends on where the allocator's high-water mark happened to be.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def state_chunks(state: dict[str, Any]) -> Iterator[pb.StateChunk]:
    """torch.save(state) cut into chunks (read back with weights_only=True: no pickles)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    chunks = max(1, -(-len(data) // STATE_CHUNK))
    for i in range(chunks):
        yield pb.StateChunk(chunk=i, chunks=chunks,
                            data=data[i * STATE_CHUNK:(i + 1) * STATE_CHUNK])


class Session:
    """One upstream Train stream: its reply queue, emitted strictly in batch-id order."""

    def __init__(self) -> None:
        self.replies: queue.SimpleQueue = queue.SimpleQueue()
        self.slots: OrderedDict[int, pb.Ack | None] = OrderedDict()
        self.closed = False
        self.draining = False  # the upstream half-closed: end once every answer is out

    def expect(self, batch_id: int) -> None:
        self.slots[batch_id] = None

    def fill(self, batch_id: int, ack: pb.Ack, durable: int) -> None:
        if batch_id not in self.slots:
            return
        self.slots[batch_id] = ack
        while self.slots and next(iter(self.slots.values())) is not None:
            _, first = self.slots.popitem(last=False)
            self.replies.put(pb.TrainReply(ack=first, durable_through=durable))
        if self.draining and not self.slots:
            self.close()

    def drain(self) -> None:
        self.draining = True
        if not self.slots:
            self.close()

    def abort(self, code: grpc.StatusCode, message: str) -> None:
        self.replies.put(Abort(code, message))

    def close(self) -> None:
        self.closed = True
        self.replies.put(_END)


@dataclass
class InFlight:
    kind: int
    metrics: dict[str, float] = field(default_factory=dict)
    pending: BlockPending | None = None
    scores: torch.Tensor | None = None  # EVAL: this block's scores, [layers, rows]
    staged: bool = False  # still in the layer threads (see stages.py)
    snapshot: dict[str, Any] | None = None  # END_EPOCH: the block's state at this id


@dataclass
class WorkerOptions:
    name: str = "worker"
    checkpoint_dir: Path | None = None
    checkpoint_every: int = 100  # batches; ids are global, so every worker checkpoints alike
    window: int = 4
    device: str = "cpu"
    next_address: str | None = None  # overrides the downstream named by CONFIGURE
    max_batch_bytes: int = MAX_BATCH_BYTES
    chunk_bytes: int = CHUNK_BYTES
    ack_cache: int = 1024


class LayerWorkerServicer(pb_grpc.LayerWorkerServicer):
    def __init__(self, options: WorkerOptions, security: Security = Security(),
                 on_shutdown: Callable[[], None] = lambda: None):
        self.opt, self.security, self.on_shutdown = options, security, on_shutdown
        self._lock = threading.RLock()
        self._consume = threading.Lock()  # one upstream consumer at a time
        self._session: Session | None = None
        self.block: LayerBlock | None = None
        self.setup: dict[str, Any] = {}
        self.link: Link | None = None
        self.stager: Stager | None = None
        self.head_epoch = -1
        self.epoch = -1
        self.received_through = 0  # last id accepted; _frontier(): last id fully applied
        self.own_durable = 0
        self.acks: OrderedDict[int, pb.Ack] = OrderedDict()
        self.inflight: dict[int, InFlight] = {}
        if options.checkpoint_dir is not None and (options.checkpoint_dir / CHECKPOINT).exists():
            self._restore(options.checkpoint_dir / CHECKPOINT)

    # -- setup -------------------------------------------------------------------------
    def _configure(self, setup: dict[str, Any]) -> None:
        try:
            cfg = from_dict(setup["config"])
            validate(cfg)
            block = LayerBlock(cfg, int(setup["features"]), int(setup["num_classes"]),
                               int(setup["first"]), int(setup["last"]), bool(setup["head"]),
                               self.opt.device)
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"bad CONFIGURE request: {e}") from e
        with self._lock:
            if self.link is not None:
                self.link.close()
            if self.stager is not None:
                self.stager.close()
            self.stager = (Stager(block, self._stage_done, self._stage_failed)
                           if len(block.layers) > 1 and block.mode != "all" else None)
            self.head_epoch = -1
            self.block, self.setup = block, setup
            self.epoch, self.received_through = -1, 0
            self.own_durable = 0
            self.acks.clear()
            self.inflight.clear()
            downstream = self.opt.next_address or setup.get("downstream")
            self.link = None
            if downstream and setup["last"] < len(cfg.model.hidden):
                self.link = Link(downstream, self._on_downstream_ack, self.security,
                                 window=self.opt.window, chunk_bytes=self.opt.chunk_bytes,
                                 retain=2 * self.opt.checkpoint_every + 4 * self.opt.window,
                                 name=self.opt.name)
            elif setup["last"] < len(cfg.model.hidden):
                raise ConfigError(f"this worker holds layers [{setup['first']}, "
                                  f"{setup['last']}) of {len(cfg.model.hidden)} but has no "
                                  f"downstream; pass its address")

    def status(self) -> pb.WorkerStatus:
        with self._lock:
            s = self.setup
            return pb.WorkerStatus(
                worker=self.opt.name, configured=self.block is not None,
                first_layer=int(s.get("first", 0)), last_layer=int(s.get("last", 0)),
                head=bool(s.get("head", False)), epoch=max(self.epoch, 0),
                trained_through=self._frontier(), durable_through=self.durable(),
                downstream=self.link.address if self.link else "",
                peak_rss_mb=peak_rss_mb(), rss_mb=rss_mb())

    def durable(self) -> int:
        if self.link is None:
            return self.own_durable
        return min(self.own_durable, self.link.durable_through)

    # -- checkpoints -------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        assert self.block is not None
        return {"setup": self.setup, "block": self.block.state_dict(), "epoch": self.epoch,
                "trained_through": self._frontier(),
                "acks": {k: v.SerializeToString() for k, v in self.acks.items()}}

    def checkpoint(self, snapshot: dict[str, Any] | None = None) -> None:
        """Writes the live state, or `snapshot` (a staged block's state at one batch id)."""
        with self._lock:
            if self.block is None or self.opt.checkpoint_dir is None:
                return
            path = self.opt.checkpoint_dir / CHECKPOINT
            path.parent.mkdir(parents=True, exist_ok=True)
            state = self._state() if snapshot is None else {
                "setup": self.setup, **snapshot,
                "acks": {k: v.SerializeToString() for k, v in self.acks.items()}}
            torch.save(state, path.with_suffix(".tmp"))
            path.with_suffix(".tmp").replace(path)
            self.own_durable = state["trained_through"]

    def checkpoint_now(self) -> None:
        """A checkpoint on request (Control, shutdown): first let layer threads finish."""
        if self.stager is not None:
            self.stager.wait_idle(timeout=30)
        self.checkpoint()

    def _restore(self, path: Path) -> None:
        state = torch.load(path, weights_only=True)
        self._configure(state["setup"])
        self._load(state)
        self.own_durable = self.received_through
        log.info("%s: resumed from %s at batch %d", self.opt.name, path, self.received_through)

    def _load(self, state: dict[str, Any]) -> None:
        assert self.block is not None
        self.block.load_state_dict(state["block"])
        self._set_epoch(int(state["epoch"]))
        self.received_through = int(state["trained_through"])
        self.acks = OrderedDict((int(k), pb.Ack.FromString(v))
                                for k, v in state.get("acks", {}).items())

    def _set_epoch(self, epoch: int) -> None:
        assert self.block is not None
        if epoch != self.epoch and epoch >= 0:
            t = self.block.cfg
            self.block.set_epoch(epoch, lr_factor(t.optim.schedule, epoch, t.train.epochs))
        self.epoch = epoch

    # -- Train -------------------------------------------------------------------------
    def Train(self, request_iterator: Iterator[WireFrame], context: grpc.ServicerContext
              ) -> Iterator[pb.TrainReply]:
        if self.block is None:  # transient: the driver configures the chain from the end
            context.abort(grpc.StatusCode.UNAVAILABLE,
                          f"{self.opt.name} is not configured yet; the driver sends "
                          f"Control(CONFIGURE)")
        session = Session()
        with self._lock:
            if self._session is not None:
                self._session.close()
            self._session = session
            ready = pb.TrainReply(ready=pb.Ready(worker=self.opt.name,
                                                 trained_through=self.received_through),
                                  durable_through=self.durable())
        yield ready
        consumer = threading.Thread(target=self._consume_stream,
                                    args=(request_iterator, session), daemon=True)
        consumer.start()
        context.add_callback(session.close)
        while True:
            item = session.replies.get()
            if item is _END:
                return
            if isinstance(item, Abort):
                context.abort(item.code, item.message)
            yield item

    def _consume_stream(self, frames: Iterator[WireFrame], session: Session) -> None:
        assembler = Assembler(self.opt.max_batch_bytes)
        with self._consume:
            try:
                for frame in frames:
                    if session.closed:
                        return
                    batch = assembler.add(frame)
                    if batch is not None:
                        self._handle(batch, session)
                with self._lock:
                    session.drain()
            except (WireError, ShapeError) as e:
                log.warning("%s: refused a batch: %s", self.opt.name, e)
                session.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            except grpc.RpcError:
                session.close()  # the upstream went away; it will reconnect
            except PeerError as e:  # the chain below refused: pass it up, keep serving
                log.error("%s: %s", self.opt.name, e)
                session.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
            except Exception as e:  # noqa: BLE001 - report, keep serving
                log.exception("%s: failed on a batch", self.opt.name)
                session.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              f"{self.opt.name} failed: {type(e).__name__}: {e}")

    def _handle(self, batch: Batch, session: Session) -> None:
        with self._lock:
            out = self._accept(batch, session)
        if out is not None:  # outside the lock: the send may wait for the window
            assert self.link is not None
            self.link.send(out)

    def _accept(self, batch: Batch, session: Session) -> Batch | None:
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
        session.expect(bid)
        return self._process(batch)

    def _answer_again(self, bid: int, session: Session) -> Batch | None:
        session.expect(bid)
        if bid in self.acks:
            session.fill(bid, self.acks[bid], self.durable())
        elif bid in self.inflight:
            pass  # answered when the downstream answers
        elif self.link is not None:
            self.inflight[bid] = InFlight(kind=pb.REPLAY)
            return Batch(batch_id=bid, kind=pb.REPLAY)
        else:
            session.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"batch {bid} was trained here but its answer is no longer cached; "
                          f"restart the run with --resume")
        return None

    def _process(self, batch: Batch) -> Batch | None:
        """Runs the block on one batch; returns what goes downstream (None at the end)."""
        assert self.block is not None
        bid, last = batch.batch_id, self.link is None
        if self.stager is not None:
            return self._submit(batch)
        if batch.kind == pb.END_EPOCH:
            self.received_through = bid
            if last:
                self._answer(bid, pb.END_EPOCH, {}, {})
                return None
            self.inflight[bid] = InFlight(kind=pb.END_EPOCH)
            return Batch(batch_id=bid, kind=pb.END_EPOCH, epoch=batch.epoch)
        if batch.kind == pb.TRAIN:
            return self._process_train(batch)
        if batch.kind == pb.EVAL:
            return self._process_eval(batch)
        raise WireError(f"batch {bid} has frame kind {batch.kind}; send TRAIN, EVAL, "
                        f"END_EPOCH or REPLAY")

    # -- a block of several layers: one thread per layer (stages.py) --------------------
    def _submit(self, batch: Batch) -> None:
        """Validates a batch here, so a bad one is refused before any layer sees it."""
        assert self.stager is not None
        bid, kind = batch.batch_id, batch.kind
        job = Job(batch)
        if kind == pb.TRAIN:
            job.packet = self._packet(batch)
        elif kind == pb.EVAL:
            job.x = self._input(batch, "x")
            job.taps = self._taps(batch) if batch.head else None
        elif kind != pb.END_EPOCH:
            raise WireError(f"batch {bid} has frame kind {kind}; send TRAIN, EVAL, "
                            f"END_EPOCH or REPLAY")
        every = self.opt.checkpoint_every
        if kind == pb.END_EPOCH or (kind == pb.TRAIN and every and bid % every == 0):
            job.snapshots = []
        self.inflight[bid] = InFlight(kind=kind, staged=True)
        self.received_through = bid
        self.stager.submit(job)
        return None

    def _stage_done(self, job: Job) -> None:
        """The last layer thread finished a job: continue as the inline path does."""
        with self._lock:
            out = self._after_stages(job)
        if out is not None:
            assert self.link is not None
            self.link.send(out)

    def _stage_failed(self, job: Job, error: BaseException) -> None:
        with self._lock:
            if self._session is not None:
                self._session.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"{self.opt.name} failed on batch {job.batch.batch_id}: "
                                    f"{type(error).__name__}: {error}")

    def _after_stages(self, job: Job) -> Batch | None:
        assert self.block is not None
        batch, bid = job.batch, job.batch.batch_id
        flight = self.inflight[bid]
        flight.staged = False
        if batch.kind == pb.TRAIN:
            assert job.packet is not None
            head = self.block.head
            if head is not None and self.head_epoch != batch.epoch:
                cfg = self.block.cfg
                head.set_lr_factor(lr_factor(cfg.optim.schedule, batch.epoch,
                                             cfg.train.epochs))
                self.head_epoch = batch.epoch
            self.epoch = batch.epoch
            return self._train_done(batch, job.packet, job.metrics, job=job)
        if batch.kind == pb.EVAL:
            assert job.x is not None
            return self._eval_done(batch, job.x, torch.stack(job.scores), job.taps)
        flight.snapshot = self._snapshot(job, bid)  # END_EPOCH
        if self.link is None:
            del self.inflight[bid]
            self._answer(bid, pb.END_EPOCH, {}, {}, flight.snapshot)
            return None
        return Batch(batch_id=bid, kind=pb.END_EPOCH, epoch=batch.epoch)

    def _snapshot(self, job: Job, bid: int) -> dict[str, Any]:
        assert self.block is not None and job.snapshots is not None
        head = self.block.head
        return {"block": {"first": self.block.first, "last": self.block.last,
                          "layers": job.snapshots,
                          "head": None if head is None else head.state_dict()},
                "epoch": max(self.epoch, 0), "trained_through": bid}

    # -- a block run inline, on the consumer thread ------------------------------------
    def _process_train(self, batch: Batch) -> Batch | None:
        assert self.block is not None
        packet = self._packet(batch)
        self._set_epoch(batch.epoch)
        nxt, pending, metrics = self.block.train(packet)
        self.received_through = batch.batch_id
        return self._train_done(batch, nxt, metrics, pending)

    def _process_eval(self, batch: Batch) -> Batch | None:
        assert self.block is not None
        taps = self._taps(batch) if batch.head else None
        out, scores = self.block.infer(self._input(batch, "x"), taps)
        self.received_through = batch.batch_id
        return self._eval_done(batch, out, scores, taps)

    # -- after a block's step (inline or staged): answer, or pass it on -------------------
    def _train_done(self, batch: Batch, nxt: Packet, metrics: dict[str, float],
                    pending: BlockPending | None = None, job: Job | None = None
                    ) -> Batch | None:
        assert self.block is not None
        bid, last = batch.batch_id, self.link is None
        feedback: dict[str, torch.Tensor] = {}
        if last:
            if pending is not None:  # CFF all, last worker: every score is known now
                feedback["scores"], finish_metrics = self.block.finish(pending, None)
                metrics.update(finish_metrics)
                pending = None
            metrics.update(self.block.train_head(nxt))
        if pending is None:  # the update is in the weights
            self._applied(bid, job)
        if last:
            self.inflight.pop(bid, None)
            self._answer(bid, pb.TRAIN, metrics, feedback)
            return None
        self.inflight[bid] = InFlight(kind=pb.TRAIN, metrics=metrics, pending=pending)
        return self._packet_batch(batch, nxt)

    def _eval_done(self, batch: Batch, out: torch.Tensor, scores: torch.Tensor,
                   taps: dict[int, torch.Tensor] | None) -> Batch | None:
        assert self.block is not None
        bid = batch.batch_id
        if self.link is None:
            feedback = {"scores": scores}
            if taps is not None and self.block.head is not None:
                feedback["logits"] = self.block.head.logits(self.block.head_features(taps))
            self.inflight.pop(bid, None)
            self._answer(bid, pb.EVAL, {}, feedback)
            return None
        self.inflight[bid] = InFlight(kind=pb.EVAL, scores=scores)
        tensors = {"x": out, **{f"tap.{i}": t for i, t in (taps or {}).items()}}
        return Batch(batch_id=bid, kind=pb.EVAL, head=batch.head, tensors=tensors)

    @staticmethod
    def _taps(batch: Batch) -> dict[int, torch.Tensor]:
        """The head-layer outputs collected upstream ("tap.<layer>")."""
        return {int(k[4:]): v for k, v in batch.tensors.items() if k.startswith("tap.")}

    def _tensor(self, batch: Batch, name: str, dtype: torch.dtype,
                required: bool = True) -> torch.Tensor | None:
        t = batch.tensors.get(name)
        if t is None:
            if required:
                raise WireError(f"batch {batch.batch_id} has no tensor '{name}'")
            return None
        if t.dtype != dtype:
            raise WireError(f"tensor '{name}' of batch {batch.batch_id} is {t.dtype}, "
                            f"expected {dtype}")
        return t

    def _packet(self, batch: Batch) -> Packet:
        labels = self._tensor(batch, "labels", torch.int64, False)
        if "examples" in batch.tensors:  # supervised, first worker: build the rows here
            x, neutral = self._overlays(batch, labels)
        else:
            x = self._tensor(batch, "x", torch.float32)
            neutral = self._tensor(batch, "neutral", torch.float32, False)
        assert x is not None
        rows = x.shape[0]
        self._check_input(x, "x")
        if neutral is not None:
            self._check_input(neutral, "neutral")
        if not 0 < batch.n_pos <= rows:
            raise ShapeError(f"n_pos must be in 1..{rows} (the rows of x), got {batch.n_pos}")
        packet = Packet(x=x, n_pos=batch.n_pos,
                        gamma=self._tensor(batch, "gamma", torch.float32, False),
                        neutral=neutral, labels=labels,
                        taps=self._taps(batch))
        if packet.gamma is not None and packet.gamma.shape != (rows,):
            raise ShapeError(f"gamma must have shape [{rows}], got {list(packet.gamma.shape)}")
        if packet.neutral is not None and packet.neutral.dim() != 2:
            raise ShapeError(f"neutral must be 2-D, got {list(packet.neutral.shape)}")
        if packet.labels is not None and packet.labels.dim() != 1:
            raise ShapeError(f"labels must be 1-D, got {list(packet.labels.shape)}")
        if packet.labels is not None and self.block is not None and self.block.head is not None:
            c = self.block.head.linear.out_features
            if packet.labels.numel() and not 0 <= int(packet.labels.min()) <= \
                    int(packet.labels.max()) < c:
                raise ShapeError(f"labels must lie in 0..{c - 1}")
        return packet

    def _check_input(self, x: torch.Tensor, what: str) -> None:
        assert self.block is not None
        self.block.layers[0].check_input(x, what)

    def _input(self, batch: Batch, name: str) -> torch.Tensor:
        x = self._tensor(batch, name, torch.float32)
        assert x is not None
        self._check_input(x, name)
        return x

    def _overlays(self, batch: Batch, labels: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """[positives; negatives] and the neutral rows from the examples and labels."""
        assert self.block is not None
        examples = self._tensor(batch, "examples", torch.float32)
        wrong = self._tensor(batch, "wrong", torch.int64)
        c = int(self.setup["num_classes"])
        n = examples.shape[0]
        if labels is None or labels.shape != (n,) or wrong.shape != (n,):
            raise ShapeError(f"examples need one label and one wrong label each: [{n}]")
        if n and not (0 <= int(torch.minimum(labels, wrong).min())
                      and int(torch.maximum(labels, wrong).max()) < c):
            raise ShapeError(f"labels must lie in 0..{c - 1}")
        if batch.n_pos != n:
            raise ShapeError(f"n_pos must equal the number of examples ({n}), got "
                             f"{batch.n_pos}")
        cfg = self.block.cfg
        x = overlay_rows(cfg, c, examples, labels, wrong)
        return x, neg.neutral(examples, c, cfg.train.label_strength)

    @staticmethod
    def _packet_batch(batch: Batch, p: Packet) -> Batch:
        tensors: dict[str, torch.Tensor] = {"x": p.x}
        for name in ("gamma", "neutral", "labels"):
            if getattr(p, name) is not None:
                tensors[name] = getattr(p, name)
        tensors.update({f"tap.{i}": t for i, t in p.taps.items()})
        return Batch(batch_id=batch.batch_id, kind=pb.TRAIN, epoch=batch.epoch,
                     n_pos=p.n_pos, tensors=tensors)

    def _applied(self, bid: int, job: Job | None = None) -> None:
        """A training update is in the weights; checkpoint on the shared schedule (a
        staged block from the per-layer snapshots its job took at this id)."""
        if self.opt.checkpoint_every and bid % self.opt.checkpoint_every == 0:
            self.checkpoint(None if job is None else self._snapshot(job, bid))

    def _frontier(self) -> int:
        """The last id up to which every update is applied (CFF all defers some)."""
        waiting = [i for i, f in self.inflight.items() if f.pending is not None or f.staged]
        return min(waiting) - 1 if waiting else self.received_through

    # -- answers from downstream -------------------------------------------------------
    def _on_downstream_ack(self, ack: pb.Ack) -> None:
        with self._lock:
            flight = self.inflight.pop(ack.batch_id, None)
            if flight is None:
                return
            later = decode_feedback(ack.feedback, ack.feedback_data)
            metrics = dict(flight.metrics)
            feedback: dict[str, torch.Tensor] = {}
            if flight.kind == pb.REPLAY:
                feedback = later
                metrics = {}
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
            metrics.update(ack.metrics)
            self._answer(ack.batch_id, flight.kind, metrics, feedback, flight.snapshot)

    def _answer(self, bid: int, kind: int, metrics: dict[str, float],
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
        if self._session is not None:
            self._session.fill(bid, ack, self.durable())

    # -- the other RPCs ----------------------------------------------------------------
    def Forward(self, request_iterator: Iterator[WireFrame], context: grpc.ServicerContext
                ) -> Iterator[WireFrame]:
        assembler = Assembler(self.opt.max_batch_bytes)
        try:
            for frame in request_iterator:
                batch = assembler.add(frame)
                if batch is None:
                    continue
                if self.stager is not None:
                    self.stager.wait_idle(timeout=60)
                with self._lock:
                    self._require_block(context)
                    out, scores = self.block.infer(self._input(batch, "x"))
                yield from encode(Batch(batch_id=batch.batch_id, kind=pb.EVAL,
                                        tensors={"out": out, "scores": scores}),
                                  self.opt.chunk_bytes)
        except (WireError, ShapeError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    def _require_block(self, context: grpc.ServicerContext) -> None:
        if self.block is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"{self.opt.name} is not configured; the driver sends "
                          f"Control(CONFIGURE)")

    def GetState(self, request: pb.StateRequest, context: grpc.ServicerContext
                 ) -> Iterator[pb.StateChunk]:
        if self.stager is not None:
            self.stager.wait_idle(timeout=60)
        with self._lock:
            self._require_block(context)
            state = self._state()
        yield from state_chunks(state)

    def SetState(self, request_iterator: Iterator[pb.StateChunk],
                 context: grpc.ServicerContext) -> pb.WorkerStatus:
        parts = []
        for i, chunk in enumerate(request_iterator):
            if chunk.chunk != i:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"state chunk {chunk.chunk} arrived, expected {i}")
            parts.append(chunk.data)
        try:
            state = torch.load(io.BytesIO(b"".join(parts)), weights_only=True)
            with self._lock:
                setup = state.get("setup") or self.setup
                if not setup:
                    raise ConfigError("not configured and the state carries no setup")
                self._configure(setup)  # a fresh block, link and caches, then the state
                self._load(state)
                self.checkpoint()
        except Exception as e:  # noqa: BLE001 - any unreadable state is the caller's error
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"cannot load this state: {e}")
        return self.status()

    def Control(self, request: pb.ControlRequest, context: grpc.ServicerContext
                ) -> pb.WorkerStatus:
        if request.command == pb.CONFIGURE:
            try:
                setup = json.loads(request.config_json)
                if setup != self.setup:  # the same setup again: keep the resumed state
                    self._configure(setup)
            except (json.JSONDecodeError, ConfigError, ShapeError) as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        elif request.command == pb.CHECKPOINT:
            self.checkpoint_now()
        elif request.command == pb.SHUTDOWN:
            self.close_session()
            self.checkpoint_now()
            status = self.status()
            self.on_shutdown()
            return status
        elif request.command != pb.STATUS:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"unknown command {request.command}")
        return self.status()

    def close_session(self) -> None:
        """Stops taking batches from the upstream (it will reconnect and re-send)."""
        with self._lock:
            if self._session is not None:
                self._session.close()

    def close(self) -> None:
        self.close_session()
        with self._lock:
            if self.stager is not None:
                self.stager.close()
            if self.link is not None:
                self.link.close()
