from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from labeltransfer.metrics import (
    cohen_kappa,
    effective_accuracy,
    macro_f1,
    per_type_table,
    raw_accuracy,
    rejection_rate,
)

# Hand-made example used throughout:
#   idx      0  1  2  3  4  5
#   truth    a  a  a  b  b  c
#   pred     a  a  b  b  c  c      correct: T T F T F T  -> raw = 4/6
#   rejected F  T  F  F  T  F      rej = 2/6; kept 0,2,3,5 -> T F T T -> eff = 3/4
Y_TRUE = ["a", "a", "a", "b", "b", "c"]
Y_PRED = ["a", "a", "b", "b", "c", "c"]
REJ = [False, True, False, False, True, False]

labels = st.sampled_from(["a", "b", "c", "d"])


def test_raw_rejection_effective_by_hand():
    assert raw_accuracy(Y_TRUE, Y_PRED) == pytest.approx(4 / 6)
    assert rejection_rate(REJ) == pytest.approx(2 / 6)
    assert effective_accuracy(Y_TRUE, Y_PRED, REJ) == pytest.approx(3 / 4)


def test_inputs_accept_pandas_and_numpy():
    t = pd.Series(pd.Categorical(Y_TRUE), index=list("uvwxyz"))
    p = np.array(Y_PRED, dtype=object)
    assert raw_accuracy(t, p) == pytest.approx(4 / 6)
    assert rejection_rate(np.array(REJ, dtype=int)) == pytest.approx(2 / 6)


def test_effective_accuracy_all_rejected_is_nan():
    assert np.isnan(effective_accuracy(["a", "b"], ["a", "a"], [True, True]))


def test_macro_f1_by_hand():
    # F1 = 2TP / (n_true + n_pred): a = 4/5, b = 2/4, c = 2/3
    assert macro_f1(Y_TRUE, Y_PRED) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    # restricted to the labels a and b
    assert macro_f1(Y_TRUE, Y_PRED, labels=["a", "b"]) == pytest.approx((0.8 + 0.5) / 2)
    # a predicted label absent from the truth counts with F1 = 0 by default
    assert macro_f1(["a", "a"], ["a", "Unassigned"]) == pytest.approx((2 / 3 + 0.0) / 2)


def test_cohen_kappa_by_hand():
    # po = 4/6; marginals true a3 b2 c1, pred a2 b2 c2: pe = (6 + 4 + 2) / 36 = 1/3
    # kappa = (2/3 - 1/3) / (1 - 1/3) = 0.5
    assert cohen_kappa(Y_TRUE, Y_PRED) == pytest.approx(0.5)
    assert cohen_kappa(["a", "b"], ["a", "b"]) == pytest.approx(1.0)
    assert cohen_kappa(["a", "a"], ["a", "a"]) == pytest.approx(1.0)


def test_per_type_table_by_hand():
    table = per_type_table(Y_TRUE, Y_PRED, REJ)
    assert list(table.index) == ["a", "b", "c"]
    assert list(table.columns) == [
        "n_cells",
        "raw_accuracy",
        "rejection_rate",
        "effective_accuracy",
        "precision",
        "f1",
    ]
    expected = pd.DataFrame(
        {
            "n_cells": [3, 2, 1],
            "raw_accuracy": [2 / 3, 1 / 2, 1.0],
            "rejection_rate": [1 / 3, 1 / 2, 0.0],
            "effective_accuracy": [1 / 2, 1.0, 1.0],
            "precision": [1.0, 1 / 2, 1 / 2],
            "f1": [4 / 5, 1 / 2, 2 / 3],
        },
        index=pd.Index(["a", "b", "c"], name="cell_type"),
    )
    pd.testing.assert_frame_equal(table, expected)


def test_per_type_table_never_predicted_and_all_rejected():
    table = per_type_table(["a", "b"], ["a", "a"], [False, True])
    assert np.isnan(table.loc["b", "precision"])
    assert np.isnan(table.loc["b", "effective_accuracy"])
    assert table.loc["b", "f1"] == 0.0


def test_per_type_table_default_no_rejection():
    table = per_type_table(Y_TRUE, Y_PRED)
    assert (table["rejection_rate"] == 0).all()
    np.testing.assert_allclose(table["effective_accuracy"], table["raw_accuracy"])


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="Length mismatch"):
        raw_accuracy(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="Empty input"):
        raw_accuracy([], [])
    with pytest.raises(ValueError, match="Empty input"):
        rejection_rate([])
    with pytest.raises(ValueError, match="missing label"):
        raw_accuracy(["a", None], ["a", "b"])
    with pytest.raises(ValueError, match="boolean mask"):
        rejection_rate([0, 2])
    with pytest.raises(ValueError, match="boolean mask"):
        effective_accuracy(["a"], ["a"], ["yes"])
    with pytest.raises(TypeError, match="single string"):
        raw_accuracy("abc", "abc")
    with pytest.raises(ValueError, match="Length mismatch"):
        per_type_table(["a", "b"], ["a", "b"], [True])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(labels, labels, st.booleans()), min_size=1, max_size=40))
def test_properties(rows):
    t, p, r = (list(x) for x in zip(*rows, strict=True))
    raw = raw_accuracy(t, p)
    assert 0.0 <= raw <= 1.0
    assert 0.0 <= rejection_rate(r) <= 1.0
    assert 0.0 <= macro_f1(t, p) <= 1.0
    assert -1.0 <= cohen_kappa(t, p) <= 1.0
    eff = effective_accuracy(t, p, r)
    assert np.isnan(eff) == all(r)
    assert np.isnan(eff) or 0.0 <= eff <= 1.0
    # nothing rejected: effective == raw
    assert effective_accuracy(t, p, [False] * len(t)) == pytest.approx(raw)
    table = per_type_table(t, p, r)
    assert table["n_cells"].sum() == len(t)
    # recall weighted by type size is the raw accuracy
    assert (table["n_cells"] * table["raw_accuracy"]).sum() / len(t) == pytest.approx(raw)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(labels, labels), min_size=1, max_size=40))
def test_f1_kappa_agree_with_sklearn(rows):
    from sklearn.metrics import cohen_kappa_score, f1_score

    t, p = (list(x) for x in zip(*rows, strict=True))
    assert macro_f1(t, p) == pytest.approx(f1_score(t, p, average="macro", zero_division=0))
    if len(set(t) | set(p)) > 1:
        assert cohen_kappa(t, p) == pytest.approx(cohen_kappa_score(t, p))
