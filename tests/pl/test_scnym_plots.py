"""Tests of lt.pl.embedding_confidence and lt.pl.marker_dotplot."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from anndata.tests.helpers import assert_equal
from matplotlib.colors import Normalize, to_rgba
from matplotlib.patches import Rectangle
from scipy import sparse

import labeltransfer as lt

KEY = "lt"


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _collection(ax, label: str):
    found = [c for c in ax.collections if c.get_label() == label]
    assert len(found) == 1, [c.get_label() for c in ax.collections]
    return found[0]


# ------------------------------------------------------------------ embedding_confidence
@pytest.fixture
def annotated() -> ad.AnnData:
    """120 reference + 120 query cells with the fields `annotate(key_added="lt")` writes."""
    rng = np.random.default_rng(0)
    n = 240
    types = np.repeat(["A", "B", "C"], n // 3)
    centers = {"A": 0.0, "B": 6.0, "C": -6.0}
    z = rng.normal(0, 1, (n, 8)) + np.array([centers[t] for t in types])[:, None]
    conf = rng.uniform(0.3, 1.0, n)
    rejected = conf < 0.5
    calls = np.where(rejected, "Unassigned", types)
    calls[:5] = "novel_0"
    adata = ad.AnnData(obs=pd.DataFrame(index=[f"c{i}" for i in range(n)]))
    adata.obs[KEY] = pd.Categorical(calls, categories=["A", "B", "C", "Unassigned", "novel_0"])
    adata.obs[f"{KEY}_prediction"] = pd.Categorical(types)
    adata.obs[f"{KEY}_confidence"] = conf.astype(np.float32)
    adata.obs[f"{KEY}_rejected"] = rejected
    adata.obs["lt_role"] = pd.Categorical(np.tile(["reference", "query"], n // 2))
    adata.obsm[f"X_{KEY}"] = z.astype(np.float32)
    # as lt.tl.embedding(adata, "lt") writes it: the groups apart in two dimensions
    adata.obsm[f"X_{KEY}_umap"] = z[:, :2] + rng.normal(0, 0.1, (n, 2))
    adata.uns[KEY] = {"method": "SCNYM"}
    return adata


def test_embedding_confidence_draws_the_stored_umap(annotated):
    adata = annotated
    before = adata.copy()
    axes = lt.pl.embedding_confidence(adata, KEY)
    assert_equal(adata, before)  # pl only draws

    umap = adata.obsm[f"X_{KEY}_umap"]
    labels_ax, conf_ax = axes
    assert labels_ax.get_title() == f"Final call ({KEY})"
    assert labels_ax.get_xlabel() == "UMAP1"
    cells = _collection(labels_ax, "cells")
    np.testing.assert_allclose(cells.get_offsets(), umap)
    colors = cells.get_facecolors()
    assert len(colors) == adata.n_obs
    calls = adata.obs[KEY].astype(str).to_numpy()
    # one colour per call, Unassigned in grey
    for call in np.unique(calls):
        assert len(np.unique(colors[calls == call], axis=0)) == 1
    assert len(np.unique(colors, axis=0)) == 5
    np.testing.assert_allclose(colors[calls == "Unassigned"][0], to_rgba("#b0b0b0"))
    legend = [t.get_text() for t in labels_ax.get_legend().get_texts()]
    counts = pd.Series(calls).value_counts()
    assert legend == [f"{c} ({counts[c]})" for c in ["A", "B", "C", "novel_0", "Unassigned"]]

    # confidence panel: every cell, least confident on top (drawn last), colour bar 0-1
    points = _collection(conf_ax, "cells")
    conf = adata.obs[f"{KEY}_confidence"].to_numpy()
    order = np.argsort(-conf, kind="stable")
    np.testing.assert_allclose(points.get_array(), conf[order])
    np.testing.assert_allclose(points.get_offsets(), umap[order])
    assert points.get_clim() == (0.0, 1.0)
    rings = _collection(conf_ax, "rejected")
    assert len(rings.get_offsets()) == adata.obs[f"{KEY}_rejected"].sum()


def test_embedding_confidence_needs_the_umap_of_tl_embedding(annotated):
    adata = annotated
    del adata.obsm[f"X_{KEY}_umap"]
    before = adata.copy()
    with pytest.raises(
        KeyError, match=r"obsm has no 'X_lt_umap'.*`lt\.tl\.embedding\(adata, 'lt'\)`"
    ):
        lt.pl.embedding_confidence(adata, KEY)
    assert_equal(adata, before)
    # the tool writes what the plot reads (gaussian connectivities: no numba compilation)
    lt.tl.embedding(adata, KEY, neighbors_kwargs={"method": "gauss"})
    axes = lt.pl.embedding_confidence(adata, KEY, show_labels=False)
    conf = adata.obs[f"{KEY}_confidence"].to_numpy()
    np.testing.assert_allclose(
        _collection(axes[0], "cells").get_offsets(),
        adata.obsm[f"X_{KEY}_umap"][np.argsort(-conf, kind="stable")],
    )


def test_embedding_confidence_basis_mask_and_groups(annotated, tmp_path):
    adata = annotated
    rng = np.random.default_rng(1)
    adata.obsm["X_umap"] = rng.normal(size=(adata.n_obs, 2))
    query = (adata.obs["lt_role"] == "query").to_numpy()
    path = tmp_path / "confidence.png"

    axes = lt.pl.embedding_confidence(
        adata,
        KEY,
        basis="umap",
        show_labels=False,
        mask=adata.obs["lt_role"] == "query",
        save=path,
    )
    assert path.stat().st_size > 1000
    assert len(axes) == 1
    ax = axes[0]
    assert ax.get_xlabel() == "UMAP1"
    conf = adata.obs[f"{KEY}_confidence"].to_numpy()
    idx = np.flatnonzero(query)
    idx = idx[np.argsort(-conf[idx], kind="stable")]
    points = _collection(ax, "cells")
    np.testing.assert_allclose(points.get_offsets(), adata.obsm["X_umap"][idx])
    np.testing.assert_allclose(points.get_array(), conf[idx])
    assert len(_collection(ax, "other cells").get_offsets()) == (~query).sum()
    rejected = adata.obs[f"{KEY}_rejected"].to_numpy()
    assert len(_collection(ax, "rejected").get_offsets()) == (rejected & query).sum()

    # groups restrict both panels to those calls, in given axes
    fig, given = plt.subplots(1, 2)
    out = lt.pl.embedding_confidence(
        adata, KEY, basis="X_umap", groups=["A", "novel_0"], background=False, ax=given
    )
    assert out == list(given)
    chosen = adata.obs[KEY].isin(["A", "novel_0"]).to_numpy()
    for panel in out:
        assert len(_collection(panel, "cells").get_offsets()) == chosen.sum()
        assert not [c for c in panel.collections if c.get_label() == "other cells"]


def test_embedding_confidence_errors(annotated):
    adata = annotated
    with pytest.raises(KeyError, match=r"annotate\(adata, key_added='other'\)"):
        lt.pl.embedding_confidence(adata, "other")
    no_rejected = adata.copy()
    del no_rejected.obs[f"{KEY}_rejected"]
    with pytest.raises(KeyError, match="lt_rejected"):
        lt.pl.embedding_confidence(no_rejected, KEY, basis=f"X_{KEY}")
    lt.pl.embedding_confidence(no_rejected, KEY, basis=f"X_{KEY}", show_rejected=False)
    with pytest.raises(KeyError, match=r"basis 'pca' is not a key.*lt\.tl\.embedding"):
        lt.pl.embedding_confidence(adata, KEY, basis="pca")
    with pytest.raises(ValueError, match="No cell to colour"):
        lt.pl.embedding_confidence(adata, KEY, basis=f"X_{KEY}", mask=np.zeros(adata.n_obs, bool))
    with pytest.raises(ValueError, match="one flag per cell"):
        lt.pl.embedding_confidence(adata, KEY, basis=f"X_{KEY}", mask=[True, False])
    with pytest.raises(ValueError, match=r"groups \['D'\]"):
        lt.pl.embedding_confidence(adata, KEY, basis=f"X_{KEY}", groups=["D"])
    _, one = plt.subplots()
    with pytest.raises(ValueError, match="ax must hold 2 axes"):
        lt.pl.embedding_confidence(adata, KEY, basis=f"X_{KEY}", ax=one)
    flat = adata.copy()
    flat.obsm["X_line"] = np.zeros((adata.n_obs, 1))
    with pytest.raises(ValueError, match="at least 2 columns"):
        lt.pl.embedding_confidence(flat, KEY, basis="line")


# ------------------------------------------------------------------------ marker_dotplot
GROUPS = ["T", "B", "Mono"]


@pytest.fixture
def expression() -> tuple[ad.AnnData, pd.DataFrame]:
    """Counts of 3 types with planted markers, their calls, and a marker_genes-like table."""
    rng = np.random.default_rng(0)
    n_per, n_genes = 40, 30
    genes = [f"g{i}" for i in range(n_genes)]
    rate = np.full((3, n_genes), 0.4)
    for t in range(3):
        rate[t, 10 * t : 10 * t + 6] = np.linspace(6.0, 1.0, 6)
    counts = np.vstack([rng.poisson(rate[t], (n_per, n_genes)) for t in range(3)])
    counts[0, :] += 1  # no empty cell
    adata = ad.AnnData(sparse.csr_matrix(counts.astype(np.float32)))
    adata.var_names = genes
    adata.obs_names = [f"c{i}" for i in range(len(counts))]
    calls = np.repeat(GROUPS, n_per).astype(object)
    calls[[0, 50, 90]] = "Unassigned"
    adata.obs[KEY] = pd.Categorical(calls, categories=[*GROUPS, "Unassigned"])
    adata.obs["cell_type"] = pd.Categorical(np.repeat(GROUPS, n_per))
    # ranks deliberately not in gene order; "g2" is also a (weak) marker of B
    ranking = {
        "T": ["g3", "g0", "g5", "g1", "g4", "g2"],
        "B": ["g11", "g15", "g10", "g2", "g12"],
        "Mono": ["g24", "g20", "g22", "g21"],
    }
    rows = [
        {
            "group": g,
            "target": g,
            "rank": r + 1,
            "gene": gene,
            "attribution": 1.0 / (r + 1) + (g == "T"),
        }
        for g, genes_g in ranking.items()
        for r, gene in enumerate(genes_g)
    ]
    table = pd.DataFrame(rows, columns=["group", "target", "rank", "gene", "attribution"])
    adata.uns[KEY] = {
        "method": "SCNYM",
        "markers": {c: table[c].tolist() for c in table.columns},
    }
    return adata, table


def _ticks(labels) -> list[str]:
    return [t.get_text() for t in labels]


def _dots(ax):
    """Column, row, area and RGBA colour of each drawn dot (centres at index + 0.5)."""
    coll = ax.collections[0]
    xy = np.asarray(coll.get_offsets())
    x, y = np.floor(xy[:, 0]).astype(int), np.floor(xy[:, 1]).astype(int)
    return x, y, coll.get_sizes(), coll.get_facecolors()


def _figure_texts(ax) -> list[str]:
    """Texts of every axes of the figure (scanpy puts the brackets in an axes of their own)."""
    return [t.get_text() for a in ax.figure.axes for t in a.texts]


def _titles(ax) -> list[str]:
    return [a.get_title() for a in ax.figure.axes if a.get_title()]


def _shaded(ax) -> list[tuple[float, float, float, float]]:
    return [
        (p.get_x(), p.get_y(), p.get_width(), p.get_height())
        for p in ax.patches
        if isinstance(p, Rectangle)
    ]


def test_marker_dotplot_from_uns(expression, tmp_path):
    adata, table = expression
    before = adata.copy()
    path = tmp_path / "dotplot.png"
    ax = lt.pl.marker_dotplot(adata, KEY, n_genes=3, largest_dot=100.0, save=path)
    assert path.stat().st_size > 1000
    assert_equal(adata, before)  # pl only draws
    # genes in marker-ranking order, one block per group in table order
    columns = ["g3", "g0", "g5", "g11", "g15", "g10", "g24", "g20", "g22"]
    assert _ticks(ax.get_xticklabels()) == columns
    rows = [*GROUPS, "Unassigned"]
    assert _ticks(ax.get_yticklabels()) == rows
    assert _figure_texts(ax) == GROUPS  # the bracket labels
    assert ax.get_ylabel() == KEY
    # the title, then the titles of the two legends
    assert _titles(ax) == [
        f"Top 3 marker genes per type ({KEY})",
        "cells expressing (%)",
        "mean log1p CPM",
    ]
    # each group's own block is shaded in its row: columns 0-2 of T, 3-5 of B, 6-8 of Mono
    assert _shaded(ax) == [(0, 0, 3, 1.0), (3, 1, 3, 1.0), (6, 2, 3, 1.0)]

    # independent reference: scanpy's log1p CPM, fraction of cells with a count
    norm = adata.copy()
    sc.pp.normalize_total(norm, target_sum=1e6)
    sc.pp.log1p(norm)
    logcpm = norm[:, columns].X.toarray()
    counts = adata[:, columns].X.toarray()
    calls = adata.obs[KEY].astype(str).to_numpy()
    mean = np.array([logcpm[calls == r].mean(axis=0) for r in rows])
    frac = np.array([(counts[calls == r] > 0).mean(axis=0) for r in rows])

    # the DotPlot holds these frames ...
    dotplot = lt.pl.marker_dotplot(adata, KEY, n_genes=3, largest_dot=100.0, return_fig=True)
    assert isinstance(dotplot, sc.pl.DotPlot)
    for frame, expected in [(dotplot.dot_color_df, mean), (dotplot.dot_size_df, frac)]:
        assert list(frame.index) == rows
        assert list(frame.columns) == columns
        np.testing.assert_allclose(frame.to_numpy(), expected, rtol=1e-5)
    # ... and draws them: area = 100 x fraction, colour = Reds over [0, max mean]
    x, y, sizes, colors = _dots(ax)
    assert len(x) == len(rows) * len(columns)
    np.testing.assert_allclose(sizes, 100.0 * frac[y, x], rtol=1e-6)
    scale = Normalize(0.0, mean.max())
    np.testing.assert_allclose(colors, matplotlib.colormaps["Reds"](scale(mean[y, x])))
    # each marker is most expressed in its own type (rows 0-2; "Unassigned" has 3 cells)
    for col in range(len(columns)):
        assert np.argmax(mean[: len(GROUPS), col]) == col // 3


def test_marker_dotplot_returns_a_restylable_dotplot(expression, tmp_path):
    adata, _ = expression
    dotplot = lt.pl.marker_dotplot(adata, KEY, n_genes=2, cmap="Blues", return_fig=True)
    assert dotplot.fig is None  # not drawn yet
    dotplot.swap_axes().legend(colorbar_title="log1p CPM").savefig(tmp_path / "swapped.png")
    ax = dotplot.get_axes()["mainplot_ax"]
    # genes down, groups across; the shading follows
    assert _ticks(ax.get_yticklabels()) == ["g3", "g0", "g11", "g15", "g24", "g20"]
    assert _ticks(ax.get_xticklabels()) == [*GROUPS, "Unassigned"]
    assert ax.get_xlabel() == KEY
    assert _shaded(ax) == [(0, 0, 1.0, 2), (1, 2, 1.0, 2), (2, 4, 1.0, 2)]
    assert (tmp_path / "swapped.png").stat().st_size > 1000
    with pytest.raises(ValueError, match=r"call `\.savefig\(path\)` on the returned DotPlot"):
        lt.pl.marker_dotplot(adata, KEY, return_fig=True, save=tmp_path / "x.png")


def test_marker_dotplot_table_groupby_and_roundtrip(expression, tmp_path):
    adata, table = expression
    # a table without rank is ranked by attribution; groupby the true types; given axes
    fig, given = plt.subplots()
    shuffled = table.drop(columns="rank").sample(frac=1.0, random_state=0)
    ax = lt.pl.marker_dotplot(
        shuffled, KEY, n_genes=2, adata=adata, groupby="cell_type", groups=["Mono", "T"], ax=given
    )
    assert ax.figure is fig  # drawn in the area of `given`
    assert not given.axison
    assert _ticks(ax.get_xticklabels()) == ["g24", "g20", "g3", "g0"]
    assert _ticks(ax.get_yticklabels()) == ["Mono", "T", "B"]
    assert ax.get_ylabel() == "cell_type"
    # the markers survive a round trip through h5ad (lists become arrays)
    adata.write_h5ad(tmp_path / "markers.h5ad")
    back = ad.read_h5ad(tmp_path / "markers.h5ad")
    ax2 = lt.pl.marker_dotplot(back, KEY, n_genes=3)
    ax1 = lt.pl.marker_dotplot(adata, KEY, n_genes=3)
    for a, b in zip(_dots(ax1), _dots(ax2), strict=True):
        np.testing.assert_allclose(a, b)
    # log-normalised data are used as they are
    lognorm = adata.copy()
    sc.pp.normalize_total(lognorm, target_sum=1e4)
    sc.pp.log1p(lognorm)
    scaled = lt.pl.marker_dotplot(
        lognorm, KEY, n_genes=1, standard_scale="gene", return_fig=True
    ).dot_color_df
    np.testing.assert_allclose(scaled.min(axis=0), 0.0)
    np.testing.assert_allclose(scaled.max(axis=0), 1.0)


def test_marker_dotplot_attributions_only(expression):
    _, table = expression
    ax = lt.pl.marker_dotplot(table, KEY, n_genes=2, largest_dot=50.0)
    assert _ticks(ax.get_yticklabels()) == GROUPS
    columns = ["g3", "g0", "g11", "g15", "g24", "g20"]
    assert _ticks(ax.get_xticklabels()) == columns
    assert ax.get_ylabel() == ""
    lookup = table.set_index(["group", "gene"])["attribution"]
    expected = np.array([[lookup.get((g, c), np.nan) for c in columns] for g in GROUPS])
    color = lt.pl.marker_dotplot(table, KEY, n_genes=2, return_fig=True).dot_color_df
    np.testing.assert_allclose(color.to_numpy(), expected)  # NaN where a group has no value
    # only the known (group, gene) pairs get a visible dot: the six top genes
    x, y, sizes, _ = _dots(ax)
    shown = sizes > 0
    assert shown.sum() == 6
    attribution = expected[y[shown], x[shown]]
    np.testing.assert_allclose(sizes[shown], 50.0 * attribution / np.nanmax(expected))
    assert not any("attributed to" in t for t in _titles(ax))
    # a table of marker_genes(..., target="T") says which type the attributions explain
    towards_t = table.assign(target="T")
    ax = lt.pl.marker_dotplot(towards_t, KEY, n_genes=2)
    assert _titles(ax)[0].endswith("attributed to T")


def test_marker_dotplot_unassigned_with_markers_is_one_row(expression):
    adata, table = expression
    # e.g. a Wilcoxon ranking of every call, "Unassigned" included (as the scDET tutorial)
    extra = pd.DataFrame(
        {"group": "Unassigned", "target": "Unassigned", "rank": [1], "gene": ["g7"]}
    ).assign(attribution=0.5)
    ax = lt.pl.marker_dotplot(pd.concat([extra, table]), KEY, n_genes=1, adata=adata)
    assert _ticks(ax.get_yticklabels()) == ["Unassigned", *GROUPS]
    assert _ticks(ax.get_xticklabels()) == ["g7", "g3", "g11", "g24"]
    assert _shaded(ax)[0] == (0, 0, 1, 1.0)


def test_marker_dotplot_errors(expression):
    adata, table = expression
    bare = adata.copy()
    del bare.uns[KEY]["markers"]
    with pytest.raises(
        KeyError, match=r"marker_genes\(model, adata, groupby=\.\.\., key_added='lt'\)"
    ):
        lt.pl.marker_dotplot(bare, KEY)
    with pytest.raises(KeyError, match=r"no 'other' to group.*key_added='other'"):
        lt.pl.marker_dotplot(table, "other", adata=adata)
    with pytest.raises(KeyError, match="not in adata.var_names"):
        lt.pl.marker_dotplot(table, KEY, adata=adata[:, 5:].copy())
    with pytest.raises(ValueError, match="n_genes must be at least 1"):
        lt.pl.marker_dotplot(adata, KEY, n_genes=0)
    with pytest.raises(ValueError, match=r"groups \['NK'\] have no marker genes"):
        lt.pl.marker_dotplot(adata, KEY, groups=["NK"])
    with pytest.raises(KeyError, match="lacks the column"):
        lt.pl.marker_dotplot(table.drop(columns="attribution"), KEY)
    with pytest.raises(ValueError, match="only with a markers DataFrame"):
        lt.pl.marker_dotplot(adata, KEY, adata=adata)
