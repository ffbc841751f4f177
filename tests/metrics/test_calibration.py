from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from labeltransfer.metrics import (
    brier_score,
    ece_noise_floor,
    expected_calibration_error,
    overconfidence_error,
    reliability_table,
)


def test_ece_oe_four_cells_one_per_bin():
    # conf 0.95 / 0.85 / 0.62 / 0.31 fall in bins 9 / 8 / 6 / 3 (one cell each, weight 1/4)
    # correct   1 /    0 /    1 /    1
    # |acc - conf| = 0.05 + 0.85 + 0.38 + 0.69 = 1.97      -> ECE = 1.97 / 4 = 0.4925
    # oe = conf * max(conf - acc, 0): only bin 8: 0.85 * 0.85 = 0.7225 -> OE = 0.180625
    conf = [0.95, 0.85, 0.62, 0.31]
    correct = [True, False, True, True]
    assert expected_calibration_error(conf, correct) == pytest.approx(0.4925)
    assert overconfidence_error(conf, correct) == pytest.approx(0.180625)


def test_ece_oe_shared_bin():
    # 5 bins of width 0.2. conf 0.9, 0.9, 0.8 -> bin 4 (0.8 is its left edge); 0.3 -> bin 1
    # bin 4: mean conf = 2.6 / 3, acc = 2/3, gap = 0.2, weight 3/4 -> 0.15
    # bin 1: conf 0.3, acc 0,   gap = 0.3, weight 1/4 -> 0.075        ECE = 0.225
    # OE: bin 4: (2.6/3) * 0.2 * 3/4 = 0.13; bin 1: 0.3 * 0.3 / 4 = 0.0225   OE = 0.1525
    conf = [0.9, 0.9, 0.8, 0.3]
    correct = [1, 0, 1, 0]
    assert expected_calibration_error(conf, correct, n_bins=5) == pytest.approx(0.225)
    assert overconfidence_error(conf, correct, n_bins=5) == pytest.approx(0.1525)


def test_reliability_table_columns_and_edges():
    conf = [0.9, 0.9, 0.8, 0.3, 1.0, 0.0]
    correct = [1, 0, 1, 0, 1, 0]
    table = reliability_table(conf, correct, n_bins=5)
    assert list(table.columns) == [
        "bin_lower",
        "bin_upper",
        "n",
        "confidence",
        "accuracy",
        "gap",
        "weight",
    ]
    np.testing.assert_allclose(table["bin_lower"], [0.0, 0.2, 0.4, 0.6, 0.8])
    np.testing.assert_allclose(table["bin_upper"], [0.2, 0.4, 0.6, 0.8, 1.0])
    # 0.0 -> first bin, 1.0 -> last (closed) bin
    assert table["n"].tolist() == [1, 1, 0, 0, 4]
    assert np.isnan(table.loc[2, "accuracy"])
    assert np.isnan(table.loc[2, "confidence"])
    assert table.loc[4, "accuracy"] == pytest.approx(3 / 4)
    assert table.loc[4, "confidence"] == pytest.approx(3.6 / 4)
    assert table["weight"].sum() == pytest.approx(1.0)


def test_bin_edges_are_left_closed():
    # k / M must land in bin k even where k / M * M rounds below k (0.29 * 100 = 28.999...)
    table = reliability_table([0.29, 0.57, 0.58], [1, 1, 1], n_bins=100)
    assert table.loc[[29, 57, 58], "n"].tolist() == [1, 1, 1]


def test_errors():
    with pytest.raises(ValueError, match="Empty input"):
        expected_calibration_error([], [])
    with pytest.raises(ValueError, match="Length mismatch"):
        expected_calibration_error([0.5, 0.6], [True])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        overconfidence_error([1.5], [True])
    with pytest.raises(ValueError, match="NaN"):
        expected_calibration_error([np.nan], [True])
    with pytest.raises(ValueError, match="n_bins"):
        reliability_table([0.5], [True], n_bins=0)


def test_brier_score_by_hand():
    # cell 1: (0.7-1)^2 + 0.3^2 = 0.18; cell 2: (0.4-0)^2 + (0.6-1)^2 = 0.32 -> mean 0.25
    prob = [[0.7, 0.3], [0.4, 0.6]]
    onehot = [[1, 0], [0, 1]]
    assert brier_score(prob, onehot) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="Shape mismatch"):
        brier_score(prob, [[1, 0]])


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0.0, 1.0, allow_nan=False), st.booleans()), min_size=1, max_size=50
    ),
    st.integers(1, 20),
)
def test_ece_oe_bounds(rows, n_bins):
    conf, correct = (list(x) for x in zip(*rows, strict=True))
    ece = expected_calibration_error(conf, correct, n_bins=n_bins)
    oe = overconfidence_error(conf, correct, n_bins=n_bins)
    assert 0.0 <= ece <= 1.0
    # conf <= 1, so conf * max(conf - acc, 0) <= |acc - conf| bin by bin
    assert 0.0 <= oe <= ece + 1e-12
    table = reliability_table(conf, correct, n_bins=n_bins)
    assert table["n"].sum() == len(conf)


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 8), st.integers(0, 8)), min_size=1, max_size=8),
    st.integers(1, 15),
)
def test_perfectly_calibrated_data_has_zero_ece(groups, n_bins):
    # each group: n cells with confidence k/n of which exactly k are correct. Any union of such
    # groups in one bin has mean confidence sum(k)/sum(n) = accuracy, so ECE = OE = 0.
    conf, correct = [], []
    for n, k in groups:
        k = min(k, n)
        conf += [k / n] * n
        correct += [True] * k + [False] * (n - k)
    assert expected_calibration_error(conf, correct, n_bins=n_bins) == pytest.approx(
        0.0, abs=1e-12
    )
    assert overconfidence_error(conf, correct, n_bins=n_bins) == pytest.approx(0.0, abs=1e-12)


def test_ece_noise_floor_one_bin_by_hand():
    # one bin of n cells at confidence c: E|Bin(n, c) / n - c|, about sqrt(2c(1-c) / (pi n))
    floor = ece_noise_floor(np.full(100, 0.5), n_bins=1, n_draws=4000)
    assert floor == pytest.approx(np.sqrt(0.5 / (np.pi * 100)), abs=0.002)
    assert ece_noise_floor(np.ones(50)) == 0.0  # certain cells are always right


def test_ece_noise_floor_falls_with_the_number_of_cells():
    rng = np.random.default_rng(0)
    small, large = (ece_noise_floor(rng.uniform(0.4, 1.0, n)) for n in (100, 10_000))
    assert 0.03 < small < 0.1
    assert large < small / 5


def test_ece_noise_floor_is_the_same_drawn_in_blocks(monkeypatch):
    from labeltransfer.metrics import _calibration

    conf = np.random.default_rng(1).uniform(0.2, 1.0, 300)
    whole = ece_noise_floor(conf, n_draws=50, seed=3)
    monkeypatch.setattr(_calibration, "_FLOOR_BLOCK", 700)  # two draws per block
    assert ece_noise_floor(conf, n_draws=50, seed=3) == pytest.approx(whole, abs=1e-12)


def test_ece_noise_floor_errors():
    with pytest.raises(ValueError, match="n_draws"):
        ece_noise_floor([0.5, 0.7], n_draws=0)
    with pytest.raises(ValueError, match="confidence"):
        ece_noise_floor([0.5, 1.5])
