"""What a layer worker does for a top-down learner (PEPITA), beside core.py's batch flow.

Pass 1 of batch b runs with b's frame; at the last worker the error starts up in the ack
and each worker carries it through its layers (`error_up`); the first worker keeps the
modulated input, and pass 2 of b runs with the next frame that reaches each worker
(`pass2.<b>` tensors), so every worker's math runs on the thread that receives frames.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fedff.v1 import worker_pb2 as pb
from fedff.wire.frames import Batch, WireError
from fedff.worker import codec
from fedff.worker.session import InFlight
from fedff.worker.stages import Job

if TYPE_CHECKING:
    from fedff.worker.core import WorkerCore



def pass2_out(core: WorkerCore, job: Job) -> dict[str, torch.Tensor]:
    """Top-down: the pass-2 outputs that go on with this frame, and what the block sends
    down with every frame (weight mirroring's scale)."""
    if core.link is None:
        return {}
    assert core.block is not None
    return {**codec.pass2_tensors(job.pass2_out), **core.block.frame_extras()}


def done(core: WorkerCore, job: Job) -> Batch | None:
    """A top-down learner's pass 1 is done here: at the last worker the error starts
    its way up (in the ack); elsewhere the packet goes on with the pass-2 outputs."""
    assert core.block is not None and job.top_pending is not None
    batch, bid, pending = job.batch, job.batch.batch_id, job.top_pending
    if core.link is None:
        error = pending[-1].error
        assert error is not None
        signal, feedback = core.block.send_back(pending, error, {})
        if core.block.first == 0:  # a chain of one worker: pass 2 now
            job.metrics.update(core.block.finish_top_down(pending, signal)[1])
            job.finishing[bid] = (pending, signal)
        else:
            core.waiting[bid] = pending
            feedback["signal"] = signal
        core.inflight.pop(bid, None)
        applied(core, job)
        core.answer(bid, pb.TRAIN, job.metrics, feedback)
        return None
    core.waiting[bid] = pending
    core.inflight[bid] = InFlight(kind=pb.TRAIN, metrics=job.metrics, top_down=True)
    applied(core, job)
    out = codec.packet_batch(batch, job.packet)  # type: ignore[arg-type]
    out.tensors.update(pass2_out(core, job))
    return out


def applied(core: WorkerCore, job: Job) -> None:
    """Checkpoints on the shared schedule once a due batch's pass 2 is applied, so the
    batches before it are durable and the upstream frees them."""
    every = core.opt.checkpoint_every
    if every and any(bid % every == 0 for bid in job.finishing):
        core.checkpoint()


def error_up(core: WorkerCore, bid: int, later: dict[str, torch.Tensor]
             ) -> dict[str, torch.Tensor]:
    """Top-down: the error from below through this block. The first worker keeps the
    modulated input it becomes; its pass 2 runs with the next frame, on the thread
    that runs every other step (so a chain computes what one process does)."""
    assert core.block is not None
    if "signal" not in later:
        raise WireError(f"the answer to batch {bid} carries no top-down signal")
    signal, up = core.block.send_back(core.waiting[bid], later["signal"], later)
    if core.block.first != 0:
        return {"signal": signal, **up}
    core.modulated[bid] = signal
    return {}
