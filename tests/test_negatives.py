import pytest
import torch
import torch.nn.functional as F

from fedff.ff import negatives as neg


def test_overlay_and_neutral_write_only_label_pixels():
    x = torch.rand(4, 20)
    labels = torch.tensor([0, 3, 9, 5])
    out = neg.overlay(x, labels, 10)
    assert torch.equal(out[:, 10:], x[:, 10:])
    assert torch.equal(out[:, :10].argmax(1), labels)
    assert torch.equal(out[:, :10].sum(1), torch.ones(4))
    assert torch.allclose(neg.neutral(x, 10)[:, :10], torch.full((4, 10), 0.1))


def test_overlay_with_two_labels_per_row_stacks_positives_then_negatives():
    x = torch.rand(3, 20)
    labels, wrong = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    out = neg.overlay(x, torch.cat([labels, wrong]), 10, strength=0.5)
    assert torch.equal(out, torch.cat([neg.overlay(x, labels, 10, 0.5),
                                       neg.overlay(x, wrong, 10, 0.5)]))
    assert out[:, :10].max() == 0.5
    with pytest.raises(ValueError, match="k labels per row"):
        neg.overlay(x, torch.tensor([1, 2, 3, 4]), 10)


def test_random_wrong_labels_are_wrong_and_cover_all_others():
    g = torch.Generator().manual_seed(0)
    labels = torch.full((5000,), 4)
    wrong = neg.random_wrong_labels(labels, 10, g)
    assert not (wrong == 4).any()
    assert set(wrong.tolist()) == set(range(10)) - {4}


def test_hard_wrong_labels_follow_the_model():
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 2] * 300)
    probs = torch.zeros(900, 10)
    probs[:, 7] = 0.3  # the confusion the model makes
    probs[torch.arange(900), labels] = 0.7  # the true label is never drawn
    wrong = neg.hard_wrong_labels(labels, probs, g)
    assert (wrong == 7).all()
    probs = torch.nn.functional.one_hot(labels, 10).float()  # confident and right
    wrong = neg.hard_wrong_labels(labels, probs, g)
    assert not (wrong == labels).any()


@pytest.mark.parametrize("draw", ["random", "hard", "memory"])
def test_k_wrong_labels_are_different_wrong_labels_in_blocks(draw):
    """k = 3: three blocks of len(labels), each row's three labels wrong and distinct;
    hard draws take the model's likely confusions first, and the memory draws uniformly
    for an example it has not seen."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(600) % 10
    probs = torch.full((600, 10), 0.01)
    probs[torch.arange(600), (labels + 1) % 10] = 0.5
    if draw == "random":
        wrong = neg.random_wrong_labels(labels, 10, g, k=3)
    elif draw == "hard":
        wrong = neg.hard_wrong_labels(labels, probs, g, k=3)
    else:
        memory = neg.PredictionMemory(10)
        memory.remember(torch.arange(300), probs[:300])
        wrong = memory.wrong_labels(labels, torch.arange(600), g, k=3)
    blocks = wrong.view(3, 600)
    assert not (blocks == labels).any()
    assert all(len(set(col.tolist())) == 3 for col in blocks.t())
    likely = (blocks == (labels + 1) % 10).any(0)
    if draw == "random":
        assert 0.2 < float(likely.float().mean()) < 0.45  # 3 of 9 labels: 1/3
    elif draw == "hard":
        assert bool(likely.all())
    else:
        assert bool(likely[:300].all()) and float(likely[300:].float().mean()) < 0.45


def test_blob_masks_are_binary_with_large_regions():
    g = torch.Generator().manual_seed(0)
    m = neg.blob_masks(64, (28, 28), blur_steps=10, generator=g).view(64, 28, 28)
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    same_as_right = (m[:, :, 1:] == m[:, :, :-1]).float().mean()
    assert same_as_right > 0.85  # a random binary image would give about 0.5
    frac = m.mean()
    assert 0.3 < frac < 0.7


@pytest.mark.parametrize("k", [1, 4, 10])
def test_blur_matrix_is_the_replicate_padded_binomial_convolution(k):
    g = torch.Generator().manual_seed(3)
    img = torch.rand(5, 1, 28, 20, generator=g)
    kern = neg.binomial_kernel(k)
    conv = F.conv2d(F.pad(img, (k, k, 0, 0), mode="replicate"), kern.view(1, 1, 1, -1))
    conv = F.conv2d(F.pad(conv, (0, 0, k, k), mode="replicate"), kern.view(1, 1, -1, 1))
    blurred = neg.blur_matrix(28, k).t() @ (img[:, 0] @ neg.blur_matrix(20, k))
    assert torch.allclose(blurred, conv[:, 0], atol=1e-6)
    assert torch.allclose(neg.blur_matrix(20, k).sum(0), torch.ones(20))  # averages


def test_hybrid_pixels_come_from_one_of_two_images():
    g = torch.Generator().manual_seed(1)
    x = torch.arange(8).float().repeat_interleave(16).view(8, 16)  # image i is all i
    h = neg.hybrid_images(x, (4, 4), 4, g)
    for i in range(8):
        values = set(h[i].tolist())
        assert float(i) in values or len(values) == 1
        assert len(values) <= 2
    assert any(len(set(h[i].tolist())) == 2 for i in range(8))


def test_one_binomial_blur_equals_repeated_small_blurs():
    """Away from the edges, k blurs with [1/4, 1/2, 1/4] equal one binomial blur."""
    g = torch.Generator().manual_seed(2)
    img = torch.rand(3, 1, 40, 40, generator=g)
    k = 4
    small = torch.tensor([0.25, 0.5, 0.25])
    iterated = img
    for _ in range(k):
        iterated = torch.nn.functional.conv2d(iterated, small.view(1, 1, 1, 3), padding=(0, 1))
        iterated = torch.nn.functional.conv2d(iterated, small.view(1, 1, 3, 1), padding=(1, 0))
    kern = neg.binomial_kernel(k)
    once = torch.nn.functional.conv2d(img, kern.view(1, 1, 1, -1), padding=(0, k))
    once = torch.nn.functional.conv2d(once, kern.view(1, 1, -1, 1), padding=(k, 0))
    inner = (slice(None), slice(None), slice(2 * k, -2 * k), slice(2 * k, -2 * k))
    assert torch.allclose(iterated[inner], once[inner], atol=1e-6)
    assert kern.sum() == pytest.approx(1.0)
