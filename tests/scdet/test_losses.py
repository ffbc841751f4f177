"""scDET's losses and pseudo-label operations on hand-made tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from labeltransfer.scdet import (
    contrastive_loss,
    logit_adjust,
    sample_pseudo_labels,
    sampling_rates,
    soft_contrastive_loss,
)
from labeltransfer.scdet._losses import (
    distribution_kl,
    smoothed_distribution,
    supervised_contrastive_loss,
    unsupervised_contrastive_loss,
)


def _naive(features_a, features_b, weights, temperature):
    """Eq. (1)/(9) written with loops over anchors and partners, both views in D."""
    u = F.normalize(torch.cat([features_a, features_b]), dim=1).double()
    n = features_a.shape[0]
    w = weights.double()
    terms = []
    for i in range(2 * n):
        others = [a for a in range(2 * n) if a != i]
        denominator = sum(math.exp(float(u[i] @ u[a]) / temperature) for a in others)
        total = sum(float(w[i % n, j % n]) for j in others)
        if total == 0:
            continue
        s = 0.0
        for j in others:
            wij = float(w[i % n, j % n])
            if wij:
                s -= wij * (float(u[i] @ u[j]) / temperature - math.log(denominator))
        terms.append(s / total)
    return sum(terms) / len(terms)


@pytest.fixture
def views():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)


def test_soft_contrastive_with_one_hot_labels_is_supervised_contrastive(views):
    a, b = views
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    one_hot = F.one_hot(labels, 3).float()
    soft = soft_contrastive_loss(a, b, one_hot, temperature=0.5)
    supervised = supervised_contrastive_loss(a, b, labels, temperature=0.5)
    torch.testing.assert_close(soft, supervised)
    same = (labels[:, None] == labels[None, :]).float()
    assert float(soft) == pytest.approx(_naive(a, b, same, 0.5), rel=1e-5)


def test_unsupervised_contrastive_is_nt_xent(views):
    a, b = views
    loss = unsupervised_contrastive_loss(a, b, temperature=1.0)
    assert float(loss) == pytest.approx(_naive(a, b, torch.eye(6), 1.0), rel=1e-5)
    # NT-Xent by hand for anchor 0: the positive is view 2 of cell 0 (row 6)
    u = F.normalize(torch.cat([a, b]), dim=1)
    sims = u @ u.T
    row = torch.cat([sims[0, 1:]])
    expected0 = -(sims[0, 6] - torch.logsumexp(row, dim=0))
    per_anchor = []
    for i in range(12):
        row = torch.cat([sims[i, :i], sims[i, i + 1 :]])
        per_anchor.append(-(sims[i, (i + 6) % 12] - torch.logsumexp(row, dim=0)))
    assert float(per_anchor[0]) == pytest.approx(float(expected0))
    assert float(loss) == pytest.approx(float(torch.stack(per_anchor).mean()), rel=1e-5)


def test_soft_contrastive_matches_the_naive_formula_and_is_symmetric(views):
    a, b = views
    probs = torch.softmax(torch.randn(6, 3, generator=torch.Generator().manual_seed(1)), dim=1)
    loss = soft_contrastive_loss(a, b, probs, temperature=1.0)
    assert float(loss) == pytest.approx(_naive(a, b, probs @ probs.T, 1.0), rel=1e-5)
    # swapping the two views changes nothing
    torch.testing.assert_close(soft_contrastive_loss(b, a, probs, 1.0), loss)
    # nor does reordering the cells
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    torch.testing.assert_close(soft_contrastive_loss(a[perm], b[perm], probs[perm], 1.0), loss)


def test_zero_weight_rows_contribute_no_anchor(views):
    a, b = views
    probs = torch.softmax(torch.randn(6, 3, generator=torch.Generator().manual_seed(2)), dim=1)
    probs[4] = 0.0  # a cell left out by the sampling
    loss = soft_contrastive_loss(a, b, probs, temperature=1.0)
    assert float(loss) == pytest.approx(_naive(a, b, probs @ probs.T, 1.0), rel=1e-5)
    # its anchors would have no positive partner: the loss is the mean over the 10 others
    weights = probs @ probs.T
    assert weights[4].sum() == 0
    # gradients do not flow into it as an anchor, only through the denominators
    all_zero = soft_contrastive_loss(a, b, torch.zeros(6, 3), 1.0)
    assert float(all_zero) == 0.0


def test_contrastive_loss_rejects_bad_shapes(views):
    a, b = views
    with pytest.raises(ValueError, match="same shape"):
        contrastive_loss(a, b[:5], torch.eye(6), 1.0)
    with pytest.raises(ValueError, match="6 x 6"):
        contrastive_loss(a, b, torch.eye(5), 1.0)


def test_logit_adjustment_by_hand():
    logits = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    pi = torch.tensor([0.8, 0.2])
    adjusted = logit_adjust(logits, pi, gamma=0.5)
    expected = torch.tensor(
        [
            [1.0 - 0.5 * math.log(0.8), -0.5 * math.log(0.2)],
            [-0.5 * math.log(0.8), -0.5 * math.log(0.2)],
        ]
    )
    torch.testing.assert_close(adjusted, expected)
    # a balanced cell moves to the rare class: p = softmax(0.5 * log(0.8 / 0.2)) -> 1 / (1 + 2)
    rectified = torch.softmax(adjusted, dim=1)
    assert float(rectified[1, 1]) == pytest.approx(2 / 3)
    torch.testing.assert_close(logit_adjust(logits, pi, gamma=0.0), logits)
    # a uniform distribution shifts every logit equally: probabilities unchanged
    uniform = logit_adjust(logits, torch.tensor([0.5, 0.5]), gamma=1.0)
    torch.testing.assert_close(torch.softmax(uniform, 1), torch.softmax(logits, 1))


def test_sampling_rates_by_hand():
    pi = torch.tensor([0.5, 0.3, 0.2])
    in_batch = torch.tensor([True, False, False])
    rates = sampling_rates(pi, in_batch, alpha=0.5, beta=1.0)
    expected = torch.tensor([2.5**-0.5, 1.5**-1.0, 1.0])
    torch.testing.assert_close(rates, expected)
    torch.testing.assert_close(sampling_rates(pi, in_batch, 0.0, 0.0), torch.ones(3))


def test_sampling_keeps_the_most_confident_of_each_class():
    # class 0: confidences 0.9, 0.6, 0.8, 0.7, 0.95 ; class 1: 0.55, 0.65
    probs = torch.tensor(
        [
            [0.9, 0.1],
            [0.6, 0.4],
            [0.8, 0.2],
            [0.45, 0.55],
            [0.7, 0.3],
            [0.95, 0.05],
            [0.35, 0.65],
        ]
    )
    keep = sample_pseudo_labels(probs, torch.tensor([0.4, 1.0]))
    # ceil(0.4 * 5) = 2 of class 0 (0.95 and 0.9), both of class 1
    assert keep.tolist() == [True, False, False, True, False, True, True]
    keep = sample_pseudo_labels(probs, torch.tensor([0.01, 0.5]))
    assert keep.tolist() == [False, False, False, False, False, True, True]
    assert sample_pseudo_labels(probs[:0], torch.ones(2)).numel() == 0


def test_distribution_regulariser():
    pi = torch.tensor([0.7, 0.2, 0.1])
    smoothed = smoothed_distribution(pi, 0.5)
    expected = pi.sqrt() / pi.sqrt().sum()
    torch.testing.assert_close(smoothed, expected)
    torch.testing.assert_close(smoothed_distribution(pi, 0.0), torch.full((3,), 1 / 3))
    assert float(distribution_kl(pi, pi)) == pytest.approx(0.0, abs=1e-7)
    p = torch.tensor([0.5, 0.5, 0.0])
    q = torch.tensor([0.25, 0.25, 0.5])
    assert float(distribution_kl(p, q)) == pytest.approx(np.log(2), rel=1e-5)
