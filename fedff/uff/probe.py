"""Label-free training, labelled evaluation: probes on the frozen latents of a network.

- linear probe: softmax regression on the standardised latents of `probe.layers` (all
  layers by default, concatenated), trained with Adam on `probe.examples` labelled
  training examples; the standard yardstick for unsupervised features.
- MLP probe (`probe.mlp_hidden` > 0): one hidden ReLU layer, same data.
- k-NN: cosine similarity to `probe.knn_examples` labelled examples, k votes weighted by
  similarity; cheap, and needs no training.

The network is only read. A worker chain or a federation coordinator passes its network
state, and the probe runs on an in-process copy, where the labels are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedff.config import ProbeConfig
from fedff.data.datasets import Dataset
from fedff.engine.network import FFNetwork, Network


@torch.no_grad()
def latents(net: FFNetwork, x: torch.Tensor, layers: list[int], chunk: int = 2000
            ) -> torch.Tensor:
    parts = []
    for start in range(0, x.shape[0], chunk):
        outs, _ = net.activities(x[start:start + chunk])
        parts.append(torch.cat([outs[i] for i in layers], dim=1))
    return torch.cat(parts)


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: ProbeConfig,
         seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * ((x.shape[0] + cfg.batch_size - 1) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(cfg.epochs):
        for idx in torch.randperm(x.shape[0], generator=gen).split(cfg.batch_size):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model


def _error(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(dim=1) != y).float().mean())


@torch.no_grad()
def knn_error(train: torch.Tensor, train_y: torch.Tensor, test: torch.Tensor,
              test_y: torch.Tensor, k: int, num_classes: int, chunk: int = 1000) -> float:
    bank = F.normalize(train, dim=1)
    wrong = 0
    for start in range(0, test.shape[0], chunk):
        sim = F.normalize(test[start:start + chunk], dim=1) @ bank.t()
        top, idx = sim.topk(min(k, bank.shape[0]), dim=1)
        votes = torch.zeros(sim.shape[0], num_classes).scatter_add_(1, train_y[idx], top)
        wrong += int((votes.argmax(dim=1) != test_y[start:start + chunk]).sum())
    return wrong / test.shape[0]


def probe_metrics(net: Network, ds: Dataset, cfg: ProbeConfig, seed: int = 0) -> dict[str, float]:
    """Linear (and MLP) probe and k-NN test errors on the latents of `net`."""
    net = net.in_process()  # a worker chain: a local copy of its state
    layers = cfg.layers or list(range(len(net.layers)))
    n = cfg.examples or ds.train_x.shape[0]
    train_x, train_y = ds.train_x[:n], ds.train_y[:n]
    features = latents(net, train_x, layers)
    test = latents(net, ds.test_x, layers)
    m = min(cfg.knn_examples or n, n)
    out: dict[str, float] = {"knn_error": knn_error(features[:m], train_y[:m], test,
                                                    ds.test_y, cfg.knn_k, ds.num_classes)}
    mean, std = features.mean(dim=0), features.std(dim=0).clamp_min(1e-6)
    z_train, z_test = features.sub_(mean).div_(std), test.sub_(mean).div_(std)  # in place
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        linear = _fit(nn.Linear(z_train.shape[1], ds.num_classes), z_train, train_y, cfg, seed)
        out.update({"probe_error": _error(linear, z_test, ds.test_y),
                    "probe_train_error": _error(linear, z_train, train_y),
                    "probe_features": int(z_train.shape[1]), "probe_examples": int(n)})
        if cfg.mlp_hidden:
            mlp = nn.Sequential(nn.Linear(z_train.shape[1], cfg.mlp_hidden), nn.ReLU(),
                                nn.Linear(cfg.mlp_hidden, ds.num_classes))
            out["mlp_probe_error"] = _error(_fit(mlp, z_train, train_y, cfg, seed), z_test,
                                            ds.test_y)
    return out
