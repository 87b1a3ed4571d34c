"""A layer worker's settings (`fedff worker`'s flags)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedff.wire.frames import CHUNK_BYTES, MAX_BATCH_BYTES


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
