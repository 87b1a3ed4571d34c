"""A worker's block of several layers run as a pipeline of threads, one per layer.

A worker that holds layers 0 and 1 would otherwise use one core while its neighbour,
holding a single layer, waits on it half the time. With a thread per layer, layer 0
works on batch b while layer 1 works on batch b-1; each layer still sees its batches in
order and the same inputs, so the weights are those of one thread (tests check it).
torch releases the GIL inside its kernels, so the threads run on separate cores.
Collaborative FF over all layers is not staged (its updates wait for all the scores).
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from fedff.ff.block import LayerBlock, Packet
from fedff.v1 import worker_pb2 as pb
from fedff.wire.frames import Batch

log = logging.getLogger("fedff.worker")


@dataclass
class Job:
    batch: Batch
    packet: Packet | None = None  # TRAIN
    x: torch.Tensor | None = None  # EVAL
    taps: dict[int, torch.Tensor] | None = None  # EVAL with the head
    metrics: dict[str, float] = field(default_factory=dict)
    scores: list[torch.Tensor] = field(default_factory=list)
    snapshots: list[dict[str, Any]] | None = None  # each layer's state, when due


class Stager:
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

    def submit(self, job: Job) -> None:
        with self._cond:
            self._busy += 1
        self.queues[0].put(job)

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
                self._step(j, job)
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

    @torch.no_grad()
    def _step(self, j: int, job: Job) -> None:
        layer, kind = self.block.layers[j], job.batch.kind
        if kind == pb.TRAIN:
            if layer.epoch != job.batch.epoch:
                layer.set_epoch(job.batch.epoch)
            assert job.packet is not None
            job.packet, metrics = self.block.train_layer(j, job.packet)
            job.metrics.update(metrics)
        elif kind == pb.EVAL:
            assert job.x is not None
            job.x, score = self.block.infer_layer(j, job.x, job.taps)
            job.scores.append(score)
        if job.snapshots is not None:
            job.snapshots.append(layer.state_dict())
