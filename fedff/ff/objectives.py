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

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def rms_normalize(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Divides each row by its root-mean-square, as the reference code does.

    Only the direction of a layer's activity is passed on; its length (the goodness) is
    what that layer was judged by, so the next layer cannot simply copy it.
    """
    return x / (x.pow(2).mean(dim=-1, keepdim=True).sqrt() + eps)


@dataclass(frozen=True)
class GoodnessObjective:
    theta: float
    temperature: float = 1.0
    positive_high: bool = True

    def score(self, goodness: torch.Tensor) -> torch.Tensor:
        sign = 1.0 if self.positive_high else -1.0
        return sign * (goodness - self.theta) / self.temperature

    def loss(self, score: torch.Tensor, n_pos: int, gamma: torch.Tensor | None) -> torch.Tensor:
        """softplus(-(s_pos + gamma)) + softplus(s_neg + gamma), each averaged over its rows."""
        logits = score if gamma is None else score + gamma
        pos, neg = logits[:n_pos], logits[n_pos:]
        loss = F.softplus(-pos).mean()
        if neg.numel():
            loss = loss + F.softplus(neg).mean()
        return loss

    def loss_grad_goodness(self, score: torch.Tensor, n_pos: int,
                           gamma: torch.Tensor | None) -> torch.Tensor:
        """d loss / d G for every row: the analytic derivative of `loss`.

        d softplus(-l)/dl = -sigmoid(-l), d softplus(l)/dl = sigmoid(l), dl/dG = sign / T.
        Layers use it to update without an autograd graph (see FFLayer.finish).
        """
        logits = score if gamma is None else score + gamma
        grad = torch.empty_like(logits)
        n_neg = logits.shape[0] - n_pos
        grad[:n_pos] = -torch.sigmoid(-logits[:n_pos]) / n_pos
        if n_neg:
            grad[n_pos:] = torch.sigmoid(logits[n_pos:]) / n_neg
        sign = 1.0 if self.positive_high else -1.0
        return grad * (sign / self.temperature)


def peer_norm_grad(running_mean: torch.Tensor, strength: float, n_pos: int) -> torch.Tensor:
    """The reference code's peer-normalisation push, as d loss / d pre-activation.

    The reference adds `lambda * (mean(m) - m_j)` to the derivative of every positive
    sample's *pre-activation* (not gated by the ReLU), which revives dead units and stops a
    few units from carrying all the goodness. As a descent gradient, averaged over the
    batch like the FF loss: -lambda * (mean(m) - m_j) / B for each positive row.
    """
    return -strength * (running_mean.mean() - running_mean) / n_pos


def positive_accuracy(score: torch.Tensor, n_pos: int, gamma: torch.Tensor | None) -> float:
    """Fraction of rows the layer classifies correctly as positive / negative."""
    logits = score if gamma is None else score + gamma
    correct = (logits[:n_pos] > 0).sum() + (logits[n_pos:] <= 0).sum()
    return float(correct) / max(1, logits.shape[0])
