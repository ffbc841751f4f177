from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from labeltransfer.metrics import hungarian_match, novel_auroc, open_world_report, oscr


def test_novel_auroc_by_hand():
    # novelty score s = 1 - conf: known s = 0.1, 0.3, 0.5; novel s = 0.2, 0.6
    # pairs with s_novel > s_known: 0.2 > 0.1 (1) ; 0.6 > all three (3) -> 4 / 6
    is_novel = [False, False, False, True, True]
    conf = [0.9, 0.7, 0.5, 0.8, 0.4]
    assert novel_auroc(is_novel, conf) == pytest.approx(4 / 6)


def test_novel_auroc_ties_and_extremes():
    assert novel_auroc([False, True], [0.5, 0.5]) == pytest.approx(0.5)
    assert novel_auroc([False, False, True], [0.9, 0.8, 0.1]) == pytest.approx(1.0)
    assert novel_auroc([False, False, True], [0.1, 0.2, 0.9]) == pytest.approx(0.0)


def test_oscr_by_hand():
    # known: conf 0.9 (correct), 0.7 (wrong), 0.5 (correct); novel: conf 0.8, 0.4
    # threshold  0.9    0.8    0.7    0.5    0.4
    # CCR        1/3    1/3    1/3    2/3    2/3
    # FPR        0      1/2    1/2    1/2    1
    # area: (0.5 - 0) * 1/3 + (1 - 0.5) * 2/3 = 1/6 + 1/3 = 0.5
    is_novel = [False, False, False, True, True]
    correct = [True, False, True, False, False]
    conf = [0.9, 0.7, 0.5, 0.8, 0.4]
    assert oscr(is_novel, correct, conf) == pytest.approx(0.5)
    area, curve = oscr(is_novel, correct, conf, return_curve=True)
    assert area == pytest.approx(0.5)
    assert list(curve.columns) == ["threshold", "fpr", "ccr"]
    assert curve.iloc[0].tolist() == [np.inf, 0.0, 0.0]
    np.testing.assert_allclose(curve["fpr"], [0, 0, 0.5, 0.5, 0.5, 1.0])
    np.testing.assert_allclose(curve["ccr"], [0, 1 / 3, 1 / 3, 1 / 3, 2 / 3, 2 / 3])


def test_oscr_perfect_separation_equals_closed_set_accuracy():
    is_novel = [False, False, False, False, True, True]
    correct = [True, True, False, True, False, False]
    conf = [0.99, 0.95, 0.9, 0.85, 0.3, 0.2]
    assert oscr(is_novel, correct, conf) == pytest.approx(3 / 4)


def test_oscr_ties_are_order_independent():
    # a known-correct and a novel cell tie at 0.5: both enter together (trapezoid)
    # points (0,0) -> (1, 1/1) in one step: area = 1 * (0 + 1) / 2 = 0.5
    assert oscr([False, True], [True, False], [0.5, 0.5]) == pytest.approx(0.5)
    assert oscr([True, False], [False, True], [0.5, 0.5]) == pytest.approx(0.5)


def test_openset_errors():
    with pytest.raises(ValueError, match="no novel cells"):
        novel_auroc([False, False], [0.2, 0.3])
    with pytest.raises(ValueError, match="no known cells"):
        oscr([True, True], [False, False], [0.2, 0.3])
    with pytest.raises(ValueError, match="Length mismatch"):
        oscr([True, False], [False], [0.2, 0.3])
    with pytest.raises(ValueError, match="Empty input"):
        hungarian_match([], [])


def test_hungarian_by_hand():
    # contingency: x -> a:2 ; y -> a:1, b:2, c:1. Best one-to-one: x->a, y->b (4 cells)
    mapping = hungarian_match(["a", "a", "a", "b", "b", "c"], ["x", "x", "y", "y", "y", "y"])
    assert mapping == {"x": "a", "y": "b"}


def test_hungarian_surplus_groups_are_left_out():
    mapping = hungarian_match(["a", "a", "b"], ["g0", "g1", "g2"])
    assert len(mapping) == 2
    assert set(mapping.values()) == {"a", "b"}


def test_open_world_report_by_hand():
    # seen = A, B. Seen cells: A->A ok, A->B no, B->B ok, B->Unassigned no   -> 2/4
    # novel groups: novel_0 = {N1, N1}; novel_1 = {N1, N2, N2}
    # Hungarian: novel_0->N1 (2) + novel_1->N2 (2) = 4 beats the swap (0 + 1)
    # novel cells: N1 N1 (novel_0) ok ok, N1 (novel_1) no, N2 N2 ok ok, N2 -> A no  -> 4/6
    # overall (2 + 4) / 10
    y_true = ["A", "A", "B", "B", "N1", "N1", "N1", "N2", "N2", "N2"]
    y_pred = [
        "A",
        "B",
        "B",
        "Unassigned",
        "novel_0",
        "novel_0",
        "novel_1",
        "novel_1",
        "novel_1",
        "A",
    ]
    rep = open_world_report(y_true, y_pred, ["A", "B"])
    assert rep["seen_accuracy"] == pytest.approx(0.5)
    assert rep["novel_accuracy"] == pytest.approx(4 / 6)
    assert rep["overall_accuracy"] == pytest.approx(0.6)
    assert rep["n_novel_clusters"] == 2
    assert rep["n_novel_types"] == 2
    assert rep["n_seen_cells"] == 4
    assert rep["n_novel_cells"] == 6
    assert rep["mapping"] == {"novel_0": "N1", "novel_1": "N2"}


def test_open_world_groups_never_match_seen_types():
    # a novel group made of B cells is not credited as B; Unassigned is never matched
    rep = open_world_report(["B", "B", "N"], ["novel_0", "novel_0", "Unassigned"], ["A", "B"])
    assert rep["seen_accuracy"] == 0.0
    assert rep["novel_accuracy"] == 0.0
    assert rep["mapping"] == {"novel_0": "N"}


def test_open_world_without_novel_cells():
    rep = open_world_report(["A", "B"], ["A", "A"], ["A", "B"])
    assert rep["seen_accuracy"] == pytest.approx(0.5)
    assert np.isnan(rep["novel_accuracy"])
    assert rep["n_novel_types"] == 0
    assert rep["n_novel_clusters"] == 0


def _matched_accuracy(t, p):
    mapping = hungarian_match(t, p)
    return np.mean([mapping.get(x) == y for x, y in zip(p, t, strict=True)])


labels = st.sampled_from(["a", "b", "c", "d"])
groups = st.sampled_from(["g0", "g1", "g2", "g3", "g4"])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(labels, groups), min_size=1, max_size=40), st.permutations(range(5)))
def test_hungarian_invariant_to_relabelling(rows, perm):
    t, p = (list(x) for x in zip(*rows, strict=True))
    rename = {f"g{i}": f"cluster_{j}" for i, j in enumerate(perm)}
    p2 = [rename[x] for x in p]
    assert _matched_accuracy(t, p2) == pytest.approx(_matched_accuracy(t, p))
    # the matched accuracy is at least that of any fixed map, e.g. each group -> its majority
    assert 0.0 <= _matched_accuracy(t, p) <= 1.0


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["A", "B", "N1", "N2"]),
            st.sampled_from(["A", "B", "Unassigned", "g0", "g1", "g2"]),
        ),
        min_size=1,
        max_size=40,
    ),
    st.permutations(range(3)),
)
def test_open_world_invariant_to_renaming_novel_groups(rows, perm):
    t, p = (list(x) for x in zip(*rows, strict=True))
    rename = {f"g{i}": f"novel_{j}" for i, j in enumerate(perm)}
    p2 = [rename.get(x, x) for x in p]
    a = open_world_report(t, p, ["A", "B"])
    b = open_world_report(t, p2, ["A", "B"])
    for name in ("seen_accuracy", "novel_accuracy", "overall_accuracy"):
        assert np.isnan(a[name]) == np.isnan(b[name])
        if not np.isnan(a[name]):
            assert a[name] == pytest.approx(b[name])
            assert 0.0 <= a[name] <= 1.0
    assert a["n_novel_clusters"] == b["n_novel_clusters"]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.booleans(), st.booleans(), st.floats(0.0, 1.0, allow_nan=False)),
        min_size=2,
        max_size=40,
    )
)
def test_oscr_auroc_bounds(rows):
    novel, correct, conf = (list(x) for x in zip(*rows, strict=True))
    if all(novel) or not any(novel):
        return
    known_acc = np.mean([c for n, c in zip(novel, correct, strict=True) if not n])
    value = oscr(novel, correct, conf)
    assert -1e-12 <= value <= known_acc + 1e-12
    auroc = novel_auroc(novel, conf)
    assert 0.0 <= auroc <= 1.0
    from sklearn.metrics import roc_auc_score

    assert auroc == pytest.approx(roc_auc_score(novel, 1.0 - np.asarray(conf)))
    # permuting the cells does not change OSCR
    order = np.random.default_rng(0).permutation(len(novel))
    shuffled = oscr(np.array(novel)[order], np.array(correct)[order], np.array(conf)[order])
    assert shuffled == pytest.approx(value)
