"""The sending end of a Train stream: window, retention, reconnect and re-send.

Both the driver (to the first worker) and every worker (to the next) send through a
`Link`. It gives three guarantees the chain is built on:
- backpressure: `send` blocks while `window` batches are unacknowledged, so a slow worker
  slows everything upstream of it and memory stays bounded;
- no loss: every batch is kept until the receiver reports it durable (in a checkpoint
  of the receiver and of everything below it); after a reconnect, everything kept is
  sent again, and the receiver answers what it already trained from its ack cache;
- waiting, not crashing: an unreachable peer is retried with backoff and reported.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from typing import Callable, Iterator

import grpc

from fedff.errors import FedffError
from fedff.v1 import worker_pb2 as pb
from fedff.wire.frames import CHUNK_BYTES, Batch, WireFrame, encode, lighter
from fedff.wire.rpc import train_method
from fedff.wire.security import Security

log = logging.getLogger("fedff.link")
_END = object()


class PeerError(FedffError, RuntimeError):
    """The peer refused a batch, or stayed unreachable past the deadline."""


class Link:
    def __init__(self, address: str, on_ack: Callable[[pb.Ack], None],
                 security: Security = Security(), window: int = 4, retain: int = 256,
                 chunk_bytes: int = CHUNK_BYTES, ack_timeout: float = 120.0,
                 give_up_after: float | None = None, name: str = "link",
                 wire_dtype: str = "float32", wire_sparse: bool = False):
        self.address, self.on_ack, self.security = address, on_ack, security
        self.wire_dtype = wire_dtype  # activations travel as this (frames.lighter)
        self.wire_sparse = wire_sparse  # and their zeros as bits (wire/sparse.py)
        self.bytes_sent = 0  # tensor bytes of every batch queued (re-sends not counted)
        self.window, self.retain, self.chunk_bytes = window, retain, chunk_bytes
        self.ack_timeout, self.give_up_after, self.name = ack_timeout, give_up_after, name
        self._kept: OrderedDict[int, list[WireFrame]] = OrderedDict()
        self._cond = threading.Condition()
        self._outbox: queue.SimpleQueue | None = None
        self.sent_through = 0
        self.acked_through = 0
        self.durable_through = 0
        self.error: BaseException | None = None
        self._closed = False
        self._channel = security.channel(address)
        self._train = train_method(self._channel)
        self._thread = threading.Thread(target=self._run, name=f"{name}-{address}", daemon=True)
        self._thread.start()

    # -- the caller's side -------------------------------------------------------------
    def send(self, batch: Batch) -> None:
        """Queues one batch; blocks while the window (or the retention limit) is full.

        The frames view the batch's tensors until the batch is durable downstream: do
        not modify them in place after sending.
        """
        frames = encode(lighter(batch, self.wire_dtype, self.wire_sparse), self.chunk_bytes)
        with self._cond:
            while not self._closed and self.error is None and (
                    self.sent_through - self.acked_through >= self.window
                    or len(self._kept) >= self.retain):
                self._cond.wait(1.0)
            self._raise_if_failed()
            if not self._kept and self.sent_through == self.acked_through:
                # Nothing outstanding: start wherever the caller's sequence is (a restarted
                # worker resumes mid-run).
                self.sent_through = self.acked_through = batch.batch_id - 1
            if batch.batch_id != self.sent_through + 1:
                raise PeerError(f"{self.name}: batch {batch.batch_id} sent after "
                                f"{self.sent_through}; ids must be consecutive")
            self._kept[batch.batch_id] = frames
            self.bytes_sent += sum(f.size for f in frames)
            self.sent_through = batch.batch_id
            if self._outbox is not None:
                for frame in frames:
                    self._outbox.put(frame)

    def wait_acked(self, batch_id: int, timeout: float | None = None) -> None:
        """Blocks until every batch up to batch_id is acknowledged."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self.acked_through < batch_id:
                self._raise_if_failed()
                if deadline is not None and time.monotonic() > deadline:
                    raise PeerError(f"{self.name}: no ack for batch {batch_id} from "
                                    f"{self.address} within {timeout:.0f} s")
                self._cond.wait(0.5)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            if self._outbox is not None:
                self._outbox.put(_END)
            self._cond.notify_all()
        self._channel.close()
        self._thread.join(timeout=5)

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise PeerError(f"{self.name}: {self.error}") from self.error
        if self._closed:
            raise PeerError(f"{self.name}: link to {self.address} is closed")

    # -- the connection thread ---------------------------------------------------------
    def _requests(self, outbox: queue.SimpleQueue) -> Iterator[WireFrame]:
        while True:
            item = outbox.get()
            if item is _END:
                return
            yield item

    def _run(self) -> None:
        backoff, down_since, reported = 0.2, None, 0.0
        while not self._closed:
            try:
                self._stream()
                backoff, down_since = 0.2, None
            except grpc.RpcError as e:
                if self._closed:
                    return
                if e.code() in (grpc.StatusCode.INVALID_ARGUMENT,
                                grpc.StatusCode.UNAUTHENTICATED,
                                grpc.StatusCode.PERMISSION_DENIED,
                                grpc.StatusCode.FAILED_PRECONDITION):
                    self._fail(PeerError(f"{self.address} refused the stream: "
                                         f"{e.code().name}: {e.details()}"))
                    return
                now = time.monotonic()
                down_since = down_since or now
                if now - reported > 10:
                    log.warning("%s: downstream %s unavailable (%s); %d batches waiting, "
                                "retrying", self.name, self.address, e.code().name,
                                len(self._kept))
                    reported = now
                if self.give_up_after is not None and now - down_since > self.give_up_after:
                    self._fail(PeerError(f"{self.address} unreachable for "
                                         f"{now - down_since:.0f} s ({e.code().name}); "
                                         f"is the worker running?"))
                    return
                time.sleep(backoff)
                backoff = min(2 * backoff, 2.0)
            except Exception as e:  # noqa: BLE001 - an answer's handler failed (on_ack)
                # End the link with it: a sender blocked on the window, or waiting for
                # acks, fails now, naming it, rather than after give_up_after.
                if not self._closed:
                    self._fail(PeerError(f"handling an answer from {self.address} failed: "
                                         f"{type(e).__name__}: {e}"))
                return

    def fail(self, reason: str) -> None:
        """Ends the link with an error (e.g. a supervisor gave up on the peer)."""
        self._fail(PeerError(reason))

    def _fail(self, error: BaseException) -> None:
        with self._cond:
            self.error = error
            self._cond.notify_all()

    def _stream(self) -> None:
        outbox: queue.SimpleQueue = queue.SimpleQueue()
        call = self._train(self._requests(outbox), metadata=self.security.metadata())
        watchdog = threading.Thread(target=self._watch, args=(call,), daemon=True)
        try:
            first = True
            for reply in call:
                if first:
                    if not reply.HasField("ready"):
                        raise PeerError(f"{self.address} did not start with Ready")
                    self._on_ready(reply, outbox)
                    watchdog.start()
                    first = False
                    continue
                self._on_reply(reply)
        finally:
            outbox.put(_END)
            with self._cond:
                if self._outbox is outbox:
                    self._outbox = None

    def _on_ready(self, reply: pb.TrainReply, outbox: queue.SimpleQueue) -> None:
        """Resume: drop what the peer holds durably, re-send everything else, in order."""
        with self._cond:
            self._drop_durable(reply.durable_through)
            for frames in self._kept.values():
                for frame in frames:
                    outbox.put(frame)
            self._outbox = outbox
            self._last_progress = time.monotonic()
            self._cond.notify_all()

    def _on_reply(self, reply: pb.TrainReply) -> None:
        ack = reply.ack if reply.HasField("ack") else None
        fresh = ack is not None and ack.batch_id == self.acked_through + 1
        with self._cond:  # drop first: the ack handler may checkpoint and trim memory
            self._drop_durable(reply.durable_through)
        if fresh:
            self.on_ack(ack)  # outside the lock: it may run a layer update
        with self._cond:
            if fresh:
                self.acked_through = ack.batch_id
            self._last_progress = time.monotonic()
            self._cond.notify_all()

    def _drop_durable(self, durable: int) -> None:
        self.durable_through = max(self.durable_through, durable)
        while self._kept and next(iter(self._kept)) <= self.durable_through:
            self._kept.popitem(last=False)

    def _watch(self, call: grpc.Call) -> None:
        """The stream's deadline: no reply for ack_timeout while batches wait -> reconnect."""
        while call.is_active() and not self._closed:
            time.sleep(1.0)
            with self._cond:
                waiting = self.sent_through > self.acked_through
                stale = time.monotonic() - self._last_progress > self.ack_timeout
            if waiting and stale:
                log.warning("%s: no ack from %s for %.0f s; reconnecting", self.name,
                            self.address, self.ack_timeout)
                call.cancel()
                return
