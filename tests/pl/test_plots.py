from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

import labeltransfer as lt


@pytest.fixture
def adata() -> ad.AnnData:
    """Seven cells, reference types A and B, novel type N grouped as novel_0 (see test_report)."""
    truth = ["A", "A", "A", "B", "B", "N", "N"]
    pred = ["A", "A", "B", "B", "A", "A", "B"]
    conf = np.array([0.9, 0.8, 0.6, 0.95, 0.55, 0.5, 0.45])
    a = ad.AnnData(np.zeros((7, 2), dtype=np.float32))
    a.obs_names = [f"cell{i}" for i in range(7)]
    a.obs["cell_type"] = pd.Categorical(truth)
    a.obs["lt"] = pd.Categorical(["A", "A", "B", "B", "Unassigned", "novel_0", "novel_0"])
    a.obs["lt_prediction"] = pd.Categorical(pred, categories=["A", "B"])
    a.obs["lt_confidence"] = conf
    a.obs["lt_rejected"] = [False, False, False, False, True, True, True]
    p_a = np.where(np.array(pred) == "A", conf, 1 - conf)
    a.obsm["lt_probabilities"] = pd.DataFrame(
        np.column_stack([p_a, 1 - p_a]), index=a.obs_names, columns=["A", "B"]
    )
    return a


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _ticks(labels) -> list[str]:
    return [t.get_text() for t in labels]


def test_confusion(adata, tmp_path):
    path = tmp_path / "confusion.png"
    ax = lt.pl.confusion(adata, "cell_type", "lt", save=path)
    assert path.stat().st_size > 1000
    assert _ticks(ax.get_xticklabels()) == ["A", "B", "novel_0", "Unassigned"]
    assert _ticks(ax.get_yticklabels()) == ["A", "B", "N"]
    assert ax.get_xlabel() == "Predicted (lt)"
    assert ax.get_ylabel() == "True (cell_type)"
    texts = [t.get_text() for t in ax.texts]
    # row A: 2 of 3 predicted A, row N: both in novel_0, with counts under the fractions
    assert "0.67\n(2)" in texts
    assert "1.00\n(2)" in texts
    image = ax.images[0].get_array()
    np.testing.assert_allclose(np.asarray(image).sum(axis=1), 1.0)
    assert len(ax.figure.axes) == 2  # matrix + colorbar


def test_confusion_counts_into_given_axes(adata):
    fig, axes = plt.subplots(1, 2)
    ax = lt.pl.confusion(adata, "cell_type", "lt", normalize=False, ax=axes[1])
    assert ax is axes[1]
    np.testing.assert_array_equal(
        np.asarray(ax.images[0].get_array()), [[2, 1, 0, 0], [0, 1, 0, 1], [0, 0, 2, 0]]
    )


def test_reliability(adata, tmp_path):
    path = tmp_path / "reliability.pdf"
    ax = lt.pl.reliability(adata, "cell_type", "lt", n_bins=10, save=path)
    assert path.stat().st_size > 1000
    assert ax.get_ylabel() == "Accuracy"
    assert "ECE = 0.300" in ax.get_title()
    assert ax.get_xlim() == (0.0, 1.0)
    hist = [a for a in ax.figure.axes if a is not ax]
    assert len(hist) == 1
    assert hist[0].get_xlabel() == "Confidence"
    # the histogram counts the 5 known cells only
    assert sum(p.get_height() for p in hist[0].patches) == 5


def test_sankey(adata, tmp_path):
    path = tmp_path / "sankey.png"
    ax = lt.pl.sankey(adata, "cell_type", "lt", save=path)
    assert path.stat().st_size > 1000
    texts = [t.get_text() for t in ax.texts]
    for label in ["A (3)", "B (2)", "N (2)", "novel_0 (2)", "Unassigned (1)", "cell_type", "lt"]:
        assert label in texts
    # right-hand order: shared names in left order, then novel groups, Unassigned last
    right = [t.get_text() for t in ax.texts if t.get_ha() == "left" and "(" in t.get_text()]
    assert right == ["A (2)", "B (2)", "novel_0 (2)", "Unassigned (1)"]


def test_plot_errors(adata, tmp_path):
    with pytest.raises(KeyError, match="Unknown key 'truth'"):
        lt.pl.confusion(adata, "truth", "lt")
    with pytest.raises(KeyError, match="Unknown key 'x'"):
        lt.pl.sankey(adata, "cell_type", "x")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lt.pl.confusion(adata, "cell_type", "lt", save=tmp_path / "missing" / "c.png")
    novel_only = adata[adata.obs["cell_type"] == "N"].copy()
    with pytest.raises(ValueError, match="reference type"):
        lt.pl.reliability(novel_only, "cell_type", "lt")
