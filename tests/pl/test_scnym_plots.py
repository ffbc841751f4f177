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
from matplotlib.colors import to_rgba
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
    adata.uns[KEY] = {"method": "SCNYM"}
    return adata


def test_embedding_confidence_computes_and_keeps_user_keys(annotated, monkeypatch):
    adata = annotated
    user_umap = np.arange(adata.n_obs * 2, dtype=float).reshape(-1, 2)
    user_graph = sparse.identity(adata.n_obs, format="csr")
    adata.obsm["X_umap"] = user_umap.copy()
    adata.obsp["connectivities"] = user_graph.copy()
    adata.uns["neighbors"] = {"params": {"mine": True}}

    # gaussian connectivities skip numba's ~10 s compilation of UMAP's fuzzy simplicial set
    axes = lt.pl.embedding_confidence(adata, KEY, neighbors_kwargs={"method": "gauss"})

    # the UMAP of the model's embedding is stored under the documented keys
    umap = adata.obsm[f"X_{KEY}_umap"]
    assert umap.shape == (adata.n_obs, 2)
    assert np.isfinite(umap).all()
    assert f"{KEY}_neighbors_connectivities" in adata.obsp
    params = adata.uns[f"{KEY}_neighbors"]["params"]
    assert (params["use_rep"], params["method"], params["n_neighbors"]) == ("X_lt", "gauss", 15)
    assert f"X_{KEY}_umap" in adata.uns  # the UMAP parameters
    # ... and the user's scanpy fields and the annotation's uns entry are untouched
    np.testing.assert_array_equal(adata.obsm["X_umap"], user_umap)
    assert (adata.obsp["connectivities"] != user_graph).nnz == 0
    assert adata.uns["neighbors"] == {"params": {"mine": True}}
    assert adata.uns[KEY] == {"method": "SCNYM"}

    labels_ax, conf_ax = axes
    assert labels_ax.get_title() == f"Final call ({KEY})"
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
    np.testing.assert_allclose(points.get_array(), np.sort(conf)[::-1])
    assert points.get_clim() == (0.0, 1.0)
    rings = _collection(conf_ax, "rejected")
    assert len(rings.get_offsets()) == adata.obs[f"{KEY}_rejected"].sum()

    # a second call reuses the stored UMAP instead of recomputing it
    def _fail(*args, **kwargs):
        raise AssertionError("the stored UMAP should be reused")

    monkeypatch.setattr(sc.pp, "neighbors", _fail)
    again = lt.pl.embedding_confidence(adata, KEY, show_labels=False)
    np.testing.assert_allclose(
        _collection(again[0], "cells").get_offsets().min(axis=0), umap.min(axis=0)
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
    assert f"X_{KEY}_umap" not in adata.obsm  # nothing computed with basis=

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
    no_embedding = adata.copy()
    del no_embedding.obsm[f"X_{KEY}"]
    with pytest.raises(KeyError, match=r"obsm has no 'X_lt'.*key_added='lt'"):
        lt.pl.embedding_confidence(no_embedding, KEY)
    no_rejected = adata.copy()
    del no_rejected.obs[f"{KEY}_rejected"]
    with pytest.raises(KeyError, match="lt_rejected"):
        lt.pl.embedding_confidence(no_rejected, KEY, basis=f"X_{KEY}")
    lt.pl.embedding_confidence(no_rejected, KEY, basis=f"X_{KEY}", show_rejected=False)
    with pytest.raises(KeyError, match="basis 'pca' is not a key"):
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
    nan = adata.copy()
    nan.obsm[f"X_{KEY}"][3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        lt.pl.embedding_confidence(nan, KEY)
    with pytest.raises(ValueError, match=r"cannot set \['use_rep'\]"):
        lt.pl.embedding_confidence(adata, KEY, neighbors_kwargs={"use_rep": "X_pca"})


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
    coll = ax.collections[0]
    xy = np.asarray(coll.get_offsets())
    return xy[:, 0].astype(int), xy[:, 1].astype(int), coll.get_sizes(), coll.get_array()


def test_marker_dotplot_from_uns(expression, tmp_path):
    adata, table = expression
    path = tmp_path / "dotplot.png"
    ax = lt.pl.marker_dotplot(adata, KEY, n_genes=3, largest_dot=100.0, save=path)
    assert path.stat().st_size > 1000
    # genes in marker-ranking order, one block per group in table order
    columns = ["g3", "g0", "g5", "g11", "g15", "g10", "g24", "g20", "g22"]
    assert _ticks(ax.get_xticklabels()) == columns
    rows = [*GROUPS, "Unassigned"]
    assert _ticks(ax.get_yticklabels()) == rows
    brackets = [t.get_text() for t in ax.texts]
    assert brackets == GROUPS

    # independent reference: scanpy's log1p CPM, fraction of cells with a count
    norm = adata.copy()
    sc.pp.normalize_total(norm, target_sum=1e6)
    sc.pp.log1p(norm)
    logcpm = norm[:, columns].X.toarray()
    counts = adata[:, columns].X.toarray()
    calls = adata.obs[KEY].astype(str).to_numpy()
    x, y, sizes, colors = _dots(ax)
    assert len(x) == len(rows) * len(columns)
    for xi, yi, size, color in zip(x, y, sizes, colors, strict=True):
        cells = calls == rows[yi]
        assert size == pytest.approx(100.0 * (counts[cells, xi] > 0).mean())
        assert color == pytest.approx(logcpm[cells, xi].mean(), rel=1e-5)
    # each marker is most expressed in its own type (rows 0-2; "Unassigned" has 3 cells)
    typed = y < len(GROUPS)
    for col in range(len(columns)):
        at = typed & (x == col)
        assert y[at][np.argmax(colors[at])] == col // 3


def test_marker_dotplot_table_groupby_and_roundtrip(expression, tmp_path):
    adata, table = expression
    # a table without rank is ranked by attribution; groupby the true types; given axes
    _, given = plt.subplots()
    shuffled = table.drop(columns="rank").sample(frac=1.0, random_state=0)
    ax = lt.pl.marker_dotplot(
        shuffled, KEY, n_genes=2, adata=adata, groupby="cell_type", groups=["Mono", "T"], ax=given
    )
    assert ax is given
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
    ax3 = lt.pl.marker_dotplot(lognorm, KEY, n_genes=1, standard_scale="gene")
    colors = _dots(ax3)[3]
    assert colors.min() == 0.0
    assert colors.max() == 1.0


def test_marker_dotplot_attributions_only(expression):
    _, table = expression
    ax = lt.pl.marker_dotplot(table, KEY, n_genes=2, largest_dot=50.0)
    assert _ticks(ax.get_yticklabels()) == GROUPS
    assert _ticks(ax.get_xticklabels()) == ["g3", "g0", "g11", "g15", "g24", "g20"]
    x, y, sizes, colors = _dots(ax)
    lookup = table.set_index(["group", "gene"])["attribution"]
    columns = _ticks(ax.get_xticklabels())
    expected = [lookup[(GROUPS[yi], columns[xi])] for xi, yi in zip(x, y, strict=True)]
    np.testing.assert_allclose(colors, expected)
    # only the known (group, gene) pairs get a dot: the six top genes
    assert len(x) == 6
    np.testing.assert_allclose(sizes, 50.0 * np.abs(expected) / np.max(np.abs(expected)))
    assert "attributed to" not in ax.get_title()
    # a table of marker_genes(..., target="T") says which type the attributions explain
    towards_t = table.assign(target="T")
    ax = lt.pl.marker_dotplot(towards_t, KEY, n_genes=2)
    assert ax.get_title().endswith("attributed to T")


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
