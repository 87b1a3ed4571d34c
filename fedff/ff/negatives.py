"""Positive and negative data for Forward-Forward (Hinton 2022, sections 3.2-3.3).

Supervised FF writes the label one-hot into the first `num_classes` pixels: the true
label makes a positive, a wrong one a negative. Wrong labels are drawn uniformly, or
("hard") in proportion to the model's own predicted probabilities, which spends the
negatives on the confusions the model actually makes; "hard-memory" uses the prediction
from the example's previous visit, which a worker chain can have in time. Unsupervised
FF mixes two real images with a large-blob mask, so negatives share short-range
statistics with real data and differ only in long-range shape.
"""

from __future__ import annotations

import functools
import math
import threading

import torch
import torch.nn.functional as F


def overlay(x: torch.Tensor, labels: torch.Tensor, num_classes: int,
            strength: float = 1.0) -> torch.Tensor:
    """x with the first `num_classes` features replaced by a one-hot of `labels`.

    `labels` may hold k labels per row of x: the result is then x stacked k times, the
    i-th copy with the i-th block of labels (one copy of x, not k + 1).
    """
    copies, rest = divmod(labels.shape[0], x.shape[0])
    if rest or not copies:
        raise ValueError(f"overlay needs k labels per row of x ({x.shape[0]} rows), got "
                         f"{labels.shape[0]} labels")
    out = x.repeat(copies, 1)
    out[:, :num_classes] = F.one_hot(labels, num_classes).to(x.dtype).mul_(strength)
    return out


def neutral(x: torch.Tensor, num_classes: int, strength: float = 1.0) -> torch.Tensor:
    """The neutral-label input used for one-pass classification: 1/C in every label pixel."""
    out = x.clone()
    out[:, :num_classes] = strength / num_classes
    return out


def random_wrong_labels(labels: torch.Tensor, num_classes: int,
                        generator: torch.Generator | None = None, k: int = 1) -> torch.Tensor:
    """A uniformly drawn label different from each true label; k > 1: k different ones,
    as k blocks of len(labels) (the layout `overlay` stacks).

    Drawn on the CPU, where the network's generator lives, so a seed gives the same
    negatives on every device.
    """
    if k > 1:
        uniform = torch.ones(labels.shape[0], num_classes)
        return hard_wrong_labels(labels, uniform, generator, k)
    shift = torch.randint(1, num_classes, labels.shape, generator=generator)
    return (labels + shift.to(labels.device)) % num_classes


def hard_wrong_labels(labels: torch.Tensor, probs: torch.Tensor,
                      generator: torch.Generator | None = None, k: int = 1) -> torch.Tensor:
    """A wrong label sampled in proportion to the model's predicted probability; k > 1:
    k different ones (drawn without replacement), as k blocks of len(labels).

    Sampled on the CPU with the network's generator, as random_wrong_labels is, so a seed
    gives the same negatives on every device; the draw returns on `labels`' device.
    """
    # + 1e-12: a confident, correct model still yields a valid distribution
    p = probs.detach().float().cpu() + 1e-12
    p.scatter_(1, labels.cpu().view(-1, 1), 0.0)
    drawn = torch.multinomial(p, k, generator=generator)  # [n, k]
    return drawn.t().reshape(-1).to(labels.device)


class PredictionMemory:
    """Each training example's predicted probabilities from its previous visit, for the
    `hard-memory` negatives: hard negatives where the prediction for a batch is not known
    before the batch trains (a worker chain has it a round trip later). An example not
    yet seen gets a uniformly drawn wrong label. Sized by the largest index it is given.

    A chain's driver draws on its main thread while the acks remember on the link's
    thread; the lock keeps a resize from dropping a write made to the old table."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.probs = torch.zeros(0, num_classes)
        self.seen = torch.zeros(0, dtype=torch.bool)
        self.lock = threading.Lock()

    def wrong_labels(self, labels: torch.Tensor, index: torch.Tensor,
                     generator: torch.Generator | None = None, k: int = 1) -> torch.Tensor:
        wrong = random_wrong_labels(labels, self.num_classes, generator, k).view(k, -1)
        with self.lock:
            self._grow(int(index.max()) + 1)
            seen = self.seen[index]
            probs = self.probs[index[seen]]
        if bool(seen.any()):
            wrong[:, seen.to(wrong.device)] = hard_wrong_labels(
                labels[seen.to(labels.device)], probs, generator, k).view(k, -1)
        return wrong.reshape(-1)

    def remember(self, index: torch.Tensor, probs: torch.Tensor) -> None:
        if probs.shape != (index.shape[0], self.num_classes):
            raise ValueError(f"remember needs [{index.shape[0]}, {self.num_classes}] "
                             f"probabilities, got {list(probs.shape)}")
        with self.lock:
            self._grow(int(index.max()) + 1)
            self.probs[index] = probs.detach().float().cpu()
            self.seen[index] = True

    def _grow(self, n: int) -> None:
        if n > self.seen.shape[0]:
            extra = n - self.seen.shape[0]
            self.probs = torch.cat([self.probs, torch.zeros(extra, self.num_classes)])
            self.seen = torch.cat([self.seen, torch.zeros(extra, dtype=torch.bool)])

    def state_dict(self) -> dict[str, torch.Tensor]:
        with self.lock:
            return {"probs": self.probs.clone(), "seen": self.seen.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with self.lock:
            self.probs, self.seen = state["probs"].clone(), state["seen"].clone()


def binomial_kernel(blur_steps: int) -> torch.Tensor:
    """[1/4, 1/2, 1/4] convolved with itself `blur_steps` times: binomial(2k) / 4^k."""
    k = 2 * blur_steps
    coefficients = [math.comb(k, i) for i in range(k + 1)]
    return torch.tensor(coefficients, dtype=torch.float32) / 4**blur_steps


@functools.lru_cache(maxsize=8)
def blur_matrix(size: int, blur_steps: int) -> torch.Tensor:
    """B [size, size] with (v @ B)[j] = sum_t kern[t] * v[clamp(j + t - k, 0, size - 1)]:
    the binomial blur of a length-`size` signal, edges replicated, as one matrix.

    Blurring a batch of small masks is then two batched matmuls; as two single-channel
    convolutions with padding it cost about 2 ms per 100 MNIST masks, a tenth of an
    unsupervised 3 x 1000 step on a CPU.
    """
    kern, k = binomial_kernel(blur_steps), blur_steps
    out = torch.arange(size).expand(2 * k + 1, size)
    src = (out + torch.arange(-k, k + 1).view(-1, 1)).clamp(0, size - 1)
    weights = kern.view(-1, 1).expand(2 * k + 1, size)
    matrix = torch.zeros(size, size)
    matrix.index_put_((src.reshape(-1), out.reshape(-1)), weights.reshape(-1), accumulate=True)
    return matrix


def blob_masks(n: int, shape: tuple[int, int], blur_steps: int,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Masks with large regions of ones and zeros: a random binary image blurred
    `blur_steps` times with [1/4, 1/2, 1/4] in both directions, thresholded at 0.5.

    k blurs are one blur with the composed binomial kernel (edges replicated), applied
    along rows and then columns as matmuls with `blur_matrix` rather than 4k small ops.
    """
    h, w = shape
    m = torch.randint(0, 2, (n, h, w), generator=generator, dtype=torch.float32)
    if blur_steps:
        m = blur_matrix(h, blur_steps).t() @ (m @ blur_matrix(w, blur_steps))
    return (m > 0.5).float().view(n, h * w)


def hybrid_images(x: torch.Tensor, image_shape: tuple[int, int], blur_steps: int,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Mixes each image with a different image of the batch through a blob mask."""
    n = x.shape[0]
    shift = int(torch.randint(1, max(2, n), (1,), generator=generator))
    partner = x.roll(shift, dims=0)
    mask = blob_masks(n, image_shape, blur_steps, generator).to(x.device)
    return mask * x + (1 - mask) * partner
