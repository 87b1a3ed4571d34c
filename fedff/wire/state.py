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


def read_state(chunks: Iterable[pb.StateChunk]) -> dict[str, Any]:
    parts = []
    for i, chunk in enumerate(chunks):
        if chunk.chunk != i:
            raise WireError(f"state chunk {chunk.chunk} arrived, expected {i}")
        parts.append(chunk.data)
    try:
        state = torch.load(io.BytesIO(b"".join(parts)), weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever it is, it is not a state
        raise WireError(f"cannot read this state: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict):
        raise WireError(f"a state must be a dict, got {type(state).__name__}")
    return state
