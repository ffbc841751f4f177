from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scvi
import torch

import labeltransfer as lt
from labeltransfer._constants import UNASSIGNED
from labeltransfer.nn import sigmoid_ramp
from labeltransfer.scnym import SCNYMModule, SCNYMTrainingPlan

from .conftest import EPOCHS

KEY = "scnym"


def _query_mask(adata: ad.AnnData) -> np.ndarray:
    return (adata.obs["lt_role"] == "query").to_numpy()


def test_query_accuracy_on_shifted_synthetic_task(trained_scnym):
    adata = trained_scnym.annotate(copy=True)
    query = _query_mask(adata)
    truth = adata.obs["cell_type_original"].astype(str).to_numpy()[query]
    pred = adata.obs[f"{KEY}_prediction"].astype(str).to_numpy()[query]
    assert (pred == truth).mean() >= 0.9


def test_annotate_writes_exactly_the_documented_fields(trained_scnym, tmp_path):
    adata = trained_scnym.adata
    obs_before, obsm_before, uns_before = set(adata.obs), set(adata.obsm), set(adata.uns)
    labels_before = adata.obs["cell_type"].copy()
    out = trained_scnym.annotate(copy=True)
    assert trained_scnym.annotate(copy=True, key_added="other") is not None

    assert set(out.obs) - obs_before == {
        KEY,
        f"{KEY}_prediction",
        f"{KEY}_confidence",
        f"{KEY}_rejected",
        f"{KEY}_novelty",
    }
    assert set(out.obsm) - obsm_before == {f"{KEY}_probabilities", f"X_{KEY}"}
    assert set(out.uns) - uns_before == {KEY}
    assert set(adata.obs) == obs_before  # copy=True leaves the registered AnnData alone
    pd.testing.assert_series_equal(out.obs["cell_type"], labels_before)

    types = trained_scnym.cell_types
    assert types == ["type_0", "type_1", "type_2", "type_3"]
    assert list(out.obs[KEY].cat.categories) == [*types, UNASSIGNED]
    assert list(out.obs[f"{KEY}_prediction"].cat.categories) == types
    assert out.obs[f"{KEY}_confidence"].dtype == np.float32
    assert out.obs[f"{KEY}_rejected"].dtype == bool
    probs = out.obsm[f"{KEY}_probabilities"]
    assert isinstance(probs, pd.DataFrame)
    assert list(probs.columns) == types
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(probs.max(axis=1), out.obs[f"{KEY}_confidence"], rtol=1e-6)
    assert (probs.idxmax(axis=1) == out.obs[f"{KEY}_prediction"].astype(str)).all()
    rejected = out.obs[f"{KEY}_rejected"].to_numpy()
    assert (out.obs[KEY][rejected] == UNASSIGNED).all()
    assert (
        out.obs[KEY][~rejected].astype(str) == out.obs[f"{KEY}_prediction"][~rejected].astype(str)
    ).all()
    embedding = out.obsm[f"X_{KEY}"]
    assert embedding.shape == (out.n_obs, 256)
    assert (embedding >= 0).all()  # the penultimate layer's ReLU activations
    np.testing.assert_allclose(embedding, trained_scnym.get_latent_representation(), atol=1e-5)

    uns = out.uns[KEY]
    assert uns["method"] == "SCNYM"
    assert uns["rejection"]["rule"] == "openset"
    assert uns["rejection"]["paper"] == 0.5
    assert 0.01 <= uns["calibration"]["temperature"] <= 20.0
    assert {"ece_before", "ece_after"} <= set(uns["calibration"])
    assert uns["input_type"] == "counts"
    assert uns["n_rejected"] == rejected.sum()
    assert uns["seed"] == 0
    assert uns["new_identity_discovery"] is False or uns["new_identity_discovery"] == 0
    assert list(uns["domains"]) == ["query", "reference"]
    assert uns["training"]["domain_source"] == "batch"
    out.write_h5ad(tmp_path / "annotated.h5ad")
    back = ad.read_h5ad(tmp_path / "annotated.h5ad")
    assert back.uns[KEY]["rejection"]["paper"] == 0.5
    np.testing.assert_array_equal(back.obs[KEY], out.obs[KEY])


def test_rejection_rules(trained_scnym):
    out = trained_scnym.annotate(copy=True, rejection="paper")
    assert out.uns[KEY]["rejection"] == {"rule": "global", "threshold": 0.5}
    confidence = out.obs[f"{KEY}_confidence"].to_numpy()
    np.testing.assert_array_equal(out.obs[f"{KEY}_rejected"], confidence < 0.5)
    trained_scnym.annotate(out, key_added="pt", rejection="per_type")
    assert out.uns["pt"]["rejection"]["rule"] == "per_type"
    assert out.uns["pt"]["rejection"]["theta"] == 0.05
    thresholds = trained_scnym.rejection_thresholds().to_numpy()
    prediction = out.obs["pt_prediction"].cat.codes.to_numpy()
    np.testing.assert_array_equal(out.obs["pt_rejected"], confidence < thresholds[prediction])
    # the default open-set rule: the thresholds lowered to the query's covered cells, and the
    # uncovered cells (novelty = uncovered fraction in steps of 1/16 + (1 - confidence) / 16)
    trained_scnym.annotate(out, key_added="os")
    rule = out.uns["os"]["rejection"]
    assert rule["rule"] == "openset"
    applied = np.asarray(rule["query_thresholds"])
    assert np.all(applied <= thresholds)
    uncovered = out.obs["os_novelty"].to_numpy() >= 9 / 16
    expected = (out.obs["os_confidence"].to_numpy() < applied[prediction]) | uncovered
    np.testing.assert_array_equal(out.obs["os_rejected"], expected)
    assert rule["n_uncovered"] == uncovered.sum()


def test_predict_soft_and_other_query(trained_scnym, scnym_pair):
    soft = trained_scnym.predict(soft=True)
    assert list(soft.columns) == trained_scnym.cell_types
    np.testing.assert_allclose(soft.sum(axis=1), 1.0, rtol=1e-5)
    hard = trained_scnym.predict()
    np.testing.assert_array_equal(hard, soft.idxmax(axis=1).to_numpy())

    # an unregistered query goes through the shared query path (gene reindexing)
    query = scnym_pair[1].copy()
    other = trained_scnym.annotate(query[:, ::-1].copy(), copy=True)
    registered = soft[_query_mask(trained_scnym.adata)]
    np.testing.assert_allclose(
        other.obsm[f"{KEY}_probabilities"].to_numpy(), registered.to_numpy(), atol=1e-5
    )
    assert other.uns[KEY]["gene_overlap"]["overlap"] == 1.0


def test_save_load_identical_predictions(trained_scnym, scnym_pair, tmp_path):
    query = scnym_pair[1].copy()
    before = trained_scnym.predict(query, soft=True)
    trained_scnym.save(tmp_path / "model")
    loaded = lt.SCNYM.load(tmp_path / "model")
    pd.testing.assert_frame_equal(loaded.predict(query, soft=True), before)
    assert loaded.rejection_ is not None
    assert loaded.rejection_["paper"] == 0.5
    assert loaded.domains_ == trained_scnym.domains_
    out = loaded.annotate(query, copy=True)
    assert out.uns[KEY]["rejection"]["rule"] == "openset"

    # loading onto the registered data, and onto data with new batch categories
    adata = trained_scnym.adata.copy()
    reloaded = lt.SCNYM.load(tmp_path / "model", adata=adata)
    pd.testing.assert_frame_equal(reloaded.predict(query, soft=True), before)
    renamed = trained_scnym.adata.copy()
    renamed.obs["batch"] = renamed.obs["batch"].astype(str) + "_new"
    with_new_batches = lt.SCNYM.load(tmp_path / "model", adata=renamed)
    assert with_new_batches.module.n_domains == 2
    pd.testing.assert_frame_equal(with_new_batches.predict(query, soft=True), before)


def test_history_and_epoch_schedules(trained_scnym):
    history = trained_scnym.history
    for name in (
        "train_loss",
        "train_supervised_loss",
        "train_consistency_loss",
        "train_adversary_loss",
        "train_adversary_accuracy",
        "train_confident_fraction",
        "validation_loss",
        "validation_accuracy",
    ):
        assert name in history, name
        assert np.isfinite(history[name].to_numpy(dtype=float)).all(), name
    adversary = history["train_adversary_weight"].to_numpy(dtype=float).ravel()
    consistency = history["train_consistency_weight"].to_numpy(dtype=float).ravel()
    assert adversary.size == consistency.size == EPOCHS
    # ramps keyed on the epoch: one value per epoch, whatever the number of steps
    np.testing.assert_allclose(adversary, [sigmoid_ramp(e, 20, 0.1) for e in range(EPOCHS)])
    np.testing.assert_allclose(consistency, [sigmoid_ramp(e, 100, 1.0) for e in range(EPOCHS)])
    assert (history["train_confident_fraction"].to_numpy(dtype=float) == 1.0).all()

    summary = trained_scnym.training_summary_
    assert summary["n_query"] == 400
    assert summary["n_train"] + summary["n_validation"] == 600
    assert summary["n_validation"] == pytest.approx(60, abs=4)  # 10% of the reference
    assert summary["best_epoch"] >= 1  # best-epoch selection starts after the warm-up
    # an explicit max_epochs keeps the paper's schedules
    assert summary["early_stopping_patience"] == 40
    assert (summary["consistency_ramp_epochs"], summary["adversary_ramp_epochs"]) == (100, 20)


@pytest.mark.parametrize(
    ("n_cells", "epochs", "patience", "ramps"),
    [(1_000, 400, 40, (100, 20)), (20_000, 400, 40, (100, 20)), (200_000, 40, 4, (10, 2))],
)
def test_default_budget_shrinks_with_the_cells_and_the_schedules_with_it(
    n_cells, epochs, patience, ramps
):
    from types import SimpleNamespace

    model = SimpleNamespace(adata=SimpleNamespace(n_obs=n_cells))
    arguments, options = {"max_epochs": None, "early_stopping_patience": None}, {}
    lt.SCNYM._prepare_training(model, arguments, options)
    assert (arguments["max_epochs"], arguments["early_stopping_patience"]) == (epochs, patience)
    assert (options["consistency_ramp_epochs"], options["adversary_ramp_epochs"]) == ramps
    # what the user sets stays
    arguments = {"max_epochs": None, "early_stopping_patience": 7}
    options = {"adversary_ramp_epochs": 5}
    lt.SCNYM._prepare_training(model, arguments, options)
    assert (arguments["early_stopping_patience"], options["adversary_ramp_epochs"]) == (7, 5)
    arguments, options = {"max_epochs": 30, "early_stopping_patience": None}, {}
    lt.SCNYM._prepare_training(model, arguments, options)
    assert (arguments["max_epochs"], arguments["early_stopping_patience"], options) == (30, 40, {})


def test_splitter_gives_reference_query_pairs_to_the_plan(scnym_adata):
    scvi.settings.seed = 0
    adata = scnym_adata.copy()
    lt.SCNYM.setup_anndata(adata, labels_key="cell_type", batch_key="batch")
    model = lt.SCNYM(adata)
    n_labels = len(model.cell_types)
    seen: list[tuple[dict, dict | None]] = []
    loss = model.module.semisupervised_loss

    def recording(reference, query=None, **kwargs):
        seen.append((reference, query))
        return loss(reference, query, **kwargs)

    model.module.semisupervised_loss = recording
    model.train(max_epochs=1, enable_progress_bar=False, accelerator="cpu")
    # the unlabelled stream: the 400 query cells and the 56 held-out reference cells
    assert len(seen) == 3  # max(ceil(544 / 256), ceil(456 / 256)) steps
    query_codes = adata.obs["batch"].cat.categories.get_loc("query")
    n_held_out = 0
    for reference, query in seen[:2]:
        assert query is not None
        assert (reference["labels"] < n_labels).all()
        assert (reference["batch"] != query_codes).all()
        held_out = query["labels"].ravel() < n_labels
        assert (query["batch"].ravel()[~held_out] == query_codes).all()
        assert (query["batch"].ravel()[held_out] != query_codes).all()
        n_held_out += int(held_out.sum())
    assert n_held_out == model.training_summary_["n_validation"] == 56
    assert sum(q["X"].shape[0] for _, q in seen[:2]) == 456


def test_semisupervised_loss_excludes_unconfident_cells():
    torch.manual_seed(0)
    module = SCNYMModule(
        n_input=30, n_labels=3, n_domains=2, feature_idx=range(30), input_type="counts"
    )
    reference = {
        "X": torch.poisson(torch.full((16, 30), 5.0)),
        "labels": torch.randint(0, 3, (16, 1)).float(),
        "batch": torch.zeros(16, 1),
    }
    query = {
        "X": torch.poisson(torch.full((12, 30), 5.0)),
        "labels": torch.full((12, 1), 3.0),
        "batch": torch.zeros(12, 1),
    }
    adversary_rows: list[int] = []
    module.adversary.register_forward_hook(lambda m, i, o: adversary_rows.append(i[0].shape[0]))
    module.train()
    everything = module.semisupervised_loss(reference, query, pseudolabel_threshold=0.0)
    assert everything.extra_metrics["confident_fraction"] == 1.0
    assert everything.extra_metrics["consistency_loss"] > 0
    # nothing reaches 0.999 confidence at initialisation: no query cell is used
    strict = module.semisupervised_loss(reference, query, pseudolabel_threshold=0.999)
    assert strict.extra_metrics["confident_fraction"] == 0.0
    assert strict.extra_metrics["consistency_loss"] == 0.0
    # the adversary sees every cell, then the reference cells only
    assert adversary_rows == [16 + 12, 16]
    assert torch.isfinite(strict.loss)
    strict.loss.backward()
    assert module.training  # the eval-mode pseudolabelling restores training mode


def test_without_mixmatch_the_query_only_reaches_the_adversary():
    torch.manual_seed(0)
    module = SCNYMModule(
        n_input=30, n_labels=3, n_domains=2, feature_idx=range(30), input_type="counts"
    )
    reference = {
        "X": torch.poisson(torch.full((16, 30), 5.0)),
        "labels": torch.randint(0, 3, (16, 1)).float(),
        "batch": torch.zeros(16, 1),
    }
    query = {"X": torch.poisson(torch.full((12, 30), 5.0)), "batch": torch.zeros(12, 1)}
    embedded: list[int] = []
    module.embedder.register_forward_hook(lambda m, i, o: embedded.append(i[0].shape[0]))
    adversary_rows: list[int] = []
    module.adversary.register_forward_hook(lambda m, i, o: adversary_rows.append(i[0].shape[0]))
    module.train()
    output = module.semisupervised_loss(reference, query, mixmatch=False)
    assert output.extra_metrics["consistency_loss"] == 0.0
    assert output.extra_metrics["confident_fraction"] == 1.0  # still pseudolabelled
    # pseudolabels (12), then one pass: 16 mixed reference cells + 16 + 12 unmixed cells
    assert embedded == [12, 16 + 16 + 12]
    assert adversary_rows == [16 + 12]
    plan = SCNYMTrainingPlan(module, mixmatch=False)
    assert plan.mixmatch is False


def test_new_identity_discovery_keeps_novel_type_uncertain():
    scvi.settings.seed = 0
    ref, query = lt.data.synthetic(
        n_reference=600, n_query=500, n_genes=300, n_types=4, n_novel=1, batch_shift=0.5, seed=2
    )
    adata = lt.data.concat_reference_query(ref, query, labels_key="cell_type")
    lt.SCNYM.setup_anndata(adata, labels_key="cell_type")
    model = lt.SCNYM(adata, new_identity_discovery=True)
    assert model.domains_ == ["reference", "query"]
    model.train(max_epochs=EPOCHS, enable_progress_bar=False, accelerator="cpu")
    assert model.training_summary_["pseudolabel_threshold"] == 0.9
    confident = model.history["train_confident_fraction"].to_numpy(dtype=float).ravel()
    assert confident.min() < 1.0
    out = model.annotate(copy=True)
    is_query = _query_mask(out)
    truth = out.obs["cell_type_original"].astype(str).to_numpy()[is_query]
    confidence = out.obs[f"{KEY}_confidence"].to_numpy()[is_query]
    novel = np.isin(truth, query.uns["novel_types"])
    assert np.median(confidence[novel]) < np.median(confidence[~novel])
    seen_pred = out.obs[f"{KEY}_prediction"].astype(str).to_numpy()[is_query][~novel]
    assert (seen_pred == truth[~novel]).mean() >= 0.9


def test_multi_domain_training(scnym_pair):
    scvi.settings.seed = 0
    ref, query = scnym_pair[0].copy(), scnym_pair[1].copy()
    rng = np.random.default_rng(0)
    ref.obs["batch"] = rng.choice(["ref_a", "ref_b"], ref.n_obs)
    query.obs["batch"] = rng.choice(["query_a", "query_b"], query.n_obs)
    adata = lt.data.concat_reference_query(ref, query, labels_key="cell_type", batch_key="batch")
    lt.SCNYM.setup_anndata(adata, labels_key="cell_type", batch_key="batch")
    model = lt.SCNYM(adata)
    assert model.module.n_domains == 4
    assert model.domains_ == ["query_a", "query_b", "ref_a", "ref_b"]
    model.train(max_epochs=8, enable_progress_bar=False, accelerator="cpu")
    adversary = model.history["train_adversary_loss"].to_numpy(dtype=float)
    assert np.isfinite(adversary).all()
    assert (adversary > 0).all()
    # four balanced domains: chance cross-entropy is log(4)
    assert adversary[0] == pytest.approx(np.log(4), abs=0.5)
    pred = model.predict()[_query_mask(adata)]
    truth = adata.obs["cell_type_original"].astype(str).to_numpy()[_query_mask(adata)]
    assert (pred == truth).mean() >= 0.8


def test_reference_only_training_is_supervised(scnym_pair, caplog):
    scvi.settings.seed = 0
    ref = scnym_pair[0].copy()
    lt.SCNYM.setup_anndata(ref, labels_key="cell_type")
    model = lt.SCNYM(ref, n_top_genes=100)
    assert model.module.feature_idx.numel() == 100
    with caplog.at_level("WARNING"):
        model.train(max_epochs=2, enable_progress_bar=False, accelerator="cpu")
    assert "reference only" in caplog.text
    assert (model.history["train_adversary_loss"].to_numpy(dtype=float) == 0).all()
    assert model.predict(scnym_pair[1], soft=True).shape == (400, 4)
    # without a validation split: no early stopping, no learned per-type thresholds
    with pytest.warns(UserWarning, match="No held-out reference cells"):
        model.train(max_epochs=1, train_size=1.0, enable_progress_bar=False, accelerator="cpu")
    assert model.training_summary_["n_validation"] == 0
    assert model.training_summary_["best_epoch"] is None


def test_plan_defaults_follow_the_paper():
    module = SCNYMModule(
        n_input=10, n_labels=2, n_domains=2, feature_idx=range(10), input_type="counts"
    )
    plan = SCNYMTrainingPlan(module)
    optimizer = plan.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, torch.optim.Adadelta)
    assert optimizer.defaults["lr"] == 1.0
    assert optimizer.defaults["weight_decay"] == 1e-4
    assert plan.mixup_alpha == 0.3
    assert plan.temperature == 0.5
    assert plan.consistency_weight(100) == 1.0
    assert plan.adversary_weight(20) == pytest.approx(0.1)
    assert plan.adversary_weight(0) < 1e-3
    assert [m.out_features for m in module.embedder if isinstance(m, torch.nn.Linear)] == [
        256,
        256,
    ]
    assert module.adversary[0].out_features == 256


def test_bad_arguments_raise(scnym_adata):
    adata = scnym_adata.copy()
    lt.SCNYM.setup_anndata(adata, labels_key="cell_type")
    with pytest.raises(ValueError, match="confidence_threshold"):
        lt.SCNYM(adata, confidence_threshold=1.5)
    with pytest.raises(ValueError, match="not genes"):
        lt.SCNYM(adata, features=["gene_0", "not_a_gene"])


def test_early_stopping_starts_after_five_percent_of_the_epochs(scnym_adata):
    scvi.settings.seed = 0
    adata = scnym_adata.copy()
    lt.SCNYM.setup_anndata(adata, labels_key="cell_type", batch_key="batch")
    model = lt.SCNYM(adata)
    model.train(
        max_epochs=100,
        early_stopping_patience=1,
        early_stopping_monitor="validation_accuracy",
        enable_progress_bar=False,
        accelerator="cpu",
    )
    summary = model.training_summary_
    assert summary["early_stopped"]
    # 5 warm-up epochs, then a first record and at least one more before stopping
    assert summary["epochs_trained"] >= 7
    assert summary["best_epoch"] >= 5


def test_same_seed_same_predictions(scnym_adata):
    """MixUp weights, partners, gene masks and the split all follow scvi.settings.seed."""

    def fit(seed: int) -> pd.DataFrame:
        scvi.settings.seed = seed
        adata = scnym_adata.copy()
        lt.SCNYM.setup_anndata(
            adata, labels_key="cell_type", unlabeled_category="Unknown", batch_key="batch"
        )
        model = lt.SCNYM(adata)
        model.train(max_epochs=3, enable_progress_bar=False, accelerator="cpu")
        return model.predict(soft=True)

    first = fit(3)
    pd.testing.assert_frame_equal(first, fit(3))
    assert not np.allclose(first.to_numpy(), fit(4).to_numpy())
