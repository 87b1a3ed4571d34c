"""A state dict on the wire: torch.save bytes cut into StateChunks, read back with
weights_only=True (tensors and plain containers, never pickled code)."""

from __future__ import annotations

import io
from typing import Any, Iterable, Iterator

import torch

from fedff.v1 import worker_pb2 as pb
from fedff.wire.frames import WireError

STATE_CHUNK = 2 * 2**20


def state_chunks(state: dict[str, Any]) -> Iterator[pb.StateChunk]:
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    chunks = max(1, -(-len(data) // STATE_CHUNK))
    for i in range(chunks):
        yield pb.StateChunk(chunk=i, chunks=chunks,
                            data=data[i * STATE_CHUNK:(i + 1) * STATE_CHUNK])


def read_state(chunks: Iterable[pb.StateChunk], max_bytes: int | None = None
               ) -> dict[str, Any]:
    """The state the chunks carry; more than `max_bytes` in all is refused unread."""
    parts, total = [], 0
    for i, chunk in enumerate(chunks):
        if chunk.chunk != i:
            raise WireError(f"state chunk {chunk.chunk} arrived, expected {i}")
        total += len(chunk.data)
        if max_bytes is not None and total > max_bytes:
            raise WireError(f"the state is over {max_bytes:,} bytes, more than a block this "
                            f"worker may hold (--max-params) can need")
        parts.append(chunk.data)
    try:
        state = torch.load(io.BytesIO(b"".join(parts)), weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever it is, it is not a state
        raise WireError(f"cannot read this state: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict):
        raise WireError(f"a state must be a dict, got {type(state).__name__}")
    return state
