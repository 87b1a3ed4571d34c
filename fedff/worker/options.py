"""A layer worker's settings (`fedff worker`'s flags)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fedff.wire.frames import CHUNK_BYTES, MAX_BATCH_BYTES


def default_max_params() -> int:
    """A block's parameters this machine can hold with room to spare: each takes about
    16 bytes (weight, gradient, momentum, a snapshot), and a quarter of the RAM is the
    budget."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 8 * 2**30
    return ram // 64


@dataclass
class WorkerOptions:
    name: str = "worker"
    checkpoint_dir: Path | None = None
    checkpoint_every: int = 100  # batches; ids are global, so every worker checkpoints alike
    window: int = 4
    device: str = "cpu"
    next_address: str | None = None  # overrides the downstream named by CONFIGURE
    allow_downstream: tuple[str, ...] = ()  # else CONFIGURE may name only these (or loopback)
    max_batch_bytes: int = MAX_BATCH_BYTES
    chunk_bytes: int = CHUNK_BYTES
    ack_cache: int = 1024
    max_params: int = 0  # refuse a CONFIGURE whose block is larger (0: default_max_params())

    @property
    def retained(self) -> int:
        """Batches a worker's link keeps until its downstream holds them durably: two
        checkpoint intervals and the window's share of in-flight ones."""
        return 2 * self.checkpoint_every + 4 * self.window

    @property
    def param_limit(self) -> int:
        """--max-params, or this machine's default: bounds a block and a state upload."""
        return self.max_params or default_max_params()
