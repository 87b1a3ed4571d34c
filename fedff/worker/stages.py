"""How a worker runs its block on a batch: one path, in stages.

A stage is a run of consecutive layers. A block of one layer, one under Collaborative
FF over all layers (whose updates wait for every score) or of a top-down learner (whose
pass 2 comes with a later frame) is a single stage run inline on the thread that
received the batch. A block of several layers runs one thread per layer:
a worker holding layers 0 and 1 would otherwise use one core while its neighbour, holding
a single layer, waits on it half the time. With a thread per layer, layer 0 works on
batch b while layer 1 works on batch b-1; each layer still sees its batches in order and
the same inputs, so the weights are those of one thread (tests check it). torch releases
the GIL inside its kernels, so the threads run on separate cores.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from fedff.engine.block import BlockPending, LayerBlock, Packet
from fedff.layers.contract import Pending
from fedff.v1 import worker_pb2 as pb
from fedff.wire.frames import Batch

log = logging.getLogger("fedff.worker")


@dataclass
class Job:
    batch: Batch
    packet: Packet | None = None  # TRAIN
    pending: BlockPending | None = None  # TRAIN under CFF over all layers
    x: torch.Tensor | None = None  # EVAL
    taps: dict[int, torch.Tensor] | None = None  # EVAL with the head
    metrics: dict[str, float] = field(default_factory=dict)
    scores: list[torch.Tensor] = field(default_factory=list)
    snapshots: list[dict[str, Any]] | None = None  # each layer's state, when due
    # top-down learners (PEPITA): pass 2 of earlier batches, then pass 1 of this one
    finishing: dict[int, tuple[list[Pending], torch.Tensor]] = field(default_factory=dict)
    pass2_out: dict[int, torch.Tensor] = field(default_factory=dict)
    top_pending: list[Pending] | None = None
    # the state between the two, when a finished batch is due for a checkpoint: a
    # restarted worker replays this frame's pass 1 from there (top_down.py)
    pass2_snapshot: dict[str, Any] | None = None


@torch.no_grad()
def run_stage(block: LayerBlock, layers: range, job: Job) -> None:
    """Layers `layers` of the block on one job; snapshots each layer's state when due."""
    kind = job.batch.kind
    if block.top_down and kind != pb.EVAL:  # e.g. weight mirroring's scale, from above
        block.receive_frame(job.batch.tensors)
    for bid, (pending, x2) in job.finishing.items():  # top-down: pass 2 of earlier ones
        job.pass2_out[bid], metrics = block.finish_top_down(pending, x2)
        job.metrics.update(metrics)
    if job.pass2_snapshot is not None:  # a due batch's pass 2 is in, this frame's pass 1
        job.pass2_snapshot.update(layers=[block.layers[j].state_dict() for j in layers],
                                  pass2=dict(job.pass2_out), metrics=dict(job.metrics))
    if kind == pb.TRAIN:
        assert job.packet is not None
        for j in layers:
            if block.layers[j].epoch != job.batch.epoch:
                block.layers[j].set_epoch(job.batch.epoch)
        if block.top_down:  # pass 1; pass 2 comes with a later frame
            job.packet, job.top_pending = block.begin_top_down(job.packet)
        elif block.mode == "all":  # the whole block: updates wait for the later scores
            job.packet, job.pending, metrics = block.train(job.packet)
            job.metrics.update(metrics)
        for j in layers if block.mode != "all" and not block.top_down else ():
            job.packet, metrics = block.train_layer(j, job.packet)
            job.metrics.update(metrics)
    elif kind == pb.END_EPOCH:  # after this stage's last TRAIN job of the epoch
        for j in layers:
            block.layers[j].end_epoch()
    elif kind == pb.EVAL:
        assert job.x is not None
        for j in layers:
            job.x, score = block.infer_layer(j, job.x, job.taps)
            job.scores.append(score)
    if job.snapshots is not None:
        job.snapshots.extend(block.layers[j].state_dict() for j in layers)


class Inline:
    """The whole block as one stage, on the caller's thread: `run` returns when done."""

    takes_snapshots = False  # the live state is the state at this batch

    def __init__(self, block: LayerBlock):
        self.block = block

    def run(self, job: Job) -> bool:
        run_stage(self.block, range(len(self.block.layers)), job)
        return True

    def wait_idle(self, timeout: float | None = None) -> bool:
        return True

    def close(self) -> None:
        pass


class Stager:
    """One thread per layer; `done(job)` is called from the last one."""

    takes_snapshots = True  # the live state runs ahead of the batch being answered

    def __init__(self, block: LayerBlock, done: Callable[[Job], None],
                 failed: Callable[[Job, BaseException], None]):
        self.block, self.done, self.failed = block, done, failed
        n = len(block.layers)
        self.queues: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in range(n)]
        self._busy = 0
        self._cond = threading.Condition()
        self.threads = [threading.Thread(target=self._run, args=(j,), daemon=True,
                                         name=f"layer{block.first + j}") for j in range(n)]
        for t in self.threads:
            t.start()

    def run(self, job: Job) -> bool:
        with self._cond:
            self._busy += 1
        self.queues[0].put(job)
        return False

    def wait_idle(self, timeout: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._busy == 0, timeout)

    def close(self) -> None:
        for q in self.queues:
            q.put(None)

    def _run(self, j: int) -> None:
        last = j == len(self.queues) - 1
        while (job := self.queues[j].get()) is not None:
            try:
                run_stage(self.block, range(j, j + 1), job)
                if not last:
                    self.queues[j + 1].put(job)
                    continue
                self.done(job)
            except Exception as e:  # noqa: BLE001 - reported to the upstream, not lost
                log.exception("layer %d failed on batch %d", self.block.first + j,
                              job.batch.batch_id)
                self.failed(job, e)
            with self._cond:
                self._busy -= 1
                self._cond.notify_all()


def make_runner(block: LayerBlock, done: Callable[[Job], None],
                failed: Callable[[Job, BaseException], None]) -> Inline | Stager:
    if len(block.layers) > 1 and block.mode != "all" and not block.top_down:
        return Stager(block, done, failed)
    return Inline(block)
