"""What a layer worker does for a top-down learner (PEPITA), beside core.py's batch flow.

Pass 1 of batch b runs with b's frame; at the last worker the error starts up in the ack
and each worker carries it through its layers (`error_up`); the first worker keeps the
modulated input, and pass 2 of b runs with the next frame that reaches each worker
(`pass2.<b>` tensors), so every worker's math runs on the thread that receives frames.
At window 1 a worker that crashes resumes mid-epoch from its last checkpoint and replays
what it lost exactly (`plan_checkpoint`, `resume`, `wait_for_errors`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from fedff.v1 import worker_pb2 as pb
from fedff.wire.frames import Batch, WireError
from fedff.worker import checkpoints, codec
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


def plan_checkpoint(core: WorkerCore, job: Job) -> None:
    """Where a due batch's pass 2 is applied with this frame, the checkpoint is the state
    between that pass 2 and this frame's pass 1 (stages.run_stage takes it): the weights
    after the update, the dropout generator before this frame's masks. A worker restarted
    from it replays this frame exactly; it also keeps the pass-2 output it sent on."""
    every = core.opt.checkpoint_every
    if job.batch.kind == pb.TRAIN and every and any(b % every == 0 for b in job.finishing):
        bid = job.batch.batch_id
        job.pass2_snapshot = {"through": min(core.waiting) - 1 if core.waiting else bid - 1}


def applied(core: WorkerCore, job: Job) -> None:
    """Writes the planned checkpoint once this frame's pass 1 is done, so the batches
    before it are durable and the upstream frees them."""
    snap = job.pass2_snapshot
    if snap is None:
        return
    assert core.block is not None
    state = checkpoints.snapshot(core.block, snap["layers"], max(core.epoch, 0),
                                 snap["through"])
    assert state is not None
    state["replay"] = {"pass2": snap["pass2"], "metrics": snap["metrics"]}
    core.checkpoint(state)


def resume(core: WorkerCore, job: Job, inputs: dict[int, torch.Tensor]
           ) -> dict[int, torch.Tensor]:
    """The first frame after a restart from a mid-epoch checkpoint: its pass-2 inputs were
    applied before the checkpoint (dropped); the pass-2 output and metrics that went on
    with it before the crash go on again, for a downstream that never got them.

    Exact only at window 1, where every frame follows the error of the one before; at a
    wider window the pass-1 states still waiting for their errors died with the worker."""
    if core.opt.window != 1:
        raise WireError(f"{core.opt.name} restarted mid-epoch, but a top-down (PEPITA) "
                        f"chain at window {core.opt.window} cannot resume there: its pass-1 "
                        f"states waiting for their errors were lost; restart the run with "
                        f"--resume (from the last finished epoch), or train at --window 1, "
                        f"which resumes mid-epoch exactly")
    replay, core.replay = core.replay, None
    assert replay is not None
    job.pass2_out.update(replay["pass2"])
    job.metrics.update(replay["metrics"])
    return {b: x for b, x in inputs.items() if b in core.waiting}


def wait_for_errors(core: WorkerCore, batch_id: int, closed: Callable[[], bool]) -> bool:
    """At window 1 a new frame is taken once every earlier batch's error has come back up
    through this worker, as it always is in a running chain; after a restart, the upstream
    re-sends its frames at once, and this keeps their replay in the order they first ran.
    False: the stream closed while waiting (the upstream sends the frame again)."""
    block = core.block
    if block is None or not block.top_down or core.opt.window != 1:
        return True  # the other learners: no lock taken here
    with core.errors_back:
        while (batch_id > core.received_through
               and any(f.top_down for f in core.inflight.values())):
            if closed():
                return False
            core.errors_back.wait(1.0)
    return True


def forget_old_errors(core: WorkerCore, bid: int) -> None:
    """Keeps the errors of as many answers as the upstream can ask again for (it retains
    `opt.retained` batches; restarted, it replays its pass 1 from its last checkpoint and
    needs each answer's error), not the whole 1,024-answer cache: with factorised
    feedback each is batch x 1024 floats (256 MB for 1,024 answers of 64 rows)."""
    core.errors_cached.append(bid)
    while len(core.errors_cached) > core.opt.retained:
        core.acks.pop(core.errors_cached.popleft(), None)


def error_up(core: WorkerCore, bid: int, later: dict[str, torch.Tensor]
             ) -> dict[str, torch.Tensor]:
    """Top-down: the error from below through this block. The first worker keeps the
    modulated input it becomes; its pass 2 runs with the next frame, on the thread
    that runs every other step (so a chain computes what one process does)."""
    assert core.block is not None
    if "signal" not in later:
        raise WireError(f"the answer to batch {bid} carries no top-down signal (the worker "
                        f"below no longer holds its error); restart the run with --resume")
    signal, up = core.block.send_back(core.waiting[bid], later["signal"], later)
    if core.block.first != 0:
        return {"signal": signal, **up}
    core.modulated[bid] = signal
    return {}
