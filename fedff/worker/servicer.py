"""The LayerWorker service: one short method per RPC (proto/fedff/v1/worker.proto).

What the worker does with a batch lives in core.py, how a batch decodes in codec.py, how
the block runs in stages.py; this file turns RPCs into calls on the core and the core's
refusals into status codes: a bad batch or state is INVALID_ARGUMENT (nothing applied,
the worker keeps serving), a failure below is FAILED_PRECONDITION, a call from outside
the worker's run PERMISSION_DENIED (guard.py). Every refusal goes through `refuse`: one
bounded log line per offending host, never a traceback.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Callable, Iterator

import grpc

from fedff.config import ConfigError
from fedff.engine.block import LayerBlock
from fedff.errors import ShapeError
from fedff.memory import peak_rss_mb, rss_mb
from fedff.v1 import worker_pb2 as pb
from fedff.v1 import worker_pb2_grpc as pb_grpc
from fedff.wire.frames import Assembler, Batch, WireError, WireFrame, encode
from fedff.wire.link import PeerError
from fedff.wire.security import Security
from fedff.wire.state import read_state, state_chunks
from fedff.worker import codec, guard, top_down
from fedff.worker.core import WorkerCore
from fedff.worker.options import WorkerOptions
from fedff.worker.session import END, Abort, Session

log = logging.getLogger("fedff.worker")
REFUSED = (WireError, ShapeError)


class LayerWorkerServicer(pb_grpc.LayerWorkerServicer):
    def __init__(self, options: WorkerOptions, security: Security = Security(),
                 on_shutdown: Callable[[], None] = lambda: None):
        self.opt, self.on_shutdown = options, on_shutdown
        self.core = WorkerCore(options, security)
        self._consume = threading.Lock()  # one upstream consumer at a time
        self.refusals = guard.RefusalLog(log, options.name)

    def refuse(self, context: grpc.ServicerContext, code: grpc.StatusCode, message: str):
        """Answers `code` with `message` (and logs it, within the bound); never returns."""
        self.refusals.note(context.peer(), code, message)
        context.abort(code, message)

    def _check_caller(self, context: grpc.ServicerContext) -> None:
        try:
            guard.check_caller(self.core.run, guard.caller_run(context), self.opt.name)
        except guard.Refused as e:
            self.refuse(context, e.code, str(e))

    @property
    def block(self) -> LayerBlock | None:
        """The block this worker serves (None until a driver configures it)."""
        return self.core.block

    def status(self) -> pb.WorkerStatus:
        core = self.core
        with core.lock:
            s = core.setup
            return pb.WorkerStatus(
                worker=self.opt.name, configured=core.block is not None,
                first_layer=int(s.get("first", 0)), last_layer=int(s.get("last", 0)),
                head=bool(s.get("head", False)), epoch=max(core.epoch, 0),
                trained_through=core.frontier(), durable_through=core.durable(),
                downstream=core.link.address if core.link else "",
                peak_rss_mb=peak_rss_mb(), rss_mb=rss_mb())

    # -- Train -------------------------------------------------------------------------
    def Train(self, request_iterator: Iterator[WireFrame], context: grpc.ServicerContext
              ) -> Iterator[pb.TrainReply]:
        core = self.core
        if core.block is None:  # transient: the driver configures the chain from the end
            context.abort(grpc.StatusCode.UNAVAILABLE,
                          f"{self.opt.name} is not configured yet; the driver sends "
                          f"Control(CONFIGURE)")
        self._check_caller(context)
        session, peer = Session(), context.peer()
        with core.lock:
            if core.session is not None:
                core.session.close()
            core.session = session
            ready = pb.TrainReply(ready=pb.Ready(worker=self.opt.name,
                                                 trained_through=core.received_through),
                                  durable_through=core.durable())
        yield ready
        threading.Thread(target=self._consume_stream, args=(request_iterator, session, peer),
                         daemon=True).start()
        context.add_callback(session.close)
        while (item := session.replies.get()) is not END:
            if isinstance(item, Abort):
                context.abort(item.code, item.message)
            yield item

    def _consume_stream(self, frames: Iterator[WireFrame], session: Session, peer: str) -> None:
        assembler = Assembler(self.opt.max_batch_bytes)
        with self._consume:
            try:
                for frame in frames:
                    if session.closed:
                        return
                    batch = assembler.add(frame)
                    if batch is not None:
                        self._handle(batch, session)
                with self.core.lock:
                    session.drain()
            except REFUSED as e:
                self.refusals.note(peer, grpc.StatusCode.INVALID_ARGUMENT, str(e))
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
        if not top_down.wait_for_errors(self.core, batch.batch_id, lambda: session.closed):
            return
        with self.core.lock:
            out = self.core.accept(batch, session)
        if out is not None:  # outside the lock: the send may wait for the window
            assert self.core.link is not None
            self.core.link.send(out)

    # -- the other RPCs ----------------------------------------------------------------
    def Forward(self, request_iterator: Iterator[WireFrame], context: grpc.ServicerContext
                ) -> Iterator[WireFrame]:
        self._check_caller(context)
        assembler = Assembler(self.opt.max_batch_bytes)
        try:
            for frame in request_iterator:
                batch = assembler.add(frame)
                if batch is None:
                    continue
                self.core.wait_idle(timeout=60)
                with self.core.lock:
                    self._require_block(context)
                    out, scores = self.core.infer(batch)
                yield from encode(Batch(batch_id=batch.batch_id, kind=pb.EVAL,
                                        tensors={"out": out, "scores": scores}),
                                  self.opt.chunk_bytes)
        except REFUSED as e:
            self.refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))

    def _require_block(self, context: grpc.ServicerContext) -> None:
        if self.core.block is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"{self.opt.name} is not configured; the driver sends "
                          f"Control(CONFIGURE)")

    def GetState(self, request: pb.StateRequest, context: grpc.ServicerContext
                 ) -> Iterator[pb.StateChunk]:
        self._check_caller(context)
        self.core.wait_idle(timeout=60)
        with self.core.lock:
            self._require_block(context)
            state = self.core.state()
        yield from state_chunks(state)

    def SetState(self, request_iterator: Iterator[pb.StateChunk],
                 context: grpc.ServicerContext) -> pb.WorkerStatus:
        """Replaces the block's state; a state that fails to load changes nothing."""
        core = self.core
        self._check_caller(context)
        try:
            state = read_state(request_iterator, self._max_state_bytes())
            with core.lock:
                setup = state.get("setup") or core.setup
                if not setup:
                    raise ConfigError("not configured and the state carries no setup")
                reset = self._admit(setup)
                core.configure(setup, state, reset)
                core.checkpoint()
        except guard.Refused as e:
            self.refuse(context, e.code, str(e))
        except Exception as e:  # noqa: BLE001 - any unreadable state is the caller's error
            self.refuse(context, grpc.StatusCode.INVALID_ARGUMENT,
                        f"cannot load this state: {e}")
        return self.status()

    def _max_state_bytes(self) -> int:
        """A state holds about 16 bytes per parameter; a larger one is not a state."""
        return 16 * self.opt.param_limit + 2**20

    def _admit(self, setup: dict) -> bool:
        """Run binding and the downstream allow-list (guard.py); True for a reset."""
        codec.check_setup(setup)
        reset = guard.check_claim(self.core.setup, setup, self.opt.name)
        guard.check_downstream(setup, self.opt.next_address, self.opt.allow_downstream,
                               self.opt.name)
        setup.pop("reset", None)
        return reset

    def Control(self, request: pb.ControlRequest, context: grpc.ServicerContext
                ) -> pb.WorkerStatus:
        if request.command == pb.CONFIGURE:
            self._configure(request.config_json, context)
        elif request.command == pb.CHECKPOINT:
            self._check_caller(context)
            self.checkpoint_now()
        elif request.command == pb.SHUTDOWN:
            self._check_caller(context)
            self.close_session()
            self.checkpoint_now()
            status = self.status()
            self.on_shutdown()
            return status
        elif request.command != pb.STATUS:
            self.refuse(context, grpc.StatusCode.INVALID_ARGUMENT,
                        f"unknown command {request.command}; send CONFIGURE, STATUS, "
                        f"CHECKPOINT or SHUTDOWN")
        return self.status()

    def _configure(self, config_json: str, context: grpc.ServicerContext) -> None:
        try:
            setup = json.loads(config_json)
            with self.core.lock:
                reset = self._admit(setup)
                if setup != self.core.setup:  # the same setup again: keep the resumed state
                    self.core.configure(setup, reset=reset)
        except guard.Refused as e:
            self.refuse(context, e.code, str(e))
        except (ValueError, RecursionError) as e:  # bad JSON, ConfigError, ShapeError
            self.refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(e)[:2000])

    # -- lifecycle ---------------------------------------------------------------------
    def checkpoint_now(self) -> None:
        """A checkpoint on request (Control, shutdown): first let layer threads finish."""
        self.core.wait_idle(timeout=30)
        self.core.checkpoint()

    def close_session(self) -> None:
        """Stops taking batches from the upstream (it will reconnect and re-send)."""
        with self.core.lock:
            if self.core.session is not None:
                self.core.session.close()

    def close(self) -> None:
        self.close_session()
        self.core.close()
