"""Each CellPredX loss on hand-made tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from anndata import AnnData
from scipy import sparse

from labeltransfer.cellpredx import (
    AttentionNetwork,
    CellPredXLossConfig,
    CellPredXModule,
    feature_alignment_loss,
    knn_contrastive_loss,
    projection_regularization,
    pseudo_label_selection,
    query_knn_graph,
    sparse_center_loss,
)


def test_feature_alignment_uses_only_the_top_p_matches():
    ref = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # two query cells sit exactly on reference cells, two point away from both
    query = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, -0.2], [-0.3, -1.0]], requires_grad=True)
    aligned = feature_alignment_loss(ref, query, top_p=0.5)
    assert aligned.item() == pytest.approx(0.0, abs=1e-6)
    aligned.backward()
    # the unmatched half receives no gradient at all: it is not in the top-p set
    assert torch.all(query.grad[2:] == 0)

    everyone = feature_alignment_loss(ref, query.detach(), top_p=1.0)
    cos_bad = F.cosine_similarity(query.detach()[2:], ref[[0, 1]][[1, 0]], dim=1)
    # each poor query cell is matched to its most similar reference cell
    best = torch.stack([F.cosine_similarity(query.detach()[i : i + 1], ref).max() for i in (2, 3)])
    assert everyone.item() == pytest.approx(((1 - best).sum() / 4).item(), rel=1e-5)
    assert (best >= cos_bad).all()
    with pytest.raises(ValueError, match="top_p"):
        feature_alignment_loss(ref, query, top_p=0.0)


def test_contrastive_loss_vanishes_when_neighbours_coincide():
    z = torch.eye(6)  # six mutually orthogonal cells
    respected = knn_contrastive_loss(z, z.clone(), temperature=0.05)
    assert respected.item() < 1e-3
    shuffled = knn_contrastive_loss(z, z[torch.tensor([1, 2, 3, 4, 5, 0])], temperature=0.05)
    assert shuffled.item() > 10.0
    # symmetric in its two views
    a, b = torch.randn(8, 4), torch.randn(8, 4)
    assert knn_contrastive_loss(a, b, 0.8).item() == pytest.approx(
        knn_contrastive_loss(b, a, 0.8).item(), rel=1e-5
    )
    with pytest.raises(ValueError, match="temperature"):
        knn_contrastive_loss(a, b, 0.0)


def test_contrastive_loss_is_eq3_term_by_term():
    """Each of the 2n anchors: -log of its positive's share among every other cell."""
    torch.manual_seed(0)
    z = torch.randn(5, 3, requires_grad=True)
    positive = torch.randn(5, 3, requires_grad=True)
    loss = knn_contrastive_loss(z, positive, temperature=0.3)
    cells = F.normalize(torch.cat([z, positive]), dim=1)
    terms = []
    for a in range(10):
        similarity = torch.exp(cells @ cells[a] / 0.3)
        partner = (a + 5) % 10
        terms.append(-torch.log(similarity[partner] / (similarity.sum() - similarity[a])))
    expected = torch.stack(terms).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    grads = torch.autograd.grad(loss, (z, positive))
    expected_grads = torch.autograd.grad(expected, (z, positive))
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_sparse_center_loss_is_weighted_by_attention():
    z = torch.tensor([[1.0, 5.0], [3.0, -5.0]])
    centers = torch.zeros(1, 2, requires_grad=True)
    labels = torch.tensor([0, 0])
    # attention 0 on dimension 1: its large deviations do not count
    attention = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    loss = sparse_center_loss(z, attention, labels, centers)
    assert loss.item() == pytest.approx((1.0 + 9.0) / (2 * 2))
    loss.backward()
    # DACL center update: minus the class mean of a * (z - c), over (1 + n_k) cells
    np.testing.assert_allclose(centers.grad.numpy(), [[-(1.0 + 3.0) / 3.0, 0.0]])

    full = sparse_center_loss(z, torch.ones(2, 2), labels, centers.detach())
    assert full.item() == pytest.approx((1 + 25 + 9 + 25) / 4)
    assert sparse_center_loss(z, torch.zeros(2, 2), labels, centers.detach()).item() == 0.0


def test_attention_weights_come_from_inclusion_and_exclusion_scores():
    torch.manual_seed(0)
    net = AttentionNetwork(n_latent=4)
    net.eval()
    z = torch.randn(5, 4)
    s_in, s_ex = net.scores(z)
    expected = torch.exp(s_in) / (torch.exp(s_in) + torch.exp(s_ex))
    torch.testing.assert_close(net(z), expected)
    with torch.no_grad():
        net.inclusion.bias[:] = torch.tensor([50.0, -50.0, 0.0, 0.0])
        net.exclusion.bias.zero_()
        net.inclusion.weight.zero_()
        net.exclusion.weight.zero_()
    weights = net(z)
    torch.testing.assert_close(weights[:, 0], torch.ones(5))
    torch.testing.assert_close(weights[:, 1], torch.zeros(5))
    torch.testing.assert_close(weights[:, 2], torch.full((5,), 0.5))


def test_module_center_loss_uses_the_attention_network():
    torch.manual_seed(0)
    module = CellPredXModule(
        n_input=20, n_labels=3, feature_idx=range(20), input_type="counts", n_latent=8
    )
    module.train()
    reference = {
        "X": torch.poisson(torch.full((16, 20), 4.0)),
        "labels": torch.randint(0, 3, (16, 1)),
    }
    query = {
        "X": torch.poisson(torch.full((12, 20), 4.0)),
        "X_positive": torch.poisson(torch.full((12, 20), 4.0)),
    }
    config = CellPredXLossConfig(sc_weight=1.0, cl_weight=0.0, fa_weight=0.0, temperature=0.8)
    output = module.loss(reference, query=query, config=config)
    output.loss.backward()
    assert module.attention.inclusion.weight.grad.abs().sum() > 0
    assert module.centers.grad.abs().sum() > 0
    # a quarter of the query minibatch is pseudo-labelled
    assert output.extra_metrics["pseudo_labelled_fraction"].item() == pytest.approx(0.25, abs=0.1)
    for name in ("ce_loss", "pr_loss", "contrastive_loss", "alignment_loss", "center_loss"):
        assert torch.isfinite(output.extra_metrics[name]), name
    assert output.extra_metrics["contrastive_loss"] > 0  # computed even with weight 0

    # with every weight but CE at 0 the loss is the cross-entropy
    module.zero_grad()
    only_ce = module.loss(
        reference,
        query=query,
        config=CellPredXLossConfig(
            pr_weight=0.0, cl_weight=0.0, fa_weight=0.0, sc_weight=0.0, temperature=0.8
        ),
    )
    assert only_ce.loss.item() == pytest.approx(only_ce.extra_metrics["ce_loss"].item())
    only_ce.loss.backward()
    assert module.attention.inclusion.weight.grad is None or (
        module.attention.inclusion.weight.grad.abs().sum() == 0
    )


def test_projection_regularization_penalises_correlated_dimensions():
    torch.manual_seed(0)
    a = torch.randn(200, 1)
    independent = torch.cat([a, torch.randn(200, 1)], dim=1)
    correlated = torch.cat([a, a], dim=1)
    assert projection_regularization(correlated) > projection_regularization(independent)
    # collapsing the spread is penalised
    assert projection_regularization(independent * 0.01) > projection_regularization(independent)
    with pytest.raises(ValueError, match="two cells"):
        projection_regularization(torch.randn(1, 3))


def test_pseudo_labels_keep_the_most_confident_quarter():
    logits = torch.tensor([[0.0, 0.1], [5.0, 0.0], [0.0, 3.0], [1.0, 0.0]] * 2)
    selected, labels = pseudo_label_selection(logits, quantile=0.75)
    assert labels.tolist() == [1, 0, 1, 0] * 2
    assert selected.tolist() == [False, True, False, False] * 2


def test_knn_graph_of_the_query_on_principal_components():
    rng = np.random.default_rng(0)
    centres = rng.poisson(20, size=(2, 40)) * rng.integers(0, 2, size=(2, 40))
    counts = np.vstack([rng.poisson(centres[i % 2] + 1) for i in range(60)]).astype(np.float32)
    adata = AnnData(X=sparse.csr_matrix(counts))
    query_idx = np.arange(10, 60)  # the first ten cells play the reference
    knn = query_knn_graph(
        adata,
        query_idx,
        feature_idx=np.arange(40),
        layer=None,
        input_type="counts",
        n_neighbors=5,
        n_pcs=50,
    )
    assert knn.shape == (50, 5)
    assert np.isin(knn, query_idx).all()  # positions in adata, query cells only
    assert (knn != query_idx[:, None]).all()  # never the cell itself
    assert ((knn % 2) == (query_idx[:, None] % 2)).all()  # neighbours share the cell's state
