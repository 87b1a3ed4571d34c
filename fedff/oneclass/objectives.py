"""The one-class losses of Hopwood (2023), per sample, with their gradients written out.

Each loss is a function of one layer's activity h (after the ReLU) on normal data only,
c = `oneclass.c`, nu = `oneclass.nu`, with d = ||h - a||^2 (a: the layer's centre) and
g = sum h^2:
- `goodness`: sigmoid(g - c); `goodness-softplus`: softplus(g - c) (the reference
  code's "adjusted goodness");
- `hb-svdd` (hard-boundary Deep SVDD, Ruff et al. 2018): 0.5 d;
- `sb-svdd` (soft-boundary): r^2 + (1/nu) max(0, d - r^2);
- `ls-svdd` (least squares): r^2 + (1/nu) (d - r^2)^2.
The radius r is a statistic (the (1 - nu) quantile of ||h - a||), not a parameter: it
gets no gradient. A sample's loss is also its anomaly score, so a high loss means "not
like the normal data". tests/test_oneclass.py checks values and gradients against the
formulas through autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

OBJECTIVES = ("goodness", "goodness-softplus", "hb-svdd", "sb-svdd", "ls-svdd")
CENTRED = ("hb-svdd", "sb-svdd", "ls-svdd")  # the losses on d = ||h - a||^2


def loss_and_grad(objective: str, h: torch.Tensor, centre: torch.Tensor, radius: float,
                  c: float, nu: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sample loss [B], dLoss_b / dh_b [B, width]) for a batch of activities h."""
    if objective in CENTRED:
        diff = h - centre
        d = diff.square().sum(dim=1)
        if objective == "hb-svdd":
            return 0.5 * d, diff
        r2 = radius * radius
        excess = d - r2
        if objective == "sb-svdd":
            outside = (excess > 0).to(h.dtype)
            return r2 + excess.clamp_min(0) / nu, diff * (2.0 * outside / nu).unsqueeze(1)
        return r2 + excess.square() / nu, diff * (4.0 * excess / nu).unsqueeze(1)
    g = h.square().sum(dim=1)
    s = torch.sigmoid(g - c)
    if objective == "goodness":
        return s, h * (2.0 * s * (1.0 - s)).unsqueeze(1)
    return F.softplus(g - c), h * (2.0 * s).unsqueeze(1)


def loss(objective: str, h: torch.Tensor, centre: torch.Tensor, radius: float, c: float,
         nu: float) -> torch.Tensor:
    return loss_and_grad(objective, h, centre, radius, c, nu)[0]


def radius_of(distances: torch.Tensor, nu: float) -> float:
    """The (1 - nu) quantile of the distances ||h - a||: all but a share nu inside."""
    return float(torch.quantile(distances.double(), 1.0 - nu))
