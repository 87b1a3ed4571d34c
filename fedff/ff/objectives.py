"""Forward-Forward local objectives (Hinton 2022; Lorberbom et al., Collaborative FF).

Every objective is written in terms of a per-sample *score*

    s = sign * (G - theta) / T,    G = sum_j y_j^2,

where sign = +1 when positives should have high goodness (Hinton's choice) and -1 for the
alternative the paper names (positives have low goodness). A layer's probability that a
sample is positive is sigmoid(s + gamma), where gamma is the sum of the *other* layers'
scores for Collaborative FF (detached, so no gradient crosses layers) and 0 for plain FF.
Using centred scores makes gamma comparable across layers of different widths: each
layer's threshold is subtracted by its own layer.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedff.errors import ShapeError


def rms_normalize(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Divides each row by its root-mean-square, as the reference code does.

    Only the direction of a layer's activity is passed on; its length (the goodness) is
    what that layer was judged by, so the next layer cannot simply copy it.
    """
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x / norm.mul_(x.shape[-1] ** -0.5).add_(eps)


@dataclass(frozen=True)
class GoodnessObjective:
    """Hinton's loss, each row against the threshold; or, `pairwise`, SymBa's (Lee and
    Song 2023): softplus(-(s_pos - s_neg)) over each positive and its own negative.
    SymBa's gradient is the same size on both rows of a pair, where Hinton's saturates
    separately for positives and negatives; theta cancels, 1 / T is SymBa's alpha."""

    theta: float
    temperature: float = 1.0
    positive_high: bool = True
    pairwise: bool = False

    @property
    def scale(self) -> float:
        """ds/dG = sign / T."""
        return (1.0 if self.positive_high else -1.0) / self.temperature

    def score(self, goodness: torch.Tensor) -> torch.Tensor:
        return (goodness - self.theta).mul_(self.scale)

    def loss(self, score: torch.Tensor, n_pos: int, gamma: torch.Tensor | None) -> torch.Tensor:
        """softplus(-(s_pos + gamma)) + softplus(s_neg + gamma), each averaged over its rows.

        The definition, differentiable by autograd; layers train with `loss_and_grad`, which
        tests/test_layer.py checks against it."""
        logits = score if gamma is None else score + gamma
        pos, neg = logits[:n_pos], logits[n_pos:]
        if self.pairwise:
            check_pairs(n_pos, logits.shape[0])
            return F.softplus(neg - pos).mean()
        loss = F.softplus(-pos).mean()
        if neg.numel():
            loss = loss + F.softplus(neg).mean()
        return loss

    def loss_and_grad(self, score: torch.Tensor, n_pos: int, gamma: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, d loss / d G for every row, number of rows classified right), at once.

        The analytic derivative of `loss`: with the margin u = -t * (s + gamma), t = +1 for
        positives and -1 for negatives, each row's loss is softplus(u) and its derivative
        by s is -t * sigmoid(u), times the row's 1 / n weight and ds/dG = sign / T. Written
        over whole rows with precomputed per-row constants it takes 7 ops where the
        separate formulas took about 25, and on a CPU each small op costs microseconds of
        dispatch whatever its size. A row on the boundary (u = 0) counts as wrong.
        """
        logits = score if gamma is None else score + gamma
        if self.pairwise:
            return self._pairwise_loss_and_grad(logits, n_pos)
        rows = row_constants(n_pos, logits.shape[0], self.scale, logits.dtype, logits.device)
        u = logits * rows.neg_t
        loss = torch.dot(F.softplus(u), rows.weight)
        return loss, torch.sigmoid(u).mul_(rows.grad), (u < 0).sum()


    def _pairwise_loss_and_grad(self, logits: torch.Tensor, n_pos: int
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """SymBa: u = s_neg - s_pos per pair, loss mean softplus(u); d/ds_pos is
        -sigmoid(u) / n and d/ds_neg its opposite. A pair counts as two rows, right when
        its positive scores higher."""
        check_pairs(n_pos, logits.shape[0])
        u = logits[n_pos:] - logits[:n_pos]
        loss = F.softplus(u).mean()
        g = torch.sigmoid(u).mul_(self.scale / n_pos)
        return loss, torch.cat([-g, g]), 2 * (u < 0).sum()


def check_pairs(n_pos: int, n: int) -> None:
    if n != 2 * n_pos:
        raise ShapeError(f"model.objective = 'symba' pairs each positive with one negative: "
                         f"the batch must hold n_pos positives then n_pos negatives, got "
                         f"{n_pos} positives and {n - n_pos} negatives (use train.negatives "
                         f"= 'hard' or 'random')")


@dataclass(frozen=True)
class RowConstants:
    """Per-row constants of the FF loss for a batch of n_pos positives, then negatives."""

    neg_t: torch.Tensor  # -1 on positives, +1 on negatives
    weight: torch.Tensor  # 1 / n_pos on positives, 1 / n_neg on negatives
    grad: torch.Tensor  # d loss / d G = grad * sigmoid(u): -t * weight * sign / T


@functools.lru_cache(maxsize=16)
def row_constants(n_pos: int, n: int, scale: float, dtype: torch.dtype, device: torch.device
                  ) -> RowConstants:
    n_neg = n - n_pos
    neg_t = torch.ones(n, dtype=dtype, device=device)
    neg_t[:n_pos] = -1.0
    weight = torch.full((n,), 1.0 / n_pos, dtype=dtype, device=device)
    if n_neg:
        weight[n_pos:] = 1.0 / n_neg
    return RowConstants(neg_t, weight, neg_t * weight * scale)


def peer_norm_grad(running_mean: torch.Tensor, strength: float, n_pos: int) -> torch.Tensor:
    """The reference code's peer-normalisation push, as d loss / d pre-activation.

    The reference adds `lambda * (mean(m) - m_j)` to the derivative of every positive
    sample's *pre-activation* (not gated by the ReLU), which revives dead units and stops a
    few units from carrying all the goodness. As a descent gradient, averaged over the
    batch like the FF loss: -lambda * (mean(m) - m_j) / B for each positive row.
    """
    return (running_mean - running_mean.mean()).mul_(strength / n_pos)
