"""Frames: tensors survive the wire exactly, and every malformed message is refused."""

import pytest
import torch

from fedff.v1 import worker_pb2 as pb
from fedff.wire.frames import (Assembler, Batch, WireError, decode_feedback, encode,
                               header_for, parse_frame, payload, serialize_frame)


def roundtrip(batch: Batch, chunk_bytes: int) -> Batch:
    assembler = Assembler()
    out = None
    for frame in encode(batch, chunk_bytes):
        got = assembler.add(parse_frame(serialize_frame(frame)))
        assert out is None
        out = got
    assert out is not None
    return out


@pytest.mark.parametrize("chunk_bytes", [7, 1000, 2**20])
def test_tensors_roundtrip_exactly(chunk_bytes):
    tensors = {"x": torch.randn(30, 17), "labels": torch.arange(30),
               "half": torch.randn(3, 5).half(), "bf": torch.randn(9).bfloat16(),
               "bytes": torch.randint(0, 255, (11,), dtype=torch.uint8),
               "empty": torch.empty(0, 4)}
    out = roundtrip(Batch(batch_id=5, kind=pb.TRAIN, epoch=3, n_pos=15, tensors=tensors),
                    chunk_bytes)
    assert (out.batch_id, out.kind, out.epoch, out.n_pos) == (5, pb.TRAIN, 3, 15)
    assert list(out.tensors) == list(tensors)
    for name, t in tensors.items():
        assert out.tensors[name].dtype == t.dtype and torch.equal(out.tensors[name], t), name


def test_wire_format_is_plain_protobuf():
    """A peer using only the generated code reads our frames, and we read its frames."""
    x = torch.randn(4, 3)
    frame = encode(Batch(batch_id=9, kind=pb.EVAL, tensors={"x": x}))[0]
    parsed = pb.Frame.FromString(serialize_frame(frame))
    assert (parsed.batch_id, parsed.chunk, parsed.chunks) == (9, 0, 1)
    assert parsed.header.tensors[0].name == "x" and parsed.data == payload({"x": x})
    back = Assembler().add(parse_frame(parsed.SerializeToString()))
    assert torch.equal(back.tensors["x"], x)


def test_feedback_roundtrip():
    fb = {"scores": torch.randn(3, 8), "logits": torch.randn(8, 10)}
    out = decode_feedback(header_for(fb), payload(fb))
    assert all(torch.equal(out[k], fb[k]) for k in fb)


def frames_of(tensors, chunk_bytes=64, batch_id=1):
    return encode(Batch(batch_id=batch_id, kind=pb.TRAIN, n_pos=1, tensors=tensors),
                  chunk_bytes)


def test_chunks_out_of_order_refused_and_assembler_recovers():
    frames = frames_of({"x": torch.randn(10, 10)})
    a = Assembler()
    a.add(frames[0])
    with pytest.raises(WireError, match="expected chunk 1"):
        a.add(frames[2])
    # the next batch, sent whole, is accepted
    out = None
    for f in frames_of({"x": torch.ones(2, 2)}, batch_id=2):
        out = a.add(f)
    assert torch.equal(out.tensors["x"], torch.ones(2, 2))


def test_size_disagreeing_with_shape_refused():
    frame = frames_of({"x": torch.randn(2, 3)}, chunk_bytes=2**20)[0]
    frame.header.tensors[0].shape[:] = [2, 4]  # claims 32 bytes, carries 24
    with pytest.raises(WireError, match="shapes and data disagree|need"):
        Assembler().add(frame)


def test_missing_bytes_refused():
    frames = frames_of({"x": torch.randn(4, 4)}, chunk_bytes=32)
    frames[-1] = parse_frame(serialize_frame(frames[-1]))
    frames[-1].data = bytes(frames[-1].data)[:-4]
    a = Assembler()
    with pytest.raises(WireError, match="promised"):
        for f in frames:
            a.add(f)


def test_oversize_unknown_dtype_and_missing_header_refused():
    big = frames_of({"x": torch.randn(64, 64)}, chunk_bytes=2**20)[0]
    with pytest.raises(WireError, match="over this worker's limit"):
        Assembler(max_bytes=1000).add(big)
    odd = frames_of({"x": torch.randn(2)}, chunk_bytes=2**20)[0]
    odd.header.tensors[0].dtype = "complex64"
    with pytest.raises(WireError, match="unknown dtype"):
        Assembler().add(odd)
    headless = frames_of({"x": torch.randn(2)}, chunk_bytes=2**20)[0]
    headless.header = None
    with pytest.raises(WireError, match="no header"):
        Assembler().add(headless)


def test_garbage_bytes_refused():
    with pytest.raises(WireError):
        parse_frame(b"\x08\xff\xff\xff")


def test_single_chunk_batches_assemble_without_a_warning_in_a_fresh_process():
    """A one-chunk batch's tensors view the message's read-only bytes; torch's warning
    about that (once per process) must not reach the user, and silencing it must leave
    the process's warning filters as they were."""
    import subprocess
    import sys

    code = """if True:
        import warnings, torch
        from fedff.v1 import worker_pb2 as pb
        from fedff.wire.frames import Assembler, Batch, encode, parse_frame, serialize_frame
        filters = list(warnings.filters)
        for i in (1, 2):
            x = torch.randn(4, 3)
            frame = encode(Batch(batch_id=i, kind=pb.TRAIN, tensors={"x": x}))[0]
            out = Assembler().add(parse_frame(serialize_frame(frame)))
            assert torch.equal(out.tensors["x"], x)
        assert warnings.filters == filters
        """
    run = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
