"""The worker's batch codec, without gRPC: every tensor checked, a bad batch refused whole."""

import pytest
import torch

from fedff import config
from fedff.data.datasets import load_digits
from fedff.engine.block import LayerBlock, Packet
from fedff.errors import ShapeError
from fedff.v1 import worker_pb2 as pb
from fedff.wire.frames import Batch, WireError
from fedff.worker import codec

DIGITS = load_digits()
CFG = config.load("digits-ff", ["model.hidden=[16, 12]", "train.negatives=random"])
FIRST = LayerBlock(CFG, 64, 10, 0, 1, head=False)
LAST = LayerBlock(CFG, 64, 10, 1, 2, head=True)


def examples_batch(n: int = 8, **changes) -> Batch:
    tensors = {"examples": DIGITS.train_x[:n], "labels": DIGITS.train_y[:n],
               "wrong": (DIGITS.train_y[:n] + 1) % 10}
    tensors.update(changes)
    return Batch(batch_id=1, kind=pb.TRAIN, n_pos=n, tensors=tensors)


def test_the_first_worker_builds_overlay_rows_and_neutral_rows():
    p = codec.train_packet(examples_batch(), FIRST, 10)
    assert p.x.shape == (16, 64) and p.n_pos == 8 and p.neutral.shape == (8, 64)
    assert torch.equal(p.x[:8, :10].argmax(dim=1), DIGITS.train_y[:8])
    assert torch.equal(p.x[8:, :10].argmax(dim=1), (DIGITS.train_y[:8] + 1) % 10)


def test_a_packet_survives_the_trip_to_the_next_worker():
    rows = torch.rand(10, 16)
    sent = Packet(x=rows, n_pos=5, gamma=torch.rand(10), neutral=torch.rand(5, 16),
                  labels=torch.arange(5), taps={0: torch.rand(5, 16)})
    got = codec.train_packet(codec.packet_batch(Batch(3, pb.TRAIN), sent), LAST, 10)
    for name in ("x", "gamma", "neutral", "labels"):
        assert torch.equal(getattr(got, name), getattr(sent, name)), name
    assert got.n_pos == 5 and torch.equal(got.taps[0], sent.taps[0])


@pytest.mark.parametrize("batch,error,message", [
    (examples_batch(examples=DIGITS.train_x[:8, :60]), ShapeError, r"\[batch, 64\]"),
    (examples_batch(labels=DIGITS.train_y[:8].float()), WireError, "expected torch.int64"),
    (examples_batch(wrong=torch.full((8,), 10)), ShapeError, "labels must lie in 0..9"),
    (examples_batch(labels=DIGITS.train_y[:7]), ShapeError,
     "one label and train.negatives_per_example"),
    (Batch(1, pb.TRAIN, n_pos=8, tensors={"labels": DIGITS.train_y[:8]}), WireError,
     "has no tensor 'x'"),
    (Batch(1, pb.TRAIN, n_pos=0, tensors={"x": torch.rand(8, 64)}), ShapeError,
     "n_pos must be in 1..8"),
    (Batch(1, pb.TRAIN, n_pos=4, tensors={"x": torch.rand(8, 64), "gamma": torch.rand(7)}),
     ShapeError, r"gamma must have shape \[8\]"),
])
def test_bad_train_batches_are_refused_with_the_reason(batch, error, message):
    with pytest.raises(error, match=message):
        codec.train_packet(batch, FIRST, 10)


def test_labels_outside_the_heads_classes_are_refused():
    batch = Batch(1, pb.TRAIN, n_pos=4, tensors={"x": torch.rand(8, 16),
                                                 "labels": torch.tensor([0, 1, 2, 12])})
    with pytest.raises(ShapeError, match="labels must lie in 0..9"):
        codec.train_packet(batch, LAST, 10)


def test_unknown_frame_kinds_and_eval_inputs():
    with pytest.raises(WireError, match="frame kind 9"):
        codec.check_kind(Batch(1, 9))
    assert codec.eval_input(Batch(1, pb.EVAL, tensors={"x": torch.rand(3, 64)}),
                            FIRST).shape == (3, 64)
    with pytest.raises(WireError, match="is torch.int64, expected torch.float32"):
        codec.eval_input(Batch(1, pb.EVAL, tensors={"x": torch.ones(3, 64).long()}), FIRST)
    half = torch.rand(3, 64).to(torch.bfloat16)  # a lighter wire: restored to float32
    restored = codec.eval_input(Batch(1, pb.EVAL, tensors={"x": half}), FIRST)
    assert restored.dtype == torch.float32 and torch.equal(restored, half.float())


def test_a_sparse_wire_rebuilds_every_activation_exactly_and_sends_fewer_bytes():
    """`--wire-sparse`: zeros as bits, the rest as numbers; the receiver's Assembler gets
    the dense tensors back bit for bit, in the wire dtype sent."""
    from fedff.wire.frames import Assembler, encode, lighter

    g = torch.Generator().manual_seed(0)
    relu = torch.randn(50, 300, generator=g).clamp_min(0)  # about half zeros
    dense = torch.rand(50, 300, generator=g) + 0.1  # no zeros: stays dense
    batch = Batch(batch_id=3, kind=pb.TRAIN, n_pos=25,
                  tensors={"x": relu, "dense": dense, "labels": torch.arange(50),
                           "gamma": torch.zeros(50, 3)})
    for wire in ("float32", "bfloat16"):
        light = lighter(batch, wire, sparse=True)
        assert "x@bits" in light.tensors and "dense" in light.tensors
        assert "gamma" in light.tensors  # goodness sums travel exactly, dense
        sent = sum(t.numel() * t.element_size() for t in light.tensors.values())
        plain = sum(t.numel() * t.element_size() for t in lighter(batch, wire).tensors.values())
        assert sent < 0.8 * plain
        assembler, got = Assembler(), None
        for frame in encode(light):
            got = assembler.add(frame) or got
        assert set(got.tensors) == set(batch.tensors)
        assert torch.equal(got.tensors["x"], relu.to(light.tensors["x@nz"].dtype))
        assert torch.equal(got.tensors["dense"], lighter(batch, wire).tensors["dense"])


@pytest.mark.parametrize("change, message", [
    (lambda t: t.pop("x@shape"), "needs exactly"),
    (lambda t: t.update({"x": torch.zeros(4, 100)}), "no dense"),
    (lambda t: t.update({"x@bits": t["x@bits"][:-1]}), "uint8 bytes"),
    (lambda t: t.update({"x@nz": t["x@nz"][:-1]}), "bits set but"),
    (lambda t: t.update({"x@shape": torch.tensor([4, -100])}), "non-negative"),
    (lambda t: t.update({"x@nz": t["x@nz"].long()}), "1-D float"),
])
def test_a_malformed_sparse_tensor_is_refused_with_the_reason(change, message):
    from fedff.wire import sparse

    x = torch.randn(4, 100, generator=torch.Generator().manual_seed(1)).clamp_min(0)
    tensors = sparse.pack({"x": x})
    change(tensors)
    with pytest.raises(WireError, match=message):
        sparse.unpack(tensors)
