from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scvi
import torch

import labeltransfer as lt

KEY = "jind"


@pytest.fixture(scope="module")
def novel_pair():
    """Reference and a query with one planted novel type (``type_4``)."""
    return lt.data.synthetic(
        n_reference=800, n_query=600, n_genes=300, n_types=4, n_novel=1, batch_shift=0.3, seed=1
    )


@pytest.fixture(scope="module")
def brief_jind(novel_pair):
    """JIND trained briefly (5 epochs), enough for saliency."""
    scvi.settings.seed = 0
    ref = novel_pair[0].copy()
    lt.JIND.setup_anndata(ref, labels_key="cell_type")
    model = lt.JIND(ref, n_top_genes=200)
    model.train(max_epochs=5, enable_progress_bar=False, accelerator="cpu")
    return model


@pytest.fixture(scope="module")
def annotated_query(novel_pair):
    """Query annotated by a JIND model trained to convergence (30 epochs)."""
    scvi.settings.seed = 0
    ref, query = (a.copy() for a in novel_pair)
    lt.JIND.setup_anndata(ref, labels_key="cell_type")
    model = lt.JIND(ref, n_top_genes=200)
    model.train(max_epochs=30, enable_progress_bar=False, accelerator="cpu")
    # discover_novel groups the low-confidence cells itself: no novel groups from annotate
    model.annotate(query, key_added=KEY, novel=False)
    return query


# ------------------------------------------------------------ integrated gradients
def test_integrated_gradients_shape_and_completeness(brief_jind, novel_pair):
    model, query = brief_jind, novel_pair[1]
    attr = lt.tl.integrated_gradients(model, query, target="type_1", indices=[3, 0, 7], n_steps=50)
    genes = model.adata_manager.get_state_registry("X").column_names
    assert list(attr.columns) == list(genes[model.module.feature_idx.numpy()])
    assert list(attr.index) == list(query.obs_names[[3, 0, 7]])
    # completeness axiom: attributions sum to logit(x) - logit(baseline = 0)
    registered, _ = model._prepare(query[[3, 0, 7]].copy())
    x = torch.as_tensor(registered.X.toarray())
    module = model.module.eval()
    with torch.no_grad():
        inputs = module.transform(x)
        logit = module.classifier(module.encoder(inputs))[:, 1]
        zero = module.classifier(module.encoder(torch.zeros_like(inputs)))[:, 1]
    np.testing.assert_allclose(attr.sum(axis=1), (logit - zero).numpy(), rtol=0.05, atol=0.05)


def test_integrated_gradients_all_cells_and_baseline(brief_jind, novel_pair):
    query = novel_pair[1][:40].copy()
    attr = lt.tl.integrated_gradients(brief_jind, query, target="type_0", n_steps=10)
    assert attr.shape == (40, 200)
    assert np.isfinite(attr.to_numpy()).all()
    same = lt.tl.integrated_gradients(
        brief_jind, query, target="type_0", n_steps=10, baseline=0.0, batch_size=16
    )
    np.testing.assert_allclose(attr, same, rtol=1e-4, atol=1e-6)
    # a non-zero baseline changes the attributions
    other = lt.tl.integrated_gradients(brief_jind, query, target="type_0", n_steps=10, baseline=1)
    assert not np.allclose(attr, other)


def test_integrated_gradients_errors(brief_jind, novel_pair):
    query = novel_pair[1]
    with pytest.raises(ValueError, match="not a reference cell type"):
        lt.tl.integrated_gradients(brief_jind, query, target="type_4")
    with pytest.raises(ValueError, match="baseline"):
        lt.tl.integrated_gradients(brief_jind, query, target="type_0", baseline="mean")

    class Fake:
        module = torch.nn.Linear(2, 2)

    with pytest.raises(TypeError, match="encoder"):
        lt.tl.integrated_gradients(Fake(), query, target="type_0")


@pytest.mark.filterwarnings("ignore:Category .* has fewer than 3 cells")
def test_integrated_gradients_scnym(novel_pair):
    scvi.settings.seed = 0
    ref = novel_pair[0][:300].copy()
    lt.SCNYM.setup_anndata(ref, labels_key="cell_type")
    model = lt.SCNYM(ref, n_top_genes=100)
    model.train(max_epochs=2, enable_progress_bar=False, accelerator="cpu")
    attr = lt.tl.integrated_gradients(model, ref, target="type_2", indices=range(5), n_steps=20)
    assert attr.shape == (5, 100)
    registered, _ = model._prepare(ref[:5].copy())
    module = model.module.eval()
    with torch.no_grad():
        logits = module.inference(torch.as_tensor(registered.X.toarray()))["logits"][:, 2]
        inputs = torch.zeros((5, 100))
        zero = module.classifier(module.embedder(inputs))[:, 2]
    np.testing.assert_allclose(attr.sum(axis=1), (logits - zero).numpy(), rtol=0.05, atol=0.05)


# ------------------------------------------------------------------- marker genes
def test_marker_genes_recover_planted_markers(brief_jind, novel_pair, tmp_path):
    ref = novel_pair[0].copy()
    ref.uns["scores"] = {}
    # fewer cells and steps than the defaults (300, 100) keep the test fast
    table = lt.tl.marker_genes(
        brief_jind, ref, groupby="cell_type", n_cells=150, n_steps=50, key_added="scores"
    )
    assert list(table.columns) == ["group", "target", "rank", "gene", "attribution"]
    assert sorted(table["group"].unique()) == brief_jind.cell_types
    assert (table["group"] == table["target"]).all()
    for group, rows in table.groupby("group"):
        assert list(rows["rank"]) == list(range(1, 21))
        assert rows["attribution"].is_monotonic_decreasing
        assert np.isin(rows["gene"], ref.uns["markers"][group]).mean() >= 0.5, group
    stored = pd.DataFrame(ref.uns["scores"]["markers"])
    pd.testing.assert_frame_equal(stored, table, check_dtype=False)
    ref.write_h5ad(tmp_path / "markers.h5ad")
    back = ad.read_h5ad(tmp_path / "markers.h5ad")
    assert list(back.uns["scores"]["markers"]["gene"]) == list(table["gene"])


def test_marker_genes_towards_one_target_explains_other_groups(brief_jind, novel_pair):
    """ "Why were these cells called type_0?": every group, even a non-reference one."""
    query = novel_pair[1]
    table = lt.tl.marker_genes(
        brief_jind, query, groupby="cell_type", target="type_0", n_cells=30, n_top=5, n_steps=20
    )
    assert set(table["group"]) == set(query.obs["cell_type"].astype(str))  # type_4 included
    assert (table["target"] == "type_0").all()
    own = lt.tl.marker_genes(
        brief_jind, query, groupby="cell_type", n_cells=30, n_top=5, n_steps=20
    )
    same = table[table["group"] == "type_0"].reset_index(drop=True)
    pd.testing.assert_frame_equal(same, own[own["group"] == "type_0"].reset_index(drop=True))
    # towards type_0, another type's own markers are not what drives the logit
    other = set(table.loc[table["group"] == "type_1", "gene"])
    assert other != set(own.loc[own["group"] == "type_1", "gene"])
    with pytest.raises(ValueError, match="not a reference cell type"):
        lt.tl.marker_genes(brief_jind, query, groupby="cell_type", target="type_4")


def test_marker_genes_skips_unknown_groups_and_checks_keys(brief_jind, novel_pair):
    query = novel_pair[1]
    table = lt.tl.marker_genes(
        brief_jind, query, groupby="cell_type", n_cells=20, n_top=5, n_steps=10
    )
    assert "type_4" not in set(table["group"])  # the novel type is no reference type
    assert len(table) == 4 * 5
    with pytest.raises(KeyError, match="missing_column"):
        lt.tl.marker_genes(brief_jind, query, groupby="missing_column")
    with pytest.raises(KeyError, match="annotate"):
        lt.tl.marker_genes(brief_jind, query, groupby="cell_type", key_added="nothing")


# ----------------------------------------------------------------- discover novel
def test_discover_novel_finds_planted_type(annotated_query, tmp_path):
    query = annotated_query.copy()
    before = query.obs[KEY].copy()
    summary = lt.tl.discover_novel(query, key=KEY, confidence=0.99)
    assert len(summary) >= 1
    assert list(summary.columns) == ["n_cells", "mean_confidence", "top_prediction"]
    assert all(name.startswith("novel_") for name in summary.index)
    is_novel = query.obs["cell_type"] == "type_4"
    called = query.obs[KEY].astype(str).str.startswith("novel_")
    assert (called & is_novel).sum() >= 0.7 * is_novel.sum()
    assert (called & is_novel).sum() >= 0.8 * called.sum()
    assert summary["n_cells"].sum() == called.sum()
    assert (summary["n_cells"] >= 10).all()
    # cells outside the new groups keep their calls
    pd.testing.assert_series_equal(
        query.obs.loc[~called, KEY].astype(str), before[~called].astype(str)
    )
    info = query.uns[KEY]["novel"]
    assert info["resolution"] in (0.1, 0.2, 0.3, 0.5, 1.0)
    assert info["calinski_harabasz"] == max(
        s for s in info["scan"]["calinski_harabasz"] if not np.isnan(s)
    )
    assert info["groups"]["group"] == list(summary.index)
    query.write_h5ad(tmp_path / "novel.h5ad")
    back = ad.read_h5ad(tmp_path / "novel.h5ad")
    assert list(back.uns[KEY]["novel"]["groups"]["n_cells"]) == list(summary["n_cells"])


def _toy(n_boundary: int = 8) -> ad.AnnData:
    """Two confident clusters A and B, low-confidence cells inside A, a low-confidence blob."""
    rng = np.random.default_rng(0)
    a = rng.normal(0, 0.3, (200, 2))
    b = rng.normal((10, 0), 0.3, (200, 2))
    inside = rng.normal(0, 0.3, (n_boundary, 2))
    blob = rng.normal((0, 10), 0.3, (60, 2))
    z = np.vstack([a, b, inside, blob]).astype(np.float32)
    prediction = ["A"] * 200 + ["B"] * 200 + ["A"] * n_boundary + ["B"] * 60
    confidence = np.r_[np.full(400, 0.95), np.full(n_boundary, 0.3), np.full(60, 0.35)]
    adata = ad.AnnData(obs=pd.DataFrame(index=[f"c{i}" for i in range(len(z))]))
    adata.obs["toy"] = pd.Categorical(prediction)
    adata.obs["toy_prediction"] = pd.Categorical(prediction)
    adata.obs["toy_confidence"] = confidence
    adata.obsm["X_toy"] = z
    adata.uns["toy"] = {}
    return adata


def test_discover_novel_keeps_boundary_cells():
    adata = _toy()
    summary = lt.tl.discover_novel(adata, key="toy", min_cells=5)
    labels = adata.obs["toy"].astype(str).to_numpy()
    assert (labels[400:408] == "A").all()  # boundary cells keep their reference call
    assert set(labels[408:]) <= set(summary.index)
    assert summary["n_cells"].sum() == 60
    assert adata.uns["toy"]["novel"]["n_boundary"] == 8
    assert adata.uns["toy"]["novel"]["n_low_confidence"] == 68
    assert (labels[:400] == np.array(["A"] * 200 + ["B"] * 200)).all()


def test_discover_novel_numbers_after_existing_groups():
    adata = _toy()
    existing = adata.obs["toy"].cat.add_categories(["novel_0", "novel_1"]).to_numpy().copy()
    existing[:5] = "novel_1"  # groups an earlier annotate formed
    adata.obs["toy"] = pd.Categorical(existing)
    summary = lt.tl.discover_novel(adata, key="toy", min_cells=5)
    assert list(summary.index) == [f"novel_{2 + i}" for i in range(len(summary))]
    labels = adata.obs["toy"].astype(str).to_numpy()
    assert (labels[:5] == "novel_1").all()
    assert set(labels[408:]) == set(summary.index)


def test_discover_novel_small_groups_and_errors():
    adata = _toy()
    summary = lt.tl.discover_novel(adata, key="toy", min_cells=100)
    assert summary.empty
    assert not adata.obs["toy"].astype(str).str.startswith("novel_").any()
    # nothing below the threshold
    none = lt.tl.discover_novel(_toy(), key="toy", confidence=0.1)
    assert none.empty
    with pytest.raises(KeyError, match="annotate"):
        lt.tl.discover_novel(_toy(), key="other")


def test_tl_import_is_light():
    import subprocess
    import sys

    code = "import sys, labeltransfer; print('torch' in sys.modules or 'scvi' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
