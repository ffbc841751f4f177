from __future__ import annotations

import gc
import warnings
import weakref

import mudata as md
import numpy as np
import pandas as pd
import pytest
import scvi
import torch
from scipy import sparse

import labeltransfer as lt
from labeltransfer._constants import UNASSIGNED
from labeltransfer.cellpredx import PRESETS, CellPredXLossConfig, CellPredXTrainingPlan
from labeltransfer.cellpredx._data import NeighbourQueryLoader

from .conftest import EPOCHS, make_mudata

KEY = "cellpredx"


def _truth(atac) -> np.ndarray:
    return atac.obs["cell_type"].astype(str).to_numpy()


def test_unpaired_rna_to_atac_through_setup_mudata(trained_unpaired, unpaired_pair):
    model, mdata = trained_unpaired
    assert model.preset_ == "rna_atac_unmatched"
    assert model.loss_weights_["cl_weight"] == 1.2
    record = model.mudata_setup_
    assert record["paired"] is False
    assert record["gene_activity_source"] == "built"
    assert "gene_activity" in mdata.mod  # built from the peaks and added to the MuData
    assert len(record["genes"]) == model.adata.n_vars > 250
    # reference = the 600 labelled RNA cells, query = the 600 ATAC cells
    assert model.adata.n_obs == 1200
    assert (model.adata.obs["modality"] == "atac").sum() == 600
    pred = model.predict(mdata)
    assert (pred == _truth(unpaired_pair[1])).mean() >= 0.85


def test_annotate_mudata_writes_the_documented_fields(trained_unpaired, unpaired_pair, tmp_path):
    model, _ = trained_unpaired
    mdata = make_mudata(*unpaired_pair)  # no gene-activity modality: rebuilt from the peaks
    atac_obs, rna_obs = set(mdata["atac"].obs), set(mdata["rna"].obs)
    atac_obsm, global_obs = set(mdata["atac"].obsm), set(mdata.obs)
    assert model.annotate(mdata) is None
    atac = mdata["atac"]
    written = {
        KEY,
        f"{KEY}_prediction",
        f"{KEY}_confidence",
        f"{KEY}_rejected",
        f"{KEY}_novelty",
    }
    assert set(atac.obs) - atac_obs == written
    assert set(atac.obsm) - atac_obsm == {f"{KEY}_probabilities", f"X_{KEY}"}
    assert KEY in atac.uns
    assert KEY in mdata.uns
    assert set(mdata["rna"].obs) == rna_obs  # the reference modality is untouched
    assert set(mdata.obs) - global_obs == written
    assert "gene_activity" not in mdata.mod  # annotate does not add modalities

    types = model.cell_types
    categories = list(atac.obs[KEY].cat.categories)
    novel = [c for c in categories if c.startswith("novel_")]  # groups of uncovered cells
    assert categories == [*types, *novel, UNASSIGNED]
    probs = atac.obsm[f"{KEY}_probabilities"]
    assert list(probs.columns) == types
    assert (probs.index == atac.obs_names).all()
    np.testing.assert_allclose(probs.max(axis=1), atac.obs[f"{KEY}_confidence"], rtol=1e-6)
    assert atac.obsm[f"X_{KEY}"].shape == (atac.n_obs, 64)
    rejected = atac.obs[f"{KEY}_rejected"].to_numpy()
    calls = atac.obs[KEY].astype(str)
    assert (calls[rejected].isin([UNASSIGNED, *novel])).all()
    assert (calls[~rejected] == atac.obs[f"{KEY}_prediction"].astype(str)[~rejected]).all()
    assert atac.uns[KEY]["rejection"]["rule"] == "openset"
    assert atac.uns[KEY]["rejection"]["paper"] == 0.95
    # the paper's rule: confidence < 0.95
    paper = model.annotate(mdata, key_added="paper", rejection="paper", copy=True)["atac"]
    confidence = paper.obs["paper_confidence"].to_numpy()
    np.testing.assert_array_equal(paper.obs["paper_rejected"], confidence < 0.95)
    assert paper.uns["paper"]["rejection"] == {"rule": "global", "threshold": 0.95}
    assert atac.uns[KEY]["method"] == "CellPredX"
    assert atac.uns[KEY]["preset"] == "rna_atac_unmatched"
    assert atac.uns[KEY]["mudata"]["paired"] is False

    # global obs: ATAC cells carry the calls, RNA-only cells missing values
    on_atac = mdata.obs.loc[atac.obs_names]
    np.testing.assert_array_equal(on_atac[KEY].astype(str), atac.obs[KEY].astype(str))
    on_rna = mdata.obs.loc[mdata["rna"].obs_names]
    assert on_rna[KEY].isna().all()
    assert on_rna[f"{KEY}_confidence"].isna().all()
    assert mdata.obs[f"{KEY}_rejected"].dtype == "boolean"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mdata.write(tmp_path / "annotated.h5mu")
        back = md.read_h5mu(tmp_path / "annotated.h5mu")
    np.testing.assert_array_equal(back["atac"].obs[KEY].astype(str), atac.obs[KEY].astype(str))

    # rejection=None keeps every call, and skips the coverage test: the novelty score of the
    # earlier annotation under the same key goes, from the modality and the global obs
    assert f"{KEY}_novelty" in mdata["atac"].obs
    with pytest.warns(UserWarning, match="Overwriting the previous annotation"):
        model.annotate(mdata, key_added=KEY, rejection=None)
    assert not mdata["atac"].obs[f"{KEY}_rejected"].any()
    assert f"{KEY}_novelty" not in mdata["atac"].obs
    assert f"{KEY}_novelty" not in mdata.obs


def test_paired_mudata_uses_the_matched_preset():
    scvi.settings.seed = 0
    mdata = lt.data.synthetic_multiome(
        n_cells=500, n_genes=300, n_background_peaks=300, paired=True, seed=3
    )
    lt.CellPredX.setup_mudata(
        mdata,
        labels_key="cell_type",
        modalities={"rna_layer": "rna", "atac_layer": "atac"},
    )
    model = lt.CellPredX(mdata)
    assert model.preset_ == "rna_atac_matched"
    assert model.mudata_setup_["paired"] is True
    # each cell is a reference (RNA) and a query (ATAC gene activity) cell
    assert model.adata.n_obs == 1000
    model.train(max_epochs=EPOCHS, enable_progress_bar=False, accelerator="cpu")
    out = model.annotate(mdata, copy=True)
    truth = mdata["atac"].obs["cell_type"].astype(str).to_numpy()
    assert (out["atac"].obs[f"{KEY}_prediction"].astype(str).to_numpy() == truth).mean() >= 0.85
    assert out.obs[f"{KEY}_rejected"].dtype == bool  # every cell has an ATAC profile
    assert KEY not in mdata["atac"].obs  # copy=True leaves the input alone


def test_setup_mudata_reuses_a_gene_activity_modality(unpaired_pair):
    rna, atac = unpaired_pair
    mdata = make_mudata(rna, atac)
    lt.data.add_gene_activity(mdata, genes=rna)
    ga = mdata["gene_activity"]
    # without the peaks: the gene-activity modality is the query
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        only_ga = md.MuData({"rna": rna.copy(), "gene_activity": ga.copy()})
    lt.CellPredX.setup_mudata(only_ga, labels_key="cell_type")
    model = lt.CellPredX(only_ga)
    assert model.mudata_setup_["gene_activity_source"] == "reused"
    # the query's own labels are never used for training
    labels = model.adata.obs["cell_type"]
    assert (labels[model.adata.obs["modality"] == "atac"] == "Unknown").all()


def test_rna_to_rna_with_setup_anndata():
    scvi.settings.seed = 0
    ref, query = lt.data.synthetic(
        n_reference=500, n_query=400, n_genes=300, n_types=4, batch_shift=0.5, seed=1
    )
    adata = lt.data.concat_reference_query(ref, query, labels_key="cell_type", batch_key="batch")
    lt.CellPredX.setup_anndata(adata, labels_key="cell_type", batch_key="batch")
    model = lt.CellPredX(adata)
    assert model.preset_ == "rna_rna"
    assert model.loss_weights_["fa_weight"] == 0.0
    assert model.mudata_setup_ is None
    model.train(max_epochs=EPOCHS, batch_size=128, enable_progress_bar=False, accelerator="cpu")
    is_query = (adata.obs["lt_role"] == "query").to_numpy()
    truth = adata.obs["cell_type_original"].astype(str).to_numpy()[is_query]
    assert (model.predict()[is_query] == truth).mean() >= 0.9
    summary = model.training_summary_
    assert summary["n_query"] == 400
    assert summary["n_neighbors"] == 10
    assert summary["loss_weights"]["sc_weight"] == 0.01
    for name in ("train_contrastive_loss", "train_center_loss", "validation_center_loss"):
        assert np.isfinite(model.history[name].to_numpy(dtype=float)).all()
    with pytest.raises(TypeError, match="setup_anndata"):
        model.predict(
            make_mudata(*lt.data.synthetic_multiome(n_cells=20, n_genes=20, paired=False))
        )


@pytest.mark.parametrize(
    ("init", "plan_kwargs", "expected"),
    [({}, {}, 0.1), ({"sc_weight": 0.01}, {}, 0.01), ({}, {"sc_weight": 0.05}, 0.05)],
)
def test_reference_only_rna_model_keeps_the_papers_center_weight(init, plan_kwargs, expected):
    scvi.settings.seed = 0
    ref, _ = lt.data.synthetic(n_reference=200, n_query=10, n_genes=60, n_types=3, seed=2)
    lt.CellPredX.setup_anndata(ref, labels_key="cell_type")
    model = lt.CellPredX(ref, **init)
    assert model.loss_config.sc_weight == init.get("sc_weight", PRESETS["rna_rna"]["sc_weight"])
    model.train(max_epochs=2, plan_kwargs=plan_kwargs, enable_progress_bar=False)
    assert model.training_summary_["loss_weights"]["sc_weight"] == expected
    assert model.loss_weights_["sc_weight"] == expected
    assert model.loss_config.sc_weight == init.get("sc_weight", 0.01)  # the model's own stays


def test_no_query_statistics_for_the_attention_networks_batch_norm(
    trained_unpaired, unpaired_pair, monkeypatch
):
    """Inference skips the attention network, so its batch norm is nobody's domain statistic.

    It keeps what training left in it (not reset by a reference-statistics pass), and
    annotating a query computes no query statistics: the calls are the network's alone.
    """
    model, mdata = trained_unpaired
    norm = model.module.attention.context[1]
    assert isinstance(norm, torch.nn.BatchNorm1d)
    assert model.module.inference_norms() == []
    assert int(norm.num_batches_tracked) > 0  # the training's running statistics
    assert not torch.allclose(norm.running_var, torch.ones_like(norm.running_var))
    expected = model.predict(mdata)

    def refuse(*args, **kwargs):
        raise AssertionError("query statistics computed for CellPredX")

    monkeypatch.setattr(type(model), "_query_statistics", refuse)
    np.testing.assert_array_equal(model.predict(mdata), expected)


def test_query_batches_carry_a_knn_neighbour(trained_unpaired):
    model, _ = trained_unpaired
    seen = []
    loss = model.module.loss

    def recording(tensors, *args, query=None, **kwargs):
        if kwargs.get("config") is not None:  # training steps, not validation
            seen.append(query)
        return loss(tensors, *args, query=query, **kwargs)

    scvi.settings.seed = 0
    adata = model.adata.copy()
    lt.CellPredX.setup_anndata(adata, labels_key="cell_type")
    clone = lt.CellPredX(adata, preset="rna_atac_unmatched")
    clone.module.loss = recording
    clone.train(max_epochs=1, enable_progress_bar=False, accelerator="cpu")
    assert seen
    assert all("X_positive" in q for q in seen)
    assert all(q["X_positive"].shape == q["X"].shape for q in seen)
    assert sum(q["X"].shape[0] for q in seen) == 600


@pytest.mark.parametrize("load_sparse_tensor", [True, False])
def test_neighbour_loader_rows_follow_the_batch_order(trained_unpaired, load_sparse_tensor):
    """Query and neighbour rows come back in the requested order, sparse or dense."""
    model, _ = trained_unpaired
    X = model.adata.X
    positions = np.array([7, 3, 7, 0, 12])  # unsorted, with a repeat
    loader = NeighbourQueryLoader(
        model.adata_manager,
        np.arange(20),
        np.zeros((20, 2), dtype=int),
        batch_size=5,
        load_sparse_tensor=load_sparse_tensor,
    )
    fetched = loader._fetch(positions)["X"]
    assert fetched.layout == (torch.sparse_csr if load_sparse_tensor else torch.strided)
    expected = X[positions].toarray() if sparse.issparse(X) else np.asarray(X)[positions]
    np.testing.assert_array_equal(fetched.to_dense().numpy(), expected)


def test_knn_graph_is_not_saved(trained_unpaired, tmp_path):
    model, _ = trained_unpaired
    keys = list(model.module.state_dict())
    assert not [k for k in keys if "knn" in k.lower() or "neighbour" in k.lower()]
    model.save(tmp_path / "model")
    saved = torch.load(tmp_path / "model" / "model.pt", weights_only=False)
    assert not [k for k in saved["attr_dict"] if "knn" in k.lower()]
    # state is parameters only: encoder, classifier, attention, centers (+ feature index)
    prefixes = {k.split(".")[0] for k in saved["model_state_dict"]} - {"pyro_param_store"}
    assert prefixes == {"feature_idx", "encoder", "classifier", "attention", "centers"}


def test_save_load_with_mudata_gives_identical_predictions(
    trained_unpaired, unpaired_pair, tmp_path
):
    model, _ = trained_unpaired
    query = make_mudata(*unpaired_pair)
    before = model.predict(query, soft=True)
    model.save(tmp_path / "model", save_anndata=True)

    fresh = make_mudata(*unpaired_pair)
    loaded = lt.CellPredX.load(tmp_path / "model", adata=fresh)
    pd.testing.assert_frame_equal(loaded.predict(fresh, soft=True), before)
    assert loaded.mudata_setup_["genes"] == model.mudata_setup_["genes"]
    assert loaded.preset_ == "rna_atac_unmatched"
    assert loaded.rejection_["paper"] == 0.95
    assert lt.CellPredX(fresh).adata.n_obs == 1200  # the MuData is linked again

    without_data = lt.CellPredX.load(tmp_path / "model")
    pd.testing.assert_frame_equal(without_data.predict(query, soft=True), before)
    out = without_data.annotate(query, copy=True)
    np.testing.assert_allclose(
        out["atac"].obsm[f"{KEY}_probabilities"].to_numpy(), before.to_numpy(), atol=1e-6
    )


def test_damaged_model_file_is_named_when_loading_with_a_mudata(unpaired_pair, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.pt").write_bytes(b"cut short")
    with pytest.raises(ValueError, match=r"model\.pt' is damaged and cannot be read"):
        lt.CellPredX.load(folder, adata=make_mudata(*unpaired_pair))


def test_determinant_genes_and_kghr(trained_unpaired, unpaired_pair):
    model, _ = trained_unpaired
    rna, atac = unpaired_pair
    mdata = make_mudata(rna, atac)
    table = lt.tl.determinant_genes(model, mdata, max_cells=40, n_steps=20)
    assert list(table.columns) == ["group", "rank", "gene", "count", "fraction", "n_cells"]
    assert set(table["group"]) <= set(model.cell_types)
    sizes = table.groupby("group").size()
    assert (sizes == 50).all()
    assert (table.groupby("group")["count"].apply(lambda c: c.is_monotonic_decreasing)).all()
    assert (table["fraction"] <= 1).all()
    assert (table["n_cells"] <= 40).all()

    markers = {t: rna.var_names[rna.var["marker_of"] == t].tolist() for t in model.cell_types}
    rates = lt.metrics.kghr(table, markers, features=model.adata.var_names)
    assert list(rates.index) == [t for t in markers if t in set(table["group"])]
    # the planted markers are enriched among the determinant genes: a random choice of 50 of
    # the model's genes would hit 50 / n_genes of them (~0.17)
    chance = 50 / model.adata.n_vars
    assert rates.mean() >= 1.8 * chance


def test_kghr_on_hand_made_sets():
    determinant = {"A": ["g1", "g2", "g3"], "B": ["g4"]}
    markers = {"A": ["g1", "g9"], "B": ["g4", "g5", "g6", "g7"], "C": ["g1"]}
    rates = lt.metrics.kghr(determinant, markers)
    assert rates.to_dict() == {"A": 0.5, "B": 0.25}
    # markers the model cannot see are left out
    restricted = lt.metrics.kghr(determinant, markers, features=["g1", "g2", "g4"])
    assert restricted.to_dict() == {"A": 1.0, "B": 1.0}
    with pytest.raises(ValueError, match="No cell type"):
        lt.metrics.kghr(determinant, {"Z": ["g1"]})
    with pytest.raises(TypeError, match="string"):
        lt.metrics.kghr(determinant, {"A": "g1"})


def test_presets_and_plan_defaults(trained_unpaired):
    model, _ = trained_unpaired
    assert set(PRESETS) == {"rna_atac_matched", "rna_atac_unmatched", "rna_rna", "atac_atac"}
    assert PRESETS["rna_atac_matched"]["temperature"] == 0.04
    assert PRESETS["atac_atac"]["sc_weight"] == 0.001
    adata = model.adata.copy()
    lt.CellPredX.setup_anndata(adata, labels_key="cell_type")
    atac_model = lt.CellPredX(adata, preset="atac_atac", sc_weight=0.5)
    assert atac_model.loss_weights_["sc_weight"] == 0.5
    assert atac_model.loss_weights_["cl_weight"] == 0.1
    assert atac_model.loss_config == CellPredXLossConfig(
        cl_weight=0.1, fa_weight=0.0, sc_weight=0.5, temperature=0.8
    )
    plan = CellPredXTrainingPlan(atac_model.module, config=atac_model.loss_config)
    optimizer = plan.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.defaults["lr"] == 1e-3
    assert [m.out_features for m in [atac_model.module.encoder]] == [64]
    with pytest.raises(ValueError, match="preset must be one of 'auto', 'rna_atac_matched'"):
        lt.CellPredX(adata, preset="rna_protein")
    with pytest.raises(ValueError, match="temperature must be a positive number, got 0.0"):
        lt.CellPredX(adata, temperature=0.0)
    with pytest.raises(ValueError, match="confidence_threshold"):
        lt.CellPredX(adata, confidence_threshold=2.0)


def test_bad_mudata_inputs_raise(unpaired_pair):
    rna, atac = unpaired_pair
    with pytest.raises(KeyError, match="RNA modality 'expression'"):
        lt.CellPredX.setup_mudata(
            make_mudata(rna, atac),
            labels_key="cell_type",
            modalities={"rna_layer": "expression", "atac_layer": "atac"},
        )
    with pytest.raises(KeyError, match="neither a gene-activity modality"):
        lt.CellPredX.setup_mudata(
            make_mudata(rna, atac),
            labels_key="cell_type",
            modalities={"rna_layer": "rna", "atac_layer": "peaks"},
        )
    with pytest.raises(ValueError, match="Unknown modalities key"):
        lt.CellPredX.setup_mudata(
            make_mudata(rna, atac), labels_key="cell_type", modalities={"protein_layer": "adt"}
        )
    renamed = rna.copy()
    renamed.var_names = [f"ENSG{i:011d}" for i in range(renamed.n_vars)]
    with pytest.raises(ValueError, match="share no gene"):
        lt.CellPredX.setup_mudata(
            make_mudata(renamed, atac), labels_key="cell_type", gene_coordinates=rna
        )
    no_interval = rna.copy()
    del no_interval.var["interval"]
    with pytest.raises(ValueError, match="gene_coordinates"):
        lt.CellPredX.setup_mudata(make_mudata(no_interval, atac), labels_key="cell_type")
    with pytest.raises(KeyError, match="labels_key 'celltype'"):
        lt.CellPredX.setup_mudata(make_mudata(rna, atac), labels_key="celltype")
    with pytest.raises(ValueError, match="not set up for CellPredX"):
        lt.CellPredX(make_mudata(rna, atac))
    with pytest.raises(TypeError, match="needs a MuData"):
        lt.CellPredX.setup_mudata(rna, labels_key="cell_type")
    with pytest.raises(KeyError, match="not a layer"):
        lt.CellPredX.setup_mudata(make_mudata(rna, atac), labels_key="cell_type", rna_layer="raw")


def test_novel_atac_type_gets_low_confidence():
    scvi.settings.seed = 0
    rna, atac = lt.data.synthetic_multiome(
        n_cells=600, n_genes=300, n_background_peaks=300, paired=False, n_novel=1, seed=5
    )
    mdata = make_mudata(rna, atac)
    lt.CellPredX.setup_mudata(mdata, labels_key="cell_type")
    model = lt.CellPredX(mdata)
    assert "novel_type_0" not in model.cell_types
    model.train(max_epochs=EPOCHS, enable_progress_bar=False, accelerator="cpu")
    out = model.annotate(mdata, copy=True)
    novel = atac.obs["novel"].to_numpy()
    confidence = out["atac"].obs[f"{KEY}_confidence"].to_numpy()
    assert lt.metrics.novel_auroc(novel, confidence) >= 0.7


def test_same_seed_same_predictions(unpaired_pair):
    """Minibatches, kNN partners, pseudo-labels and the split all follow scvi.settings.seed."""

    def fit(seed: int) -> pd.DataFrame:
        scvi.settings.seed = seed
        mdata = make_mudata(*unpaired_pair)
        lt.CellPredX.setup_mudata(mdata, labels_key="cell_type")
        model = lt.CellPredX(mdata)
        model.train(max_epochs=4, enable_progress_bar=False, accelerator="cpu")
        return model.predict(mdata, soft=True)

    first = fit(3)
    pd.testing.assert_frame_equal(first, fit(3))
    assert not np.allclose(first.to_numpy(), fit(4).to_numpy())


def test_training_anndata_goes_with_its_mudata_and_models(unpaired_pair):
    """No class-level store keeps a CellPredX training AnnData once its owners are gone."""
    scvi.settings.seed = 0
    mdata = make_mudata(*unpaired_pair)
    lt.CellPredX.setup_mudata(mdata, labels_key="cell_type")
    model = lt.CellPredX(mdata)
    model.train(max_epochs=1, enable_progress_bar=False, accelerator="cpu")
    training = weakref.ref(model.adata)
    del model
    gc.collect()
    assert training() is not None  # the MuData still links it: CellPredX(mdata) works
    model = lt.CellPredX(mdata)
    assert model.adata is training()
    del model, mdata
    gc.collect()
    assert training() is None
