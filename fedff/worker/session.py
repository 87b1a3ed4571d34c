"""One upstream Train stream's replies, emitted strictly in batch-id order, and what a
worker keeps for each batch until its answer can go up."""

from __future__ import annotations

import queue
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch

from fedff.engine.block import BlockPending
from fedff.v1 import worker_pb2 as pb

END = object()  # the reply stream ends here


@dataclass
class Abort:
    code: grpc.StatusCode
    message: str


class Session:
    """Answers may be ready out of order (a cache hit beside a batch still in flight);
    the upstream reads them in the order it sent the batches."""

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
        self.replies.put(END)


@dataclass
class InFlight:
    kind: int
    metrics: dict[str, float] = field(default_factory=dict)
    pending: BlockPending | None = None
    scores: torch.Tensor | None = None  # EVAL: this block's scores, [layers, rows]
    staged: bool = False  # still in the block's stages
    snapshot: dict[str, Any] | None = None  # END_EPOCH: the block's state at this id
    top_down: bool = False  # TRAIN of a top-down learner: the ack brings the error
