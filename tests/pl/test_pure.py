"""Every ``lt.pl`` function only draws: the AnnData is identical before and after."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from anndata.tests.helpers import assert_equal
from scipy import sparse

import labeltransfer as lt

KEY = "lt"
#: One call per public plotting function (a new one fails test_every_pl_function_is_checked).
CALLS = {
    "confusion": lambda a: lt.pl.confusion(a, "cell_type", KEY),
    "reliability": lambda a: lt.pl.reliability(a, "cell_type", KEY),
    "sankey": lambda a: lt.pl.sankey(a, "cell_type", KEY),
    "embedding_confidence": lambda a: lt.pl.embedding_confidence(a, KEY),
    "marker_dotplot": lambda a: lt.pl.marker_dotplot(a, KEY, n_genes=2),
}


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture
def annotated() -> ad.AnnData:
    """Every field the plots read, with a string (not categorical) column of true types.

    scanpy's plotting turns string columns of ``obs`` into categoricals in place; the true
    types are left as strings so that such a change shows.
    """
    rng = np.random.default_rng(0)
    n, genes = 60, [f"g{i}" for i in range(12)]
    truth = np.repeat(["A", "B", "C"], n // 3)
    conf = rng.uniform(0.3, 1.0, n)
    calls = np.where(conf < 0.45, "Unassigned", truth)
    calls[:4] = "novel_0"
    counts = rng.poisson(1.0, (n, len(genes))) + 1
    adata = ad.AnnData(sparse.csr_matrix(counts.astype(np.float32)))
    adata.var_names = genes
    adata.obs_names = [f"c{i}" for i in range(n)]
    adata.obs["cell_type"] = truth.astype(object)
    adata.obs[KEY] = pd.Categorical(calls)
    adata.obs[f"{KEY}_prediction"] = pd.Categorical(np.where(calls == "novel_0", "A", truth))
    adata.obs[f"{KEY}_confidence"] = conf.astype(np.float32)
    adata.obs[f"{KEY}_rejected"] = calls == "Unassigned"
    probabilities = rng.dirichlet(np.ones(3), n)
    adata.obsm[f"{KEY}_probabilities"] = pd.DataFrame(
        probabilities, index=adata.obs_names, columns=["A", "B", "C"]
    )
    adata.obsm[f"X_{KEY}"] = rng.normal(size=(n, 4)).astype(np.float32)
    adata.obsm[f"X_{KEY}_umap"] = rng.normal(size=(n, 2))
    markers = pd.DataFrame(
        {
            "group": np.repeat(["A", "B", "C"], 3),
            "rank": np.tile([1, 2, 3], 3),
            "gene": [genes[i] for i in range(9)],
            "attribution": np.linspace(1.0, 0.2, 9),
        }
    )
    adata.uns[KEY] = {"method": "SCNYM", "markers": {c: markers[c].tolist() for c in markers}}
    return adata


def test_every_pl_function_is_checked():
    assert sorted(CALLS) == sorted(lt.pl.__all__)


@pytest.mark.parametrize("name", sorted(CALLS))
def test_pl_function_leaves_adata_unchanged(annotated, name):
    before = annotated.copy()
    CALLS[name](annotated)
    assert_equal(annotated, before)
    assert annotated.obs["cell_type"].dtype == object


def test_marker_dotplot_by_a_string_column_leaves_it_a_string(annotated):
    before = annotated.copy()
    lt.pl.marker_dotplot(annotated, KEY, groupby="cell_type", n_genes=2)
    assert_equal(annotated, before)
    assert annotated.obs["cell_type"].dtype == object


@pytest.mark.parametrize(("n_genes", "rotation"), [(5, 0), (1, None)])
def test_marker_dotplot_group_labels_stay_clear_of_the_title(n_genes, rotation):
    """Long type names stay level over blocks wide enough for them; over one-gene blocks
    scanpy turns them by 90 degrees, and the title is lifted above them."""
    from labeltransfer.pl._dotplot import _dot_plot, _DotValues

    rows = ["B cells", "FCGR3A+ Monocytes"]  # over scanpy's 4 characters
    columns = len(rows) * n_genes
    blocks = [(r, [f"g{i}_{j}" for j in range(n_genes)]) for i, r in enumerate(rows)]
    values = _DotValues(rows, np.ones((2, columns)), np.ones((2, columns)), "c", "s", None)
    with matplotlib.rc_context({"font.size": 10}):
        plot = _dot_plot(
            values, blocks, title="t", group_label=None, cmap="Reds", largest_dot=200, ax=None
        )
        plot.make_figure()
        renderer = plot.fig.canvas.get_renderer()
        labels = plot.ax_dict["gene_group_ax"].texts
        top = max(t.get_window_extent(renderer).y1 for t in labels)
        (title,) = [ax.title for ax in plot.fig.axes if ax.title.get_text() == "t"]
        bottom = title.get_window_extent(renderer).y0
    assert plot.var_group_rotation == rotation
    assert bottom >= top
