"""A worker's checkpoint: its setup, its block's state at one batch id, its ack cache.

Batch ids are global, so every worker of a chain checkpoints at the same ids; a worker
restarted with the same --checkpoint-dir resumes from here (weights_only: no pickles).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

from fedff import files
from fedff.engine.block import LayerBlock
from fedff.v1 import worker_pb2 as pb

CHECKPOINT = "worker.pt"
PREVIOUS = "previous-run.pt"  # the run an explicit reset replaced (one is kept)


def worker_state(setup: dict[str, Any], block: dict[str, Any], epoch: int,
                 trained_through: int, acks: OrderedDict[int, pb.Ack],
                 replay: dict[str, Any] | None = None) -> dict[str, Any]:
    """`replay`: a top-down learner's mid-epoch checkpoint also keeps what its last pass
    2 sent on (top_down.resume)."""
    state = {"setup": setup, "block": block, "epoch": epoch,
             "trained_through": trained_through,
             "acks": {k: v.SerializeToString() for k, v in acks.items()}}
    if replay is not None:
        state["replay"] = replay
    return state


def snapshot(block: LayerBlock, layers: list[dict[str, Any]] | None, epoch: int,
             bid: int) -> dict[str, Any] | None:
    """A staged block's state at batch `bid`, from the per-layer states its stages took."""
    if layers is None:
        return None
    head = None if block.head is None else block.head.state_dict()
    return {"block": {"first": block.first, "last": block.last, "layers": layers,
                      "head": head}, "epoch": epoch, "trained_through": bid}


def read_acks(state: dict[str, Any]) -> OrderedDict[int, pb.Ack]:
    return OrderedDict((int(k), pb.Ack.FromString(v))
                       for k, v in state.get("acks", {}).items())


def save(folder: Path, state: dict[str, Any]) -> None:
    files.save(state, folder / CHECKPOINT)


def load(folder: Path | None) -> dict[str, Any] | None:
    """The saved state, or None where there is none to resume from."""
    if folder is None or not (folder / CHECKPOINT).exists():
        return None
    return files.load(folder / CHECKPOINT, "worker checkpoint", weights_only=True,
                      keys=("setup", "block", "epoch", "trained_through"))


def set_aside(folder: Path | None) -> None:
    """Keeps the checkpoint of a run that an explicit reset replaces (only the latest)."""
    if folder is not None and (folder / CHECKPOINT).exists():
        (folder / CHECKPOINT).replace(folder / PREVIOUS)
