"""A lossless lighter wire for ReLU activations: zeros as bits, only the rest as numbers.

A layer's output after ReLU is non-negative and about half zeros (44-70 % for a trained
MNIST 3 x 1000 FF net, more for the input pixels), so a float tensor travels as three:
`<name>@bits` (one bit per entry, set where it is non-zero, uint8), `<name>@nz` (the
non-zero entries in row-major order, in the wire dtype) and `<name>@shape` (int64). A
tensor is packed only where that is smaller; the receiver rebuilds the dense tensor, so a
layer sees exactly what it would have seen (`--wire-sparse`, frames.lighter).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fedff.wire.frames import EXACT, WireError

BITS, NZ, SHAPE = "@bits", "@nz", "@shape"
FLOATS = (torch.float32, torch.bfloat16, torch.float16)
MAX_NUMEL = 2**31


def pack(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each float activation as bits + non-zeros where that takes fewer bytes."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if t.dtype in FLOATS and name not in EXACT and t.numel() >= 64:
            mask = t.detach().to("cpu") != 0
            nnz, size = int(mask.sum()), t.element_size()
            if nnz * size + (t.numel() + 7) // 8 + 8 * t.dim() < t.numel() * size:
                out[name + BITS] = torch.from_numpy(np.packbits(mask.reshape(-1).numpy()))
                out[name + NZ] = t.detach().to("cpu")[mask]
                out[name + SHAPE] = torch.tensor(t.shape, dtype=torch.int64)
                continue
        out[name] = t
    return out


def unpack(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The dense tensors back; a triple that does not add up raises `WireError`."""
    if not any(name.endswith((BITS, NZ, SHAPE)) for name in tensors):
        return tensors
    out = {name: t for name, t in tensors.items() if not name.endswith((BITS, NZ, SHAPE))}
    for name in tensors:
        if not name.endswith((BITS, NZ, SHAPE)):
            continue
        base = name.rsplit("@", 1)[0]
        if base in out and not name.endswith(BITS):
            continue  # rebuilt from its bits already
        if base in out or any(base + part not in tensors for part in (BITS, NZ, SHAPE)):
            raise WireError(f"sparse tensor '{base}' needs exactly '{base}{BITS}', "
                            f"'{base}{NZ}' and '{base}{SHAPE}' and no dense '{base}'")
        out[base] = _dense(base, tensors[base + BITS], tensors[base + NZ],
                           tensors[base + SHAPE])
    return out


def _dense(name: str, bits: torch.Tensor, nz: torch.Tensor, shape: torch.Tensor
           ) -> torch.Tensor:
    if shape.dtype != torch.int64 or shape.dim() != 1 or not 1 <= shape.numel() <= 4 \
            or bool((shape < 0).any()):
        raise WireError(f"'{name}{SHAPE}' must be 1 to 4 non-negative int64 sizes")
    dims = [int(d) for d in shape]
    numel = math.prod(dims)
    if numel > MAX_NUMEL:
        raise WireError(f"sparse tensor '{name}' of shape {dims} is too large")
    if bits.dtype != torch.uint8 or bits.dim() != 1 or bits.numel() != (numel + 7) // 8:
        raise WireError(f"'{name}{BITS}' must be {(numel + 7) // 8} uint8 bytes (one bit per "
                        f"entry of {dims}), got {list(bits.shape)} {bits.dtype}")
    if nz.dtype not in FLOATS or nz.dim() != 1:
        raise WireError(f"'{name}{NZ}' must be a 1-D float tensor, got {list(nz.shape)} "
                        f"{nz.dtype}")
    mask = torch.from_numpy(np.unpackbits(bits.numpy(), count=numel).view(np.bool_))
    if int(mask.sum()) != nz.numel():
        raise WireError(f"sparse tensor '{name}': {int(mask.sum())} bits set but "
                        f"{nz.numel()} non-zero values sent")
    dense = torch.zeros(numel, dtype=nz.dtype)
    dense[mask] = nz
    return dense.view(dims)
