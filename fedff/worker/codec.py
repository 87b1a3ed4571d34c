"""Batches on the wire <-> the engine's packets: decoding with every check, no gRPC.

Every tensor a batch carries is checked here (name, dtype, shape, label range) before any
layer sees it, so a bad batch is refused whole and nothing is applied. What travels:
- TRAIN from the driver, supervised: `examples`, `labels`, `wrong` (the first worker
  builds the overlay rows, a third of the bytes of the finished rows);
- TRAIN between workers (and unsupervised from the driver): `x` (positives first),
  optional `gamma` (Collaborative FF), `neutral` (the head's rows), `labels`, and the head
  layers' outputs as `tap.<layer>`;
- EVAL: `x` and, when the head is asked for, the taps;
- top-down learners (PEPITA): TRAIN and END_EPOCH frames also carry the pass-2 inputs
  of earlier batches as `pass2.<batch id>`; the error travels up in the acks.
"""

from __future__ import annotations

from typing import Any

import torch

from fedff.engine.block import LayerBlock, Packet
from fedff.engine.network import overlay_rows
from fedff.errors import ConfigError, ShapeError
from fedff.ff import negatives as neg
from fedff.layers import registry
from fedff.v1 import worker_pb2 as pb
from fedff.wire.frames import WIRE_DTYPES, Batch, WireError

KINDS = {pb.TRAIN, pb.EVAL, pb.END_EPOCH}
HALF = (torch.bfloat16, torch.float16)  # activations on a lighter wire: restored to float32


def check_kind(batch: Batch) -> None:
    if batch.kind not in KINDS:
        raise WireError(f"batch {batch.batch_id} has frame kind {batch.kind}; send TRAIN, "
                        f"EVAL, END_EPOCH or REPLAY")


def tensor(batch: Batch, name: str, dtype: torch.dtype, required: bool = True
           ) -> torch.Tensor | None:
    t = batch.tensors.get(name)
    if t is None:
        if required:
            raise WireError(f"batch {batch.batch_id} has no tensor '{name}'")
        return None
    if dtype == torch.float32 and t.dtype in HALF:  # a lighter wire (frames.lighter)
        return t.float()
    if t.dtype != dtype:
        raise WireError(f"tensor '{name}' of batch {batch.batch_id} is {t.dtype}, "
                        f"expected {dtype}")
    return t


def taps(batch: Batch, rows: int | None = None) -> dict[int, torch.Tensor]:
    """The head-layer outputs collected upstream ("tap.<layer>"): 2-D float32, `rows`
    rows each where the caller knows how many."""
    out = {}
    for name, t in batch.tensors.items():
        if not name.startswith("tap."):
            continue
        if t.dtype in HALF:
            t = t.float()
        if not name[4:].isdigit() or t.dtype != torch.float32 or t.dim() != 2 or (
                rows is not None and t.shape[0] != rows):
            raise WireError(f"tensor '{name}' of batch {batch.batch_id} is not a head "
                            f"layer's output ('tap.<layer>', float32 [{rows or 'rows'}, "
                            f"width]), got {t.dtype} {list(t.shape)}")
        out[int(name[4:])] = t
    return out


def eval_input(batch: Batch, block: LayerBlock, name: str = "x") -> torch.Tensor:
    x = tensor(batch, name, torch.float32)
    assert x is not None
    block.layers[0].check_input(x, name)
    return x


def train_packet(batch: Batch, block: LayerBlock, num_classes: int) -> Packet:
    """The packet a TRAIN batch carries, every tensor checked against the block."""
    labels = tensor(batch, "labels", torch.int64, False)
    if "examples" in batch.tensors:  # supervised, first worker: build the rows here
        x, neutral = _overlays(batch, block, labels, num_classes)
    else:
        x = eval_input(batch, block)
        neutral = tensor(batch, "neutral", torch.float32, False)
    rows = x.shape[0]
    if neutral is not None:
        block.layers[0].check_input(neutral, "neutral")
    if not 0 < batch.n_pos <= rows:
        raise ShapeError(f"n_pos must be in 1..{rows} (the rows of x), got {batch.n_pos}")
    gamma = tensor(batch, "gamma", torch.float32, False)
    if gamma is not None and gamma.shape != (rows,):
        raise ShapeError(f"gamma must have shape [{rows}], got {list(gamma.shape)}")
    if labels is not None and labels.shape != (batch.n_pos,):
        raise ShapeError(f"labels must have shape [n_pos] = [{batch.n_pos}] (one per "
                         f"positive row), got {list(labels.shape)}")
    if neutral is not None and neutral.shape[0] != batch.n_pos:
        raise ShapeError(f"neutral must have n_pos = {batch.n_pos} rows, got "
                         f"{neutral.shape[0]}")
    if labels is not None and block.head is not None:
        c = block.head.linear.out_features
        if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < c:
            raise ShapeError(f"labels must lie in 0..{c - 1}")
    return Packet(x=x, n_pos=batch.n_pos, gamma=gamma, neutral=neutral, labels=labels,
                  taps=taps(batch, batch.n_pos))


def _overlays(batch: Batch, block: LayerBlock, labels: torch.Tensor | None,
              num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[positives; negatives] and the neutral rows from the examples and labels."""
    examples = tensor(batch, "examples", torch.float32)
    wrong = tensor(batch, "wrong", torch.int64)
    assert examples is not None and wrong is not None
    c, n, k = num_classes, examples.shape[0], block.cfg.train.negatives_per_example
    if labels is None or labels.shape != (n,) or wrong.shape != (k * n,):
        raise ShapeError(f"examples need one label and train.negatives_per_example = {k} "
                         f"wrong labels each: labels [{n}], wrong [{k * n}]")
    both = torch.cat([labels, wrong])
    if n and not 0 <= int(both.min()) <= int(both.max()) < c:
        raise ShapeError(f"labels must lie in 0..{c - 1}")
    if batch.n_pos != n:
        raise ShapeError(f"n_pos must equal the number of examples ({n}), got {batch.n_pos}")
    cfg = block.cfg
    x = overlay_rows(cfg, c, examples, labels, wrong)
    block.layers[0].check_input(x, "x")
    return x, neg.neutral(examples, c, cfg.train.label_strength)


def pass2_inputs(batch: Batch, block: LayerBlock) -> dict[int, torch.Tensor]:
    """Top-down learners: the pass-2 inputs of earlier batches ("pass2.<batch id>") that
    ride on a TRAIN or END_EPOCH frame."""
    out = {}
    for name, t in batch.tensors.items():
        if not name.startswith("pass2."):
            continue
        if not name[6:].isdigit():
            raise WireError(f"tensor '{name}' of batch {batch.batch_id}: pass-2 inputs are "
                            f"named pass2.<batch id>")
        x = tensor(batch, name, torch.float32)
        assert x is not None
        block.layers[0].check_input(x, name)
        out[int(name[6:])] = x
    return out


def pass2_tensors(outputs: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"pass2.{bid}": t for bid, t in sorted(outputs.items())}


def packet_batch(batch: Batch, p: Packet) -> Batch:
    """The TRAIN batch that carries packet p on to the next worker."""
    tensors: dict[str, torch.Tensor] = {"x": p.x}
    for name in ("gamma", "neutral", "labels"):
        if getattr(p, name) is not None:
            tensors[name] = getattr(p, name)
    tensors.update({f"tap.{i}": t for i, t in p.taps.items()})
    return Batch(batch_id=batch.batch_id, kind=pb.TRAIN, epoch=batch.epoch, n_pos=p.n_pos,
                 tensors=tensors)


def eval_batch(batch: Batch, out: torch.Tensor, taps_: dict[int, torch.Tensor] | None
               ) -> Batch:
    tensors = {"x": out, **{f"tap.{i}": t for i, t in (taps_ or {}).items()}}
    return Batch(batch_id=batch.batch_id, kind=pb.EVAL, head=batch.head, tensors=tensors)


SETUP_TYPES = {"run": str, "config": dict, "features": int, "num_classes": int, "first": int,
               "last": int, "head": bool}


def check_setup(setup: object) -> None:
    """A CONFIGURE's setup (worker.proto): every key of the right type and range, before
    anything is built from it (`int("64")` would otherwise pass for 64)."""
    if not isinstance(setup, dict):
        raise ConfigError("config_json must be a JSON object (see worker.proto)")
    for key, kind in SETUP_TYPES.items():
        value = setup.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"the setup's '{key}' must be a {kind.__name__}, got {value!r:.60}")
    if not isinstance(setup.get("downstream"), (str, type(None))):
        raise ConfigError("the setup's 'downstream' must be 'host:port' or null")
    if setup.get("wire_dtype", "float32") not in WIRE_DTYPES:
        raise ConfigError(f"the setup's 'wire_dtype' must be one of {', '.join(WIRE_DTYPES)}")
    if not isinstance(setup.get("wire_sparse", False), bool):
        raise ConfigError("the setup's 'wire_sparse' must be true or false")
    for key, top in (("features", 10**8), ("num_classes", 10**5)):
        if not 1 <= setup[key] <= top:
            raise ConfigError(f"the setup's '{key}' must lie in 1..{top:,}, got {setup[key]}")


def check_block_size(cfg: Any, setup: dict[str, Any], limit: int) -> None:
    """Refuses, before anything is allocated, a block larger than --max-params (its
    dense size: in x out + out per layer, an upper bound for conv cells)."""
    layers = registry.layer_configs(cfg, int(setup["features"]))
    first, last = int(setup["first"]), int(setup["last"])
    params = sum(c.in_features * c.out_features + c.out_features
                 for c in layers[first:last])
    if setup["head"]:  # the softmax head reads (at most) every layer's output
        params += int(setup["num_classes"]) * (sum(c.out_features for c in layers) + 1)
    if params > limit:
        raise ConfigError(f"CONFIGURE asks for a block of {params:,} parameters (layers "
                          f"[{first}, {last})), more than this worker's --max-params "
                          f"{limit:,}; start the worker with a larger --max-params, or "
                          f"split the network over more workers")
