"""Cluster-to-class matching, distribution estimation and the novel-type count."""

from __future__ import annotations

import numpy as np
import pytest

from labeltransfer.scdet import estimate_distribution, estimate_n_novel, match_clusters


def test_hungarian_beats_greedy_matching():
    # cluster 0: 5 cells of type 0 and 4 of type 1; cluster 1: 4 of type 0; cluster 2 unlabelled
    clusters = np.array([0] * 9 + [1] * 4 + [2] * 3)
    labels = np.array([0] * 5 + [1] * 4 + [0] * 4 + [-1] * 3)
    # greedy (cluster 0 -> type 0) keeps 5 cells; the optimum 0 -> 1, 1 -> 0 keeps 8
    np.testing.assert_array_equal(match_clusters(clusters, labels, 2, 3), [1, 0, 2])


def test_unmatched_clusters_go_to_novel_classes_by_size():
    # 2 seen types in clusters 2 and 0; unlabelled clusters 1 (5 cells) and 3 (9 cells)
    clusters = np.array([2] * 6 + [0] * 6 + [1] * 5 + [3] * 9)
    labels = np.array([0] * 6 + [1] * 6 + [-1] * 14)
    class_of_cluster = match_clusters(clusters, labels, n_seen=2, n_clusters=4)
    # largest remaining cluster (3) -> novel class 2, then cluster 1 -> class 3
    np.testing.assert_array_equal(class_of_cluster, [1, 3, 0, 2])


def test_unlabelled_query_cells_of_seen_types_count_in_sizes_only():
    clusters = np.array([0, 0, 1, 1, 1, 2])
    labels = np.array([1, -1, 0, -1, -1, -1])
    np.testing.assert_array_equal(match_clusters(clusters, labels, 2, 3), [1, 0, 2])


def test_match_clusters_bad_input():
    with pytest.raises(ValueError, match="at least n_seen"):
        match_clusters(np.zeros(3, int), np.zeros(3, int), n_seen=3, n_clusters=2)
    with pytest.raises(ValueError, match="cluster ids"):
        match_clusters(np.array([0, 5]), np.array([0, 0]), n_seen=1, n_clusters=2)


def _blobs(sizes, dim=8, spread=0.05, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.eye(dim)[: len(sizes)] * 3
    x = np.concatenate(
        [c + spread * rng.normal(size=(s, dim)) for c, s in zip(centres, sizes, strict=False)]
    )
    group = np.repeat(np.arange(len(sizes)), sizes)
    return x, group


def test_estimate_distribution_recovers_frequencies_and_alignment():
    x, group = _blobs([60, 30, 80, 20, 10])
    # groups 0 and 1 are seen (half of their cells labelled), 2-4 novel
    labels = np.where((group < 2) & (np.arange(group.size) % 2 == 0), group, -1)
    result = estimate_distribution(x, labels, n_seen=2, n_classes=5, seed=0)
    np.testing.assert_allclose(result["distribution"], np.array([60, 30, 80, 20, 10]) / 200)
    # seen types keep their codes, novel groups are ordered by size
    np.testing.assert_array_equal(result["assignment"], group)


def test_estimate_n_novel_counts_separated_groups():
    # 3 seen types (labelled reference + query cells) and 2 novel groups in the query
    x, group = _blobs([100, 100, 100, 60, 60], seed=1)
    is_query = np.zeros(group.size, bool)
    is_query[np.flatnonzero(group < 3)[1::2]] = True
    is_query[group >= 3] = True
    labels = np.where(is_query, -1, group)
    k, report, groups = estimate_n_novel(x, labels, is_query, n_seen=3, seed=0)
    assert k == 2
    assert report["n_unexplained"] >= 120
    assert report["k"][0] == 2
    assert report["silhouette"][0] > 0.5
    # the groups are the two novel blobs
    assert set(np.unique(groups[group == 3])) | set(np.unique(groups[group == 4])) == {0, 1}
    assert (groups[group < 3] == -1).mean() > 0.9


def test_estimate_n_novel_one_and_zero():
    x, group = _blobs([100, 100, 100, 80], seed=2)
    is_query = (group == 3) | (np.arange(group.size) % 2 == 1)
    labels = np.where(is_query, -1, group)
    k, report, _ = estimate_n_novel(x, labels, is_query, n_seen=3, seed=0)
    assert k == 1, report
    assert report["reason"] == "no partition with substantial structure: one type"

    x, group = _blobs([100, 100, 100], seed=3)
    is_query = np.arange(group.size) % 2 == 1
    labels = np.where(is_query, -1, group)
    k, report, groups = estimate_n_novel(x, labels, is_query, n_seen=3, seed=0)
    assert k == 0
    assert report["reason"] == "too few unexplained query cells"
    assert (groups == -1).all()


def test_novel_types_merged_by_the_embedding_are_counted_in_the_expression_space():
    # blobs 3 and 4 are novel; the embedding puts both on blob 3, the expression keeps them
    expression, group = _blobs([100, 100, 100, 60, 60], seed=4)
    embedding = expression.copy()
    embedding[group == 4] += expression[group == 3].mean(0) - expression[group == 4].mean(0)
    is_query = (group >= 3) | (np.arange(group.size) % 2 == 1)
    labels = np.where(is_query, -1, group)
    k, report, _ = estimate_n_novel(embedding, labels, is_query, n_seen=3, seed=0)
    assert k == 1, report
    k, report, groups = estimate_n_novel(
        embedding, labels, is_query, n_seen=3, expression=expression, seed=0
    )
    assert k == 2, report
    assert len(np.unique(groups[group == 3])) == len(np.unique(groups[group == 4])) == 1
    assert groups[group == 3][0] != groups[group == 4][0]
    with pytest.raises(ValueError, match="one row per cell"):
        estimate_n_novel(embedding, labels, is_query, n_seen=3, expression=expression[:10])


def test_seen_query_cells_split_off_by_the_embedding_are_not_a_novel_type():
    # 30 of the 50 query cells of seen type 0 drift away in the embedding (an embedding
    # overfitted to the reference), but stay with their type in the expression space
    expression, group = _blobs([100, 100, 100, 80], seed=5)
    is_query = (group == 3) | (np.arange(group.size) % 2 == 1)
    drifted = np.flatnonzero(is_query & (group == 0))[:30]
    embedding = expression.copy()
    embedding[drifted] += np.eye(8)[6] * 3
    labels = np.where(is_query, -1, group)
    k, report, groups = estimate_n_novel(
        embedding, labels, is_query, n_seen=3, expression=expression, seed=0
    )
    assert k == 1, report
    assert 0 < report["n_seen_part"] <= 30  # those not left out by the neighbour rule
    assert (groups[drifted] == -1).all()
    assert (groups[group == 3] == 0).mean() > 0.9


def test_target_estimation_resists_a_domain_shift():
    # 2 seen types (reference in one domain) and 1 novel type; every target cell is shifted,
    # and the shift moves the target cells of each seen type far from its reference cells
    rng = np.random.default_rng(4)
    dim = 8
    centres = np.eye(dim)[:3] * 3
    shift = np.zeros(dim)
    shift[5] = 6.0
    ref_group = np.repeat([0, 1], 50)
    tgt_group = np.repeat([0, 1, 2], [50, 50, 40])
    x_ref = centres[ref_group] + 0.05 * rng.normal(size=(100, dim))
    x_tgt = centres[tgt_group] + shift + 0.05 * rng.normal(size=(140, dim))
    x = np.concatenate([x_ref, x_tgt])
    labels = np.r_[ref_group, np.full(140, -1)]
    truth = np.r_[ref_group, tgt_group]
    target = estimate_distribution(x, labels, n_seen=2, n_classes=3, seed=0)
    np.testing.assert_array_equal(target["assignment"], truth)
    np.testing.assert_allclose(target["distribution"], np.array([100, 100, 40]) / 240)
    np.testing.assert_allclose(target["target_distribution"], np.array([50, 50, 40]) / 140)
    # the paper's k-means on all cells separates the domains instead: target cells of the
    # seen types end up in a novel class
    paper = estimate_distribution(x, labels, n_seen=2, n_classes=3, seed=0, cells="all")
    assert (paper["assignment"][100:][tgt_group < 2] == 2).mean() > 0.4
    with pytest.raises(ValueError, match="cells must be"):
        estimate_distribution(x, labels, n_seen=2, n_classes=3, cells="some")


def test_unresolved_rare_type_gets_its_reference_share_not_half_a_large_type():
    """A rare subtype k-means cannot resolve must not receive a split half of the large type."""
    rng = np.random.default_rng(0)
    e = np.eye(4)

    def cells(direction, n):
        return direction + 0.02 * rng.normal(size=(n, 4))

    x = np.concatenate(
        [
            cells(e[0], 100),  # type 0, reference
            cells(e[0] + 0.6 * e[3], 10),  # type 1 (a subtype of type 0), reference
            cells(e[0] + 0.5 * e[1], 200),  # type 0, target, first half
            cells(e[0] - 0.5 * e[1], 200),  # type 0, target, second half
            cells(e[0] + 0.6 * e[3], 5),  # type 1, target
            cells(e[2], 150),  # novel, target
        ]
    )
    labels = np.array([0] * 100 + [1] * 10 + [-1] * 555)
    result = estimate_distribution(x, labels, n_seen=2, n_classes=3, seed=0)
    # both halves of type 0 go to type 0 (many-to-one), the novel blob to the novel class
    assert sorted(result["class_of_cluster"].tolist()) == [0, 0, 2]
    target = result["target_distribution"]
    # type 1 keeps its reference share (10 of 110) of the 405 target cells given to seen types
    expected_type1 = 10 / 110 * 405
    np.testing.assert_allclose(
        target, np.array([405, expected_type1, 150]) / (555 + expected_type1)
    )
    # one-to-one matching would have given type 1 a half of type 0 (about 0.36)
    assert target[1] < 0.1
