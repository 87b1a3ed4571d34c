"""Tensors <-> protocol frames, and the checks a server runs on every message.

A batch is a named set of tensors. On the wire it is one header (names, shapes, dtypes,
total size) and the tensors' raw bytes concatenated, cut into chunks so no message comes
near gRPC's receive limit. The receiver reassembles into one preallocated buffer and
builds tensors on it without a further copy; anything that does not add up (an unknown
dtype, a size that disagrees with the shapes, chunks out of order, a batch over the size
limit) raises `WireError`, which servers answer with INVALID_ARGUMENT.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from fedff.errors import FedffError
from fedff.v1 import worker_pb2 as pb

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16,
                                  "bfloat16": torch.bfloat16, "int64": torch.int64,
                                  "uint8": torch.uint8}
NAMES = {v: k for k, v in DTYPES.items()}
CHUNK_BYTES = 2 * 2**20
MAX_BATCH_BYTES = 512 * 2**20


WIRE_DTYPES = ("float32", "bfloat16", "float16")  # what activations may travel as
EXACT = {"gamma"}  # sums of goodness: kept float32 (small, and large in value)


class WireError(FedffError, ValueError):
    """A malformed message; the text says what is wrong and what the sender must fix."""


@dataclass
class Batch:
    """A decoded frame: what the sender meant, ready for the engine."""

    batch_id: int
    kind: int
    epoch: int = 0
    n_pos: int = 0
    head: bool = False
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def _raw(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: ship the same 2-byte pattern
        t = t.view(torch.int16)
    return memoryview(t.reshape(-1).numpy()).cast("B")


def header_for(tensors: dict[str, torch.Tensor], kind: int = pb.TRAIN, epoch: int = 0,
               n_pos: int = 0, head: bool = False) -> pb.FrameHeader:
    specs = []
    total = 0
    for name, t in tensors.items():
        if t.dtype not in NAMES:
            raise WireError(f"tensor '{name}' has dtype {t.dtype}; the wire carries "
                            f"{', '.join(DTYPES)}")
        specs.append(pb.TensorSpec(name=name, shape=list(t.shape), dtype=NAMES[t.dtype]))
        total += t.numel() * t.element_size()
    return pb.FrameHeader(kind=kind, epoch=epoch, n_pos=n_pos, tensors=specs,
                          total_bytes=total, head=head)


def lighter(batch: Batch, wire_dtype: str, sparse: bool = False) -> Batch:
    """The batch with its float32 activations cast to `wire_dtype` (bf16 or fp16 halve
    the bytes); the receiver's codec restores float32, so a layer computes in float32
    either way and only the rounding of its input changes. `sparse`: zeros travel as
    bits (wire/sparse.py, lossless; the receiver's Assembler rebuilds the tensors)."""
    if wire_dtype == "float32" and not sparse:
        return batch
    dtype = DTYPES[wire_dtype]
    tensors = {k: t.to(dtype) if t.dtype == torch.float32 and k not in EXACT else t
               for k, t in batch.tensors.items()}
    if sparse:
        from fedff.wire import sparse as zeros  # it imports this module

        tensors = zeros.pack(tensors)
    return Batch(batch.batch_id, batch.kind, batch.epoch, batch.n_pos, batch.head, tensors)


def payload(tensors: dict[str, torch.Tensor]) -> bytes:
    return b"".join(bytes(_raw(t)) for t in tensors.values())


@dataclass
class WireFrame:
    """A `Frame` whose data is a view of tensor memory until it is serialised.

    protobuf would copy the data into the message, again into the serialised bytes, and
    once more on the receiving side when the field is read; `serialize_frame` and
    `parse_frame` write and read the same wire format with one copy on each side, which
    is what brings the activation stream close to a raw bytes stream
    (scripts/bench_pipeline.py).
    """

    batch_id: int
    chunk: int
    chunks: int
    header: pb.FrameHeader | None
    data: memoryview | bytes  # parsed frames: one view
    pieces: tuple[memoryview, ...] = ()  # encoded frames: the tensor slices, in order

    @property
    def size(self) -> int:
        return sum(len(p) for p in self.pieces) if self.pieces else len(self.data)


_DATA_FIELD = 5


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def serialize_frame(frame: WireFrame | pb.Frame) -> bytes:
    if isinstance(frame, pb.Frame):
        return frame.SerializeToString()
    meta = pb.Frame(batch_id=frame.batch_id, chunk=frame.chunk, chunks=frame.chunks,
                    header=frame.header).SerializeToString()
    pieces = frame.pieces or (frame.data,)
    # The one copy on the sending side: tensor memory into the message.
    return b"".join((meta, _varint(_DATA_FIELD << 3 | 2), _varint(frame.size), *pieces))


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise WireError("truncated or malformed frame (bad varint)")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def parse_frame(raw: bytes) -> WireFrame:
    """Reads a serialised `Frame`, leaving its data as a view of `raw` (no copy)."""
    buf = memoryview(raw)
    values = {1: 0, 2: 0, 3: 0}
    header, data = None, memoryview(b"")
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field_no, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _read_varint(buf, pos)
            if field_no in values:
                values[field_no] = value
        elif wire_type == 2:
            size, pos = _read_varint(buf, pos)
            if pos + size > len(buf):
                raise WireError("truncated frame: a field runs past the message end")
            if field_no == 4:
                header = pb.FrameHeader.FromString(bytes(buf[pos:pos + size]))
            elif field_no == _DATA_FIELD:
                data = buf[pos:pos + size]
            pos += size
        elif wire_type == 5:
            pos += 4
        elif wire_type == 1:
            pos += 8
        else:
            raise WireError(f"malformed frame (wire type {wire_type})")
    return WireFrame(values[1], values[2], values[3], header, data)


def encode(batch: Batch, chunk_bytes: int = CHUNK_BYTES) -> list[WireFrame]:
    """The frames that carry one batch, in send order; their data views the tensors."""
    header = header_for(batch.tensors, batch.kind, batch.epoch, batch.n_pos, batch.head)
    views = [_raw(t) for t in batch.tensors.values()]
    chunks = max(1, math.ceil(header.total_bytes / chunk_bytes))
    groups: list[tuple[memoryview, ...]] = []
    pieces: list[memoryview] = []
    filled = 0
    for view in views:
        offset = 0
        while offset < len(view):
            take = min(chunk_bytes - filled, len(view) - offset)
            pieces.append(view[offset:offset + take])
            offset += take
            filled += take
            if filled == chunk_bytes:
                groups.append(tuple(pieces))
                pieces, filled = [], 0
    if pieces or not groups:
        groups.append(tuple(pieces))
    assert len(groups) == chunks, (len(groups), chunks)
    return [WireFrame(batch.batch_id, i, chunks, header if i == 0 else None, b"", group)
            for i, group in enumerate(groups)]


def _tensors(header: pb.FrameHeader, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
    """Tensors viewing `buffer` (uint8) without a copy, where alignment allows."""
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for spec in header.tensors:
        if spec.dtype not in DTYPES:
            raise WireError(f"tensor '{spec.name}' has unknown dtype '{spec.dtype}'; send one "
                            f"of {', '.join(DTYPES)}")
        if any(d < 0 for d in spec.shape):
            raise WireError(f"tensor '{spec.name}' has a negative dimension {list(spec.shape)}")
        dtype = DTYPES[spec.dtype]
        numel = math.prod(spec.shape)
        nbytes = numel * dtype.itemsize
        if offset + nbytes > len(buffer):
            raise WireError(f"tensor '{spec.name}' {list(spec.shape)} {spec.dtype} needs "
                            f"{nbytes} bytes but only {len(buffer) - offset} remain; shapes "
                            f"and data disagree")
        raw = buffer[offset:offset + nbytes]
        if offset % dtype.itemsize:
            raw = raw.clone()  # misaligned for its dtype: one copy
        out[spec.name] = raw.view(dtype).view(tuple(spec.shape))
        offset += nbytes
    if offset != len(buffer):
        raise WireError(f"{len(buffer)} bytes received but the tensors' shapes account for "
                        f"{offset}; shapes and data disagree")
    return out


def _dense(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sparse-packed activations (`lighter(..., sparse=True)`) rebuilt."""
    from fedff.wire import sparse  # it imports this module

    return sparse.unpack(tensors)


def decode_feedback(header: pb.FrameHeader, data: bytes) -> dict[str, torch.Tensor]:
    if not header.tensors:
        return {}
    return _tensors(header, torch.frombuffer(bytearray(data), dtype=torch.uint8)
                    if data else torch.empty(0, dtype=torch.uint8))


_silenced = False


def _read_only(data: memoryview | bytes) -> torch.Tensor:
    """A uint8 tensor viewing a message's read-only bytes.

    torch warns, once per process, that such a tensor must not be written. Only the
    first call silences it: `catch_warnings` swaps the process's warning filters, which
    on every batch would race with other threads' warnings.
    """
    global _silenced
    if _silenced:
        return torch.frombuffer(data, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "The given buffer is not writable"
        tensor = torch.frombuffer(data, dtype=torch.uint8)
    _silenced = True
    return tensor


class Assembler:
    """Collects the chunks of one batch at a time and returns it when complete."""

    def __init__(self, max_bytes: int = MAX_BATCH_BYTES):
        self.max_bytes = max_bytes
        self._reset()

    def _reset(self) -> None:
        self.header: pb.FrameHeader | None = None
        self.batch_id = 0
        self.buffer = torch.empty(0, dtype=torch.uint8)
        self.view = memoryview(b"")
        self.filled = 0
        self.next_chunk = 0
        self.chunks = 0

    def add(self, frame: WireFrame | pb.Frame) -> Batch | None:
        if isinstance(frame, pb.Frame) or frame.pieces:  # not off the wire: normalise it
            frame = parse_frame(serialize_frame(frame))
        if frame.chunk != self.next_chunk:
            expected = self.next_chunk
            self._reset()
            raise WireError(f"batch {frame.batch_id}: chunk {frame.chunk} arrived, expected "
                            f"chunk {expected}; send a batch's chunks in order 0..chunks-1")
        if frame.chunk == 0:
            self._start(frame)
            if frame.chunks == 1 and len(frame.data) == len(self.view):
                return self._whole(frame)
        elif frame.batch_id != self.batch_id or frame.chunks != self.chunks:
            self._reset()
            raise WireError(f"chunk {frame.chunk} of batch {frame.batch_id} interleaved with "
                            f"batch {self.batch_id}; finish one batch before the next")
        data = frame.data
        end = self.filled + len(data)
        if end > len(self.view):
            self._reset()
            raise WireError(f"batch {frame.batch_id} carries more bytes than its header's "
                            f"total_bytes; shapes and data disagree")
        self.view[self.filled:end] = data
        self.filled = end
        self.next_chunk += 1
        if self.next_chunk < self.chunks:
            return None
        if self.filled != len(self.view):
            got, promised = self.filled, len(self.view)
            self._reset()
            raise WireError(f"batch {frame.batch_id} ended after {got} bytes, its header "
                            f"promised {promised}; resend it whole")
        header, buffer, batch_id = self.header, self.buffer, self.batch_id
        self._reset()
        assert header is not None
        return Batch(batch_id=batch_id, kind=header.kind, epoch=header.epoch, n_pos=header.n_pos,
                     head=header.head, tensors=_dense(_tensors(header, buffer)))

    def _whole(self, frame: WireFrame) -> Batch:
        """A batch in one chunk: tensors view the received message itself, no copy.

        The message's bytes are immutable to Python but the engine never writes into its
        inputs (every step makes new tensors), so a read-only view is safe and saves a
        copy of every batch.
        """
        header = self.header
        assert header is not None
        self._reset()
        buffer = _read_only(frame.data) if len(frame.data) else torch.empty(0, dtype=torch.uint8)
        return Batch(batch_id=frame.batch_id, kind=header.kind, epoch=header.epoch,
                     n_pos=header.n_pos, head=header.head, tensors=_dense(_tensors(header, buffer)))

    def _start(self, frame: WireFrame) -> None:
        if frame.header is None:
            raise WireError(f"batch {frame.batch_id}: chunk 0 has no header; put the "
                            f"FrameHeader on the first chunk")
        if frame.chunks < 1:
            raise WireError(f"batch {frame.batch_id}: chunks must be >= 1, got {frame.chunks}")
        total = frame.header.total_bytes
        if total > self.max_bytes:
            raise WireError(f"batch {frame.batch_id} is {total / 2**20:.0f} MiB, over this "
                            f"worker's limit of {self.max_bytes / 2**20:.0f} MiB; send "
                            f"smaller batches or raise --max-batch-mb")
        if frame.batch_id == 0:
            raise WireError("batch_id 0 is reserved; number batches from 1")
        self.header, self.batch_id, self.chunks = frame.header, frame.batch_id, frame.chunks
        if frame.chunks == 1 and len(frame.data) == total:
            self.view = frame.data  # _whole() takes it from here, without a copy
            return
        # torch's allocator: a fresh bytearray of this size costs 4x more in page faults.
        self.buffer = torch.empty(total, dtype=torch.uint8)
        self.view = memoryview(self.buffer.numpy()) if total else memoryview(b"")
        self.filled = 0
