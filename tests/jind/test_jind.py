from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scvi
import torch

import labeltransfer as lt
from labeltransfer._constants import UNASSIGNED

KEY = "jind"


def test_synthetic_task_is_solved(trained_jind, synthetic_pair):
    query = synthetic_pair[1].copy()
    pred = trained_jind.predict(query)
    accuracy = (pred == query.obs["cell_type"].to_numpy()).mean()
    assert accuracy >= 0.9


def test_annotate_writes_exactly_the_documented_fields(trained_jind, synthetic_pair):
    query = synthetic_pair[1].copy()
    obs_before, obsm_before, uns_before = set(query.obs), set(query.obsm), set(query.uns)
    assert trained_jind.annotate(query, key_added=KEY) is None

    assert set(query.obs) - obs_before == {
        KEY,
        f"{KEY}_prediction",
        f"{KEY}_confidence",
        f"{KEY}_rejected",
        f"{KEY}_novelty",
    }
    novelty = query.obs[f"{KEY}_novelty"].to_numpy()
    assert novelty.dtype == np.float32
    assert (novelty >= 0).all()
    assert set(query.obsm) - obsm_before == {f"{KEY}_probabilities", f"X_{KEY}"}
    assert set(query.uns) - uns_before == {KEY}

    types = trained_jind.cell_types
    assert list(query.obs[KEY].cat.categories) == [*types, UNASSIGNED]
    assert list(query.obs[f"{KEY}_prediction"].cat.categories) == types
    assert query.obs[f"{KEY}_confidence"].dtype == np.float32
    assert query.obs[f"{KEY}_rejected"].dtype == bool
    probs = query.obsm[f"{KEY}_probabilities"]
    assert isinstance(probs, pd.DataFrame)
    assert list(probs.columns) == types
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(probs.max(axis=1), query.obs[f"{KEY}_confidence"], rtol=1e-6)
    assert (probs.idxmax(axis=1) == query.obs[f"{KEY}_prediction"].astype(str)).all()
    rejected = query.obs[f"{KEY}_rejected"].to_numpy()
    assert (query.obs[KEY][rejected] == UNASSIGNED).all()
    assert (
        query.obs[KEY][~rejected].astype(str)
        == query.obs[f"{KEY}_prediction"][~rejected].astype(str)
    ).all()
    assert query.obsm[f"X_{KEY}"].shape == (query.n_obs, 256)

    uns = query.uns[KEY]
    assert uns["method"] == "JIND"
    assert uns["rejection"]["rule"] == "openset"
    assert uns["rejection"]["paper"] == "per_type"
    assert list(uns["rejection"]["types"]) == list(types)
    np.testing.assert_allclose(
        uns["rejection"]["thresholds"], trained_jind.rejection_thresholds().to_numpy()
    )
    assert uns["input_type"] == "counts"
    assert uns["gene_overlap"]["overlap"] == 1.0
    assert uns["n_rejected"] == rejected.sum()
    assert uns["seed"] == 0
    # the registered label column and scvi columns of the query are untouched
    assert not any(c.startswith("_scvi") for c in query.obs)


def test_annotated_query_writes_to_h5ad(trained_jind, synthetic_pair, tmp_path):
    query = synthetic_pair[1].copy()
    trained_jind.annotate(query)
    query.write_h5ad(tmp_path / "q.h5ad")
    back = ad.read_h5ad(tmp_path / "q.h5ad")
    assert back.uns[KEY]["rejection"]["rule"] == "openset"
    np.testing.assert_array_equal(back.obs[KEY], query.obs[KEY])


def test_copy_returns_annotated_copy(trained_jind, synthetic_pair):
    query = synthetic_pair[1].copy()
    out = trained_jind.annotate(query, copy=True)
    assert KEY in out.obs
    assert KEY not in query.obs


def test_rejection_rules(trained_jind, synthetic_pair):
    query = synthetic_pair[1].copy()
    trained_jind.annotate(query, key_added="none", rejection=None)
    assert not query.obs["none_rejected"].any()
    trained_jind.annotate(query, key_added="glob", rejection=0.99)
    conf = query.obs["glob_confidence"].to_numpy()
    np.testing.assert_array_equal(query.obs["glob_rejected"], conf < 0.99)
    assert query.uns["glob"]["rejection"] == {"rule": "global", "threshold": 0.99}
    with pytest.raises(ValueError, match="Unknown rejection rule"):
        trained_jind.annotate(query, rejection="sometimes")
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        trained_jind.annotate(query, rejection=1.5)


def test_rules_without_coverage_skip_the_test(trained_jind, synthetic_pair, monkeypatch):
    """Only "openset" runs the coverage test; the others give the same calls without it."""
    query = synthetic_pair[1].copy()
    trained_jind.annotate(query, key_added="r")
    openset = query.obs[["r_prediction", "r_confidence"]].copy()
    assert "r_novelty" in query.obs

    def no_coverage(*args, **kwargs):
        raise AssertionError("the coverage test ran for a rule that does not read it")

    monkeypatch.setattr(type(trained_jind), "_query_residual_axes", no_coverage)
    monkeypatch.setattr(type(trained_jind), "_coverage", no_coverage)
    for rule in ("per_type", 0.9, None):
        with pytest.warns(UserWarning, match="Overwriting the previous annotation"):
            trained_jind.annotate(query, key_added="r", rejection=rule)
        pd.testing.assert_frame_equal(query.obs[["r_prediction", "r_confidence"]], openset)
        assert "r_novelty" not in query.obs  # the earlier score is not left beside new calls
        assert "n_novel_groups" not in query.uns["r"]["rejection"]


def test_thresholds_follow_theta(trained_jind):
    low = trained_jind.rejection_thresholds(0.05)
    high = trained_jind.rejection_thresholds(0.3)
    assert (high >= low).all()
    pd.testing.assert_series_equal(trained_jind.rejection_thresholds(), low)


def test_overwrite_warns_and_protected_keys_raise(trained_jind, synthetic_pair):
    query = synthetic_pair[1].copy()
    trained_jind.annotate(query)
    with pytest.warns(UserWarning, match="Overwriting the previous annotation"):
        trained_jind.annotate(query)
    with pytest.raises(ValueError, match="registered"):
        trained_jind.annotate(trained_jind.adata, key_added="cell_type")


def test_predict_soft_and_latent(trained_jind, synthetic_pair):
    query = synthetic_pair[1]
    soft = trained_jind.predict(query, soft=True)
    assert list(soft.columns) == trained_jind.cell_types
    assert list(soft.index) == list(query.obs_names)
    hard = trained_jind.predict(query)
    np.testing.assert_array_equal(hard, soft.idxmax(axis=1).to_numpy())
    sub = trained_jind.predict(query, indices=[0, 5, 7], soft=True)
    np.testing.assert_allclose(sub.to_numpy(), soft.iloc[[0, 5, 7]].to_numpy(), atol=1e-6)
    latent = trained_jind.get_latent_representation(query)
    assert latent.shape == (query.n_obs, 256)


def test_query_with_missing_and_shuffled_genes(trained_jind, synthetic_pair):
    query = synthetic_pair[1]
    full = trained_jind.predict(query)
    rng = np.random.default_rng(0)
    keep = np.sort(rng.choice(query.n_vars, int(0.8 * query.n_vars), replace=False))
    partial = query[:, rng.permutation(keep)].copy()
    with pytest.warns(UserWarning, match="were found in the query"):
        trained_jind.annotate(partial)
    report = partial.uns[KEY]["gene_overlap"]
    assert report["n_missing"] == query.n_vars - keep.size
    assert report["overlap"] == pytest.approx(keep.size / query.n_vars)
    agreement = (partial.obs[f"{KEY}_prediction"].astype(str).to_numpy() == full).mean()
    assert agreement >= 0.8
    truth = partial.obs["cell_type"].to_numpy()
    assert (partial.obs[f"{KEY}_prediction"].astype(str).to_numpy() == truth).mean() >= 0.8


def test_query_with_too_few_genes_raises(trained_jind, synthetic_pair):
    query = synthetic_pair[1][:, :100].copy()
    with pytest.raises(ValueError, match="overlap"):
        trained_jind.annotate(query)


def test_query_of_other_input_type_raises(trained_jind, synthetic_pair):
    query = synthetic_pair[1].copy()
    query.X = np.log1p(query.X.toarray() / query.X.sum(1).A * 1e4)
    with pytest.raises(ValueError, match="same form as the reference"):
        trained_jind.annotate(query)


def test_save_load_identical_predictions(trained_jind, synthetic_pair, tmp_path):
    query = synthetic_pair[1].copy()
    before = trained_jind.predict(query, soft=True)
    trained_jind.save(tmp_path / "model")
    with pytest.raises(ValueError, match="already exists"):
        trained_jind.save(tmp_path / "model")
    loaded = lt.JIND.load(tmp_path / "model")
    pd.testing.assert_frame_equal(loaded.predict(query, soft=True), before)
    pd.testing.assert_series_equal(
        loaded.rejection_thresholds(), trained_jind.rejection_thresholds()
    )
    # loading onto the reference data itself also works
    ref = synthetic_pair[0].copy()
    loaded_ref = lt.JIND.load(tmp_path / "model", adata=ref)
    np.testing.assert_allclose(loaded_ref.predict(query, soft=True).to_numpy(), before.to_numpy())
    with pytest.raises(ValueError, match="model's genes"):
        lt.JIND.load(tmp_path / "model", adata=ref[:, ::-1].copy())


def test_train_validation_split_and_history(trained_jind):
    summary = trained_jind.training_summary_
    n_labelled = summary["n_train"] + summary["n_validation"]
    assert summary["n_validation"] == pytest.approx(0.3 * n_labelled, abs=4)
    assert {"train_loss", "validation_loss", "validation_accuracy"} <= set(trained_jind.history)
    best = trained_jind.history["validation_accuracy"].max().item()
    assert summary["best_validation_accuracy"] == pytest.approx(best)
    assert 0.0 < trained_jind.calibration_["temperature"] < 20


def test_class_weights_follow_eq2(trained_jind):
    codes = np.asarray(trained_jind.adata_manager.get_from_registry("labels")).ravel()
    k = len(trained_jind.cell_types)
    frac = np.bincount(codes, minlength=k)[:k] / codes.size
    expected = 2.0 / (k * (0.01 + frac))
    np.testing.assert_allclose(trained_jind.module.class_weights.numpy(), expected, rtol=1e-5)


def test_generator_starts_as_identity(trained_jind):
    module = trained_jind.module
    x = torch.rand(5, module.feature_idx.numel())
    h = torch.randn(5, module.encoder.out_features)
    module.generator.reset_parameters()
    out, scale = module.generator(x, h)
    torch.testing.assert_close(out, h)
    torch.testing.assert_close(scale, torch.ones_like(scale))


def test_align_self_train_and_reload(synthetic_pair, tmp_path):
    scvi.settings.seed = 0
    ref, query = synthetic_pair[0].copy(), synthetic_pair[1].copy()
    lt.JIND.setup_anndata(ref, labels_key="cell_type")
    model = lt.JIND(ref, n_top_genes=200)
    model.train(max_epochs=5, enable_progress_bar=False, accelerator="cpu")
    unaligned = model.predict(query, soft=True)
    encoder_before = model.module.encoder.weight.detach().clone()
    model.save(tmp_path / "reference")

    trained_history = dict(model.history)
    model.align(query, name="q", max_epochs=3, enable_progress_bar=False, accelerator="cpu")
    stage = model.alignments_["q"]["history"]
    assert stage  # the alignment's metrics, in model.history too, beside the training's
    assert set(model.history) == set(trained_history) | {f"align_{k}" for k in stage}
    for key in stage:
        assert model.history[f"align_{key}"][f"align_{key}"].tolist() == stage[key][key]
    torch.testing.assert_close(
        model.module.encoder.weight, encoder_before
    )  # classifier side frozen
    aligned = model.predict(query, soft=True)
    assert not np.allclose(aligned.to_numpy(), unaligned.to_numpy())
    model.annotate(query)
    assert query.uns[KEY]["aligned"] is True or query.uns[KEY]["aligned"] == 1
    other = query[:50].copy()  # a different AnnData is not aligned
    np.testing.assert_allclose(
        model.predict(other, soft=True).to_numpy(), unaligned.iloc[:50].to_numpy(), rtol=1e-5
    )
    model.save(tmp_path / "aligned")
    reloaded = lt.JIND.load(tmp_path / "aligned")
    pd.testing.assert_frame_equal(reloaded.predict(query, soft=True), aligned)

    # a second query can be aligned from the saved reference without its data
    fresh = lt.JIND.load(tmp_path / "reference")
    fresh.align(query, max_epochs=2, enable_progress_bar=False, accelerator="cpu")
    assert "query_0" in fresh.alignments_

    stores = (model._per_instance_manager_store[model.id], lt.JIND._setup_adata_manager_store)
    registered = [set(store) for store in stores]
    model.self_train(query, max_epochs=2, enable_progress_bar=False, accelerator="cpu")
    assert [set(store) for store in stores] == registered  # query and pseudo-labels released
    tuned = model.history["self_train_validation_accuracy"]["self_train_validation_accuracy"]
    assert len(tuned) == 2  # one value per fine-tuning epoch
    assert model.self_training_["best_validation_accuracy"] == pytest.approx(tuned.max())
    assert {"align_generator_loss", "train_loss"} <= set(model.history)  # kept beside
    assert model.self_training_["n_confident"] > 0
    assert not torch.equal(model.module.encoder.weight, encoder_before)
    with pytest.raises(RuntimeError, match="self_train"):
        model.align(query)


def test_same_seed_same_predictions(synthetic_pair):
    def fit() -> pd.DataFrame:
        scvi.settings.seed = 3
        ref = synthetic_pair[0].copy()
        lt.JIND.setup_anndata(ref, labels_key="cell_type")
        model = lt.JIND(ref, n_top_genes=100)
        model.train(max_epochs=3, enable_progress_bar=False, accelerator="cpu")
        return model.predict(synthetic_pair[1], soft=True)

    pd.testing.assert_frame_equal(fit(), fit())


def test_lognormalised_model_loads_without_data(synthetic_pair, tmp_path):
    """The data-free placeholder of `load` (all zeros) must not fail the input-type check."""
    ref, query = (a[:300].copy() for a in synthetic_pair)
    for adata in (ref, query):
        counts = adata.X.toarray()
        adata.X = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4).astype(np.float32)
    lt.JIND.setup_anndata(ref, labels_key="cell_type")
    model = lt.JIND(ref, input_type="lognorm")
    model.train(max_epochs=2, accelerator="cpu", enable_progress_bar=False)
    model.save(tmp_path / "lognorm")
    loaded = lt.JIND.load(tmp_path / "lognorm")
    pd.testing.assert_frame_equal(
        loaded.predict(query, soft=True), model.predict(query, soft=True)
    )
