"""Test-set evaluation: goodness-per-label, the softmax head, and each layer alone."""

from __future__ import annotations

import torch

from fedff.engine.network import Network


@torch.no_grad()
def evaluate(net: Network, x: torch.Tensor, y: torch.Tensor,
             chunk: int = 1000) -> dict[str, object]:
    """Error rates (in [0, 1]) of every classifier the network offers.

    - `error_head`: one neutral-label pass read by the linear softmax head.
    - `error_goodness` (supervised): argmax over labels of the summed goodness of hidden
      layers >= 2, one pass per candidate label, as in the paper.
    - `layer_errors` (supervised): the same with each layer's goodness alone.
    """
    y = y.to(net.device)
    head_wrong = 0
    layer_wrong = torch.zeros(net.num_layers)
    sum_wrong = 0
    voters = net.goodness_layers()
    for start in range(0, x.shape[0], chunk):
        xb, yb = x[start:start + chunk], y[start:start + chunk]
        head_wrong += int((net.head_logits(xb).argmax(dim=-1) != yb).sum())
        if net.supervised:
            scores = net.label_scores(xb)  # [layers, batch, classes]
            layer_wrong += (scores.argmax(dim=-1) != yb).sum(dim=1).cpu().float()
            sum_wrong += int((scores[voters].sum(dim=0).argmax(dim=-1) != yb).sum())
    n = x.shape[0]
    result: dict[str, object] = {"error_head": head_wrong / n}
    if net.supervised:
        result["error_goodness"] = sum_wrong / n
        result["layer_errors"] = [float(v) / n for v in layer_wrong]
    return result
