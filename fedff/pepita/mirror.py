"""Weight mirroring's joint rescale, agreed along a chain of layer workers.

After a mirroring step every factor B_l is multiplied by (sd / std(F))^(1/L), where
F = B_0 B_1 ... B_{L-1} spans every layer, so no worker can compute it alone. The
agreement, the same in one process as in a chain:
- the rescale of step t is deferred: each layer applies it at the start of its next
  update (`finish`), so every factor holds its mirrored but unscaled value while the
  error of step t+1 travels up through it, and the first layer multiplies the signal by
  the scale still pending (`correction`);
- F is built from the top, right to left, with the error: every block multiplies its
  factors onto the product from below (`product`, d_l x C each, about the size of the
  error itself), and the block holding the first layer computes the scale (`agreed`);
- the scale travels down with the next frame (`mirror.scale`: tag, value), each worker
  keeps it as its layers' incoming rescale and passes it on.
The factors follow exactly the reference's values (rescale after step t, before the
mirroring of step t+1); only the signal meets the scale once instead of once per factor.
At most one scale is outstanding: the first layer agrees a new one only when every layer
has applied the last (at window 1 always; with a wider window some steps skip theirs),
so a late layer is never scaled twice and the product's std stays at sd.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedff.wire.frames import WireError

SCALE = "mirror.scale"  # down, every frame: int64 [tag, the float64 value's bits]
TAGS = "mirror.tags"  # up: int64 [layers below], the last scale each has applied
PRODUCT = "mirror.product"  # up: float32 [block input width, classes], B_k ... B_{L-1}


@dataclass(frozen=True)
class Scale:
    tag: int = 0  # 0: none agreed yet
    value: float = 1.0

    def tensor(self) -> torch.Tensor:
        """int64 [tag, bits]: the wire carries no float64, and the value must arrive
        exactly (every worker scales its factors by the same number)."""
        bits = torch.tensor([self.value], dtype=torch.float64).view(torch.int64)
        return torch.cat([torch.tensor([self.tag], dtype=torch.int64), bits])

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "Scale":
        if t.dtype != torch.int64 or t.shape != (2,):
            raise WireError(f"'{SCALE}' must be int64 [tag, value bits], got {t.dtype} "
                            f"{list(t.shape)}")
        tag, value = int(t[0]), float(t[1:].clone().view(torch.float64)[0])
        if not (tag > 0 and math.isfinite(value) and value > 0):
            raise WireError(f"'{SCALE}' must hold a tag > 0 and a positive finite value, "
                            f"got {tag}, {value}")
        return cls(tag, value)


def target_std(widths: list[int], f_scale: float) -> float:
    """sd = f_scale sqrt(2 / d_in): the std F keeps."""
    return f_scale * math.sqrt(2.0 / widths[0])


def product(factors: list[torch.Tensor], below: torch.Tensor | None) -> torch.Tensor:
    """B_first ... B_last @ below, right to left: every step is d x C."""
    out = below
    for b in reversed(factors):
        out = b if out is None else b @ out
    assert out is not None
    return out


def agreed(current: Scale, f: torch.Tensor, widths: list[int], f_scale: float) -> Scale:
    """The next scale, from F = the whole product: std(F) back to sd."""
    return Scale(current.tag + 1, target_std(widths, f_scale) / float(f.std()))


def correction(current: Scale, tags: list[int], layers: int) -> float:
    """What the signal is multiplied by at the first layer: the pending scale, once per
    factor that has not applied it (`value ** (behind / L)`; 1.0 when none)."""
    behind = sum(tag < current.tag for tag in tags)
    return current.value ** (behind / layers) if behind else 1.0


def check_upward(extras: dict[str, torch.Tensor], layers_below: int, width: int,
                 classes: int) -> tuple[list[int], torch.Tensor | None]:
    """The tags and product that came up with the error, every shape checked."""
    tags = extras.get(TAGS)
    if tags is None or tags.dtype != torch.int64 or tags.shape != (layers_below,):
        raise WireError(f"the error from below must carry '{TAGS}' as int64 "
                        f"[{layers_below}] (one per layer below), got "
                        f"{None if tags is None else (tags.dtype, list(tags.shape))}")
    prod = extras.get(PRODUCT)
    if prod is not None and (prod.dtype != torch.float32 or prod.shape != (width, classes)):
        raise WireError(f"'{PRODUCT}' from below must be float32 [{width}, {classes}], "
                        f"got {prod.dtype} {list(prod.shape)}")
    return [int(t) for t in tags], prod
