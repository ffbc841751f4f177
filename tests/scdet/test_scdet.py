"""lt.SCDET end to end on synthetic data with novel types."""

from __future__ import annotations

import math
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scvi
import torch
from sklearn.metrics import roc_auc_score

import labeltransfer as lt
from labeltransfer._constants import NOVEL_PREFIX, UNASSIGNED
from labeltransfer.scdet import (
    DistributionEstimation,
    SCDETLossConfig,
    SCDETModule,
    SCDETTrainingPlan,
)
from labeltransfer.scdet._novel_check import COVERAGE_MARGIN, novel_class_check

from .conftest import FAST

KEY = "scdet"


def _query(adata: ad.AnnData) -> np.ndarray:
    return (adata.obs["lt_role"] == "query").to_numpy()


def _report(model, out):
    q = _query(out)
    truth = out.obs["cell_type_original"].astype(str).to_numpy()[q]
    pred = out.obs[KEY].astype(str).to_numpy()[q]
    return lt.metrics.open_world_report(truth, pred, model.cell_types)


def test_seen_types_classified_and_novel_types_clustered(trained_scdet):
    # scDET's own calls (the paper's rule: no rejection); the shared layer is tested below
    out = trained_scdet.annotate(copy=True, rejection="paper")
    report = _report(trained_scdet, out)
    # chance is 1/5; a closed-set classifier would score 0 on the novel cells
    assert report["seen_accuracy"] >= 0.9, report
    assert report["novel_accuracy"] >= 0.8, report
    assert report["n_novel_clusters"] == 2
    assert set(report["mapping"].values()) == {"type_3", "type_4"}
    # reference cells keep their types
    ref = ~_query(out)
    truth = out.obs["cell_type_original"].astype(str).to_numpy()[ref]
    assert (out.obs[KEY].astype(str).to_numpy()[ref] == truth).mean() >= 0.95


def test_open_set_layer_keeps_novel_classes_and_scores_them_novel(trained_scdet):
    out = trained_scdet.annotate(copy=True)
    q = _query(out)
    truth = out.obs["cell_type_original"].astype(str).to_numpy()[q]
    novel = ~np.isin(truth, trained_scdet.cell_types)
    novelty = out.obs[f"{KEY}_novelty"].to_numpy()[q]
    assert roc_auc_score(novel, novelty) > 0.95
    calls = out.obs[KEY].astype(str).to_numpy()[q]
    predicted = out.obs[f"{KEY}_prediction"].astype(str).to_numpy()[q]
    # a call of one of scDET's novel classes is never turned into Unassigned by the layer
    own_novel = np.char.startswith(predicted.astype(str), "novel_")
    assert (calls[own_novel] == predicted[own_novel]).all()
    assert out.uns[KEY]["rejection"]["n_novel_groups"] == 0  # scDET forms its own


def test_annotate_writes_exactly_the_documented_fields(trained_scdet, tmp_path):
    adata = trained_scdet.adata
    obs_before, obsm_before, uns_before = set(adata.obs), set(adata.obsm), set(adata.uns)
    labels_before = adata.obs["cell_type"].copy()
    out = trained_scdet.annotate(copy=True)

    assert set(out.obs) - obs_before == {
        KEY,
        f"{KEY}_prediction",
        f"{KEY}_confidence",
        f"{KEY}_rejected",
        f"{KEY}_novelty",
    }
    assert set(out.obsm) - obsm_before == {f"{KEY}_probabilities", f"X_{KEY}"}
    assert set(out.uns) - uns_before == {KEY}
    assert set(adata.obs) == obs_before
    pd.testing.assert_series_equal(out.obs["cell_type"], labels_before)

    seen = trained_scdet.cell_types
    assert seen == ["type_0", "type_1", "type_2"]
    classes = [*seen, f"{NOVEL_PREFIX}0", f"{NOVEL_PREFIX}1"]
    assert trained_scdet.output_classes == classes
    assert list(out.obs[KEY].cat.categories) == [*classes, UNASSIGNED]
    assert list(out.obs[f"{KEY}_prediction"].cat.categories) == classes
    assert out.obs[f"{KEY}_confidence"].dtype == np.float32
    assert out.obs[f"{KEY}_rejected"].dtype == bool
    paper = trained_scdet.annotate(copy=True, rejection="paper")
    assert not paper.obs[f"{KEY}_rejected"].any()  # the paper's rule assigns every cell
    np.testing.assert_array_equal(
        paper.obs[KEY].astype(str), paper.obs[f"{KEY}_prediction"].astype(str)
    )
    probs = out.obsm[f"{KEY}_probabilities"]
    assert isinstance(probs, pd.DataFrame)
    assert list(probs.columns) == classes
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(probs.max(axis=1), out.obs[f"{KEY}_confidence"], rtol=1e-6)
    assert (probs.idxmax(axis=1) == out.obs[f"{KEY}_prediction"].astype(str)).all()
    embedding = out.obsm[f"X_{KEY}"]
    assert embedding.shape == (out.n_obs, 128)
    assert embedding.dtype == np.float32
    np.testing.assert_allclose(embedding, trained_scdet.get_latent_representation(), atol=1e-5)

    uns = out.uns[KEY]
    assert uns["method"] == "SCDET"
    assert uns["rejection"]["rule"] == "openset"
    assert paper.uns[KEY]["rejection"] == {"rule": "none"}
    assert list(uns["classes"]) == classes
    assert list(uns["seen_types"]) == seen
    assert list(uns["novel_groups"]) == classes[3:]
    assert uns["n_novel"] == 2
    assert not uns["n_novel_estimated"]
    assert len(uns["class_distribution"]) == len(classes)
    assert uns["class_distribution"].sum() == pytest.approx(1.0)
    assert uns["training"]["estimation_epochs"].tolist() == [0, 5, 10, 15, 20, 25]
    out.write_h5ad(tmp_path / "annotated.h5ad")
    back = ad.read_h5ad(tmp_path / "annotated.h5ad")
    np.testing.assert_array_equal(back.obs[KEY], out.obs[KEY])
    assert back.uns[KEY]["n_novel"] == 2


def test_rejection_rules_and_unregistered_query(trained_scdet, scdet_pair):
    out = trained_scdet.annotate(copy=True, rejection=0.9)
    confidence = out.obs[f"{KEY}_confidence"].to_numpy()
    rejected = out.obs[f"{KEY}_rejected"].to_numpy()
    np.testing.assert_array_equal(rejected, confidence < 0.9)
    assert (out.obs[KEY][rejected] == UNASSIGNED).all()
    trained_scdet.annotate(out, key_added="pt", rejection="per_type")
    assert list(out.uns["pt"]["rejection"]["types"]) == trained_scdet.output_classes
    assert len(out.uns["pt"]["rejection"]["thresholds"]) == len(trained_scdet.output_classes)

    # the query alone, genes reversed, goes through the shared query path
    query = scdet_pair[1].copy()
    other = trained_scdet.annotate(query[:, ::-1].copy(), copy=True)
    registered = trained_scdet.predict(soft=True)[_query(trained_scdet.adata)]
    np.testing.assert_allclose(
        other.obsm[f"{KEY}_probabilities"].to_numpy(), registered.to_numpy(), atol=1e-5
    )


def test_save_load_identical_predictions(trained_scdet, scdet_pair, tmp_path):
    query = scdet_pair[1].copy()
    before = trained_scdet.predict(query, soft=True)
    trained_scdet.save(tmp_path / "model")
    loaded = lt.SCDET.load(tmp_path / "model")
    pd.testing.assert_frame_equal(loaded.predict(query, soft=True), before)
    torch.testing.assert_close(
        loaded.module.class_distribution, trained_scdet.module.class_distribution
    )
    reloaded = lt.SCDET.load(tmp_path / "model", adata=trained_scdet.adata.copy())
    pd.testing.assert_frame_equal(reloaded.predict(query, soft=True), before)


def test_estimated_number_of_novel_types(estimated_scdet, scdet_pair, tmp_path):
    model = estimated_scdet
    assert model.n_novel == 2
    estimate = model.n_novel_estimate_
    assert estimate["n_novel"] == 2
    assert estimate["warmup_epochs"] == 50
    assert estimate["n_unexplained"] >= 100  # 160 novel query cells
    out = model.annotate(copy=True, rejection="paper")
    assert out.uns[KEY]["n_novel_estimated"]
    assert out.uns[KEY]["n_novel_estimate"]["n_novel"] == 2
    report = _report(model, out)
    assert report["seen_accuracy"] >= 0.9, report
    assert report["novel_accuracy"] >= 0.6, report
    # the model was created with n_novel=None: loading must resize the classifier
    query = scdet_pair[1].copy()
    before = model.predict(query, soft=True)
    model.save(tmp_path / "estimated")
    loaded = lt.SCDET.load(tmp_path / "estimated")
    assert loaded.module.n_classes == 5
    pd.testing.assert_frame_equal(loaded.predict(query, soft=True), before)


def test_distribution_estimation_runs_every_m_epochs(scdet_adata):
    scvi.settings.seed = 0
    adata = scdet_adata.copy()
    lt.SCDET.setup_anndata(adata, labels_key="cell_type")
    model = lt.SCDET(adata, n_novel=2, n_top_genes=None)
    spy = DistributionEstimation(3)
    model.train(max_epochs=7, callbacks=[spy], **{**FAST, "estimation_interval": 2})
    # the model's own estimation: before epochs 0, 2, 4 and 6 (never after the last epoch)
    assert model.training_summary_["estimation_epochs"] == [0, 2, 4, 6]
    assert model.distribution_["epochs"] == [0, 2, 4, 6]
    assert spy.epochs == [0, 3, 6]
    last = np.asarray(model.distribution_["distributions"][-1])
    np.testing.assert_allclose(model.module.class_distribution.numpy(), last, rtol=1e-6)
    np.testing.assert_allclose(last.sum(), 1.0)
    assert model.distribution_["changed"][0] is None
    assert all(0.0 <= c <= 1.0 for c in model.distribution_["changed"][1:])
    assert model.training_summary_["epochs_trained"] == 7


def test_label_stability_stops_training(scdet_adata):
    scvi.settings.seed = 0
    adata = scdet_adata.copy()
    lt.SCDET.setup_anndata(adata, labels_key="cell_type")
    model = lt.SCDET(adata, n_novel=2, n_top_genes=None)
    model.train(
        max_epochs=20,
        **{
            **FAST,
            "estimation_interval": 2,
            "early_stopping": True,
            "early_stopping_tol": 0.999999,
            "early_stopping_patience": 2,
            "early_stopping_min_epochs": 0,
        },
    )
    # estimations at 0, 2, 4: changed fractions at 2 and 4 are both "stable" -> stop before 4
    assert model.distribution_["stopped_epoch"] == 4
    assert model.training_summary_["early_stopped"]
    assert model.training_summary_["epochs_trained"] == 4


@pytest.mark.parametrize(
    ("n_cells", "n_changed", "stops"),
    [(200, 4, True), (200, 5, False), (2_000, 9, True), (2_000, 10, False)],
    ids=["4-of-200", "5-of-200", "9-of-2000", "10-of-2000"],
)
def test_label_stability_counts_a_few_changed_cells_as_stable(
    monkeypatch, n_cells, n_changed, stops
):
    """Stable: fewer than ``stop_tol`` (0.5%) of the cells or fewer than 5 cells changed."""
    callback = DistributionEstimation(2, stop_tol=0.005, stop_patience=2)

    monkeypatch.setattr(callback, "_estimate", lambda *_: n_changed / n_cells)
    splitter = SimpleNamespace(
        adata_manager=None, ref_train_idx=np.arange(n_cells), query_idx=np.arange(0)
    )
    trainer = SimpleNamespace(
        current_epoch=1, max_epochs=20, should_stop=False, datamodule=splitter
    )
    for epoch in (1, 3):  # estimations before epochs 2 and 4
        trainer.current_epoch = epoch
        callback.on_train_epoch_end(trainer, None)
    assert trainer.should_stop is stops
    assert callback.stopped_epoch == (4 if stops else None)


@pytest.mark.parametrize(
    ("n_cells", "expected"),
    [
        (1_000, (500, 10, 50, 100)),
        (20_000, (500, 10, 50, 100)),
        (200_000, (50, 1, 5, 10)),
        (2_000_000, (5, 1, 1, 1)),
    ],
)
def test_default_budget_shrinks_with_the_cells_and_the_schedules_with_it(n_cells, expected):
    from types import SimpleNamespace

    names = ("max_epochs", "estimation_interval", "warmup_epochs", "early_stopping_min_epochs")
    model = SimpleNamespace(adata=SimpleNamespace(n_obs=n_cells))
    arguments = dict.fromkeys(names)
    lt.SCDET._prepare_training(model, arguments, {})
    assert tuple(arguments[n] for n in names) == expected
    # what the user sets stays; an explicit max_epochs keeps the paper's schedules
    arguments = {**dict.fromkeys(names), "warmup_epochs": 7}
    lt.SCDET._prepare_training(model, arguments, {})
    assert arguments["warmup_epochs"] == 7
    arguments = {**dict.fromkeys(names), "max_epochs": 30}
    lt.SCDET._prepare_training(model, arguments, {})
    assert tuple(arguments[n] for n in names) == (30, 10, 50, 100)


def test_module_shapes_and_plan_defaults_follow_the_paper():
    module = SCDETModule(
        n_input=50, n_labels=3, n_novel=2, feature_idx=range(50), input_type="counts"
    )
    linear = [m.out_features for m in module.encoder.modules() if isinstance(m, torch.nn.Linear)]
    assert linear == [512, 256, 128]
    linear = [m.out_features for m in module.decoder.modules() if isinstance(m, torch.nn.Linear)]
    assert linear == [256, 512, 50]
    assert module.prototypes.shape == (5, 128)
    assert module.classifier_head[0].out_features == 128
    assert [m.out_features for m in module.projector if isinstance(m, torch.nn.Linear)] == [
        128,
        128,
    ]
    torch.testing.assert_close(module.class_distribution, torch.full((5,), 0.2))
    plan = SCDETTrainingPlan(module)
    optimizer = plan.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.defaults["lr"] == 1e-4
    options = plan.config
    assert options == SCDETLossConfig()
    assert options.lambda_cls == options.lambda_con == 1.0
    assert options.rho == options.gamma == options.alpha == options.beta == 0.5
    assert options.contrastive_temperature == 1.0
    # departure from eq. 5 (documented): the regulariser acts on the target's mean prediction
    assert options.regularise == "target"
    with pytest.raises(ValueError, match="regularise must be one of 'target', 'all'"):
        SCDETLossConfig(regularise="both")

    module.set_n_novel(4)
    assert module.prototypes.shape == (7, 128)
    assert module.class_distribution.shape == (7,)
    assert module.target_distribution.shape == (7,)

    x = torch.poisson(torch.full((8, 50), 3.0))
    out = module.inference(x)
    assert out["z"].shape == (8, 128)
    assert out["logits"].shape == (8, 7)
    assert torch.allclose(out["v"].norm(dim=1), torch.ones(8))
    # logits are cosine similarities / tau
    assert out["logits"].abs().max() <= 1.0 / module.temperature + 1e-5

    # predictions use the post-hoc logit adjustment of eq. 7 once a training plan set gamma
    module.eval()
    pi = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.02, 0.02, 0.01])
    module.class_distribution.copy_(pi)
    raw = module.inference(x)["logits"]
    assert module.logit_adjustment == 0  # before training: the raw logits
    torch.testing.assert_close(raw, module.logits_from_latent(module.inference(x)["z"]))
    plan = SCDETTrainingPlan(module, config=SCDETLossConfig(gamma=0.5))
    plan.on_train_start()
    torch.testing.assert_close(module.inference(x)["logits"], raw - 0.5 * pi.log())
    # the rarest class gains the most: its log-odds against the most frequent one rise
    # by gamma * log(0.5 / 0.01)
    gain = (module.inference(x)["logits"] - raw)[:, 6] - (module.inference(x)["logits"] - raw)[
        :, 0
    ]
    torch.testing.assert_close(gain, torch.full((8,), 0.5 * math.log(50.0)))
    assert "logit_adjustment" in module.state_dict()  # saved with the model


def test_loss_terms_are_finite_and_sampling_applies():
    torch.manual_seed(0)
    module = SCDETModule(
        n_input=30, n_labels=3, n_novel=2, feature_idx=range(30), input_type="counts"
    )
    module.class_distribution.copy_(torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05]))
    reference = {"X": torch.poisson(torch.full((16, 30), 5.0)), "labels": torch.arange(16) % 3}
    query = {"X": torch.poisson(torch.full((12, 30), 5.0)), "labels": torch.full((12,), 3)}
    module.train()
    output = module.loss(reference, query=query, config=SCDETLossConfig())
    assert torch.isfinite(output.loss)
    metrics = output.extra_metrics
    assert 0 < metrics["sampled_fraction"] <= 1
    everything = module.loss(reference, query=query, config=SCDETLossConfig(alpha=0.0, beta=0.0))
    assert everything.extra_metrics["sampled_fraction"] == 1.0
    for name in ("self_training_loss", "regularisation_loss", "soft_contrastive_loss"):
        assert metrics[name] > 0, name
    output.loss.backward()
    assert module.prototypes.grad is not None
    warm = module.loss(reference, query=query, config=SCDETLossConfig(warmup=True))
    assert warm.extra_metrics["self_training_loss"] == 0
    assert warm.extra_metrics["soft_contrastive_loss"] == 0
    # a labelled minibatch must not contain unlabelled cells
    with pytest.raises(ValueError, match="unlabelled"):
        module.loss(
            {**reference, "labels": torch.full((16,), 3)}, query=query, config=SCDETLossConfig()
        )


def test_held_out_reference_cells_in_the_target_stay_out_of_the_distribution_match():
    torch.manual_seed(0)
    module = SCDETModule(
        n_input=30, n_labels=3, n_novel=2, feature_idx=range(30), input_type="counts"
    )
    module.class_distribution.copy_(torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05]))
    module.eval()  # no dropout or batch-norm updates: the two losses see the same network
    reference = {"X": torch.poisson(torch.full((16, 30), 5.0)), "labels": torch.arange(16) % 3}
    target = {"X": torch.poisson(torch.full((12, 30), 5.0)), "labels": torch.full((12,), 3)}
    held_out = {"X": torch.poisson(torch.full((6, 30), 9.0)), "labels": torch.arange(6) % 3}
    mixed = {key: torch.cat([target[key], held_out[key]]) for key in target}
    config = SCDETLossConfig(regularise="target", noise_sd=0.0, mask_rate=0.0)

    def regulariser(query):
        torch.manual_seed(1)
        return module.loss(reference, query=query, config=config).extra_metrics[
            "regularisation_loss"
        ]

    torch.testing.assert_close(regulariser(mixed), regulariser(target))
    assert regulariser(held_out) == 0  # no target cell in the minibatch
    # the held-out cells still get the target's self-training
    assert (
        module.loss(reference, query=held_out, config=config).extra_metrics["self_training_loss"]
        > 0
    )


def test_feature_cells_selects_the_genes_on_the_reference_or_on_all_cells(scdet_adata):
    adata = scdet_adata.copy()
    lt.SCDET.setup_anndata(adata, labels_key="cell_type")
    reference = (adata.obs["lt_role"] == "reference").to_numpy()
    for cells, mask in (("all", None), ("reference", reference)):
        model = lt.SCDET(adata, n_novel=1, n_top_genes=20, feature_cells=cells)
        expected = adata.var_names[lt.data.select_features(adata, n_top_genes=20, mask=mask)]
        assert list(model.module.feature_idx.numpy()) == [
            adata.var_names.get_loc(g) for g in expected
        ]
    on_all = lt.SCDET(adata, n_novel=1, n_top_genes=20).module.feature_idx
    on_reference = lt.SCDET(adata, n_top_genes=20, feature_cells="reference").module.feature_idx
    assert not torch.equal(on_all, on_reference)  # the target's novel types change the choice
    with pytest.raises(ValueError, match="feature_cells must be one of 'all', 'reference'"):
        lt.SCDET(adata, feature_cells="target")


def test_bad_input_raises(scdet_adata, scdet_pair):
    adata = scdet_adata.copy()
    lt.SCDET.setup_anndata(adata, labels_key="cell_type")
    for bad in (-1, 1.5, "two", True):
        with pytest.raises(ValueError, match="n_novel must be a non-negative integer"):
            lt.SCDET(adata, n_novel=bad)
    with pytest.raises(ValueError, match="max_novel"):
        lt.SCDET(adata, max_novel=0)
    with pytest.raises(ValueError, match="confidence_threshold"):
        lt.SCDET(adata, confidence_threshold=2.0)
    with pytest.raises(ValueError, match="not genes"):
        lt.SCDET(adata, features=["gene_0", "no_such_gene"])
    model = lt.SCDET(adata, n_novel=1, n_top_genes=None)
    with pytest.raises(ValueError, match=r"rho must be a number in \[0, 1\], got 2.0"):
        model.train(max_epochs=1, plan_kwargs={"rho": 2.0}, **FAST)
    with pytest.raises(ValueError, match="max_epochs"):
        model.train(max_epochs=0, **FAST)
    with pytest.raises(ValueError, match="pseudo_labels must be one of None, True, False"):
        model.train(max_epochs=1, pseudo_labels="yes", **FAST)
    with pytest.raises(RuntimeError, match="not been trained|train"):
        model.predict()

    # reference only: novel classes need target cells (a reference model has none)
    ref = scdet_pair[0].copy()
    lt.SCDET.setup_anndata(ref, labels_key="cell_type")
    ref_model = lt.SCDET(ref, n_novel=1, n_top_genes=None)
    with pytest.raises(ValueError, match="n_novel=1 novel classes are learned from target"):
        ref_model.train(max_epochs=1, **FAST)


def test_pseudo_labels_are_trained_only_with_novel_classes(scdet_adata, trained_scdet):
    """Without novel classes the target is trained with the representation objective alone."""

    def self_training_loss(model) -> float:
        return float(model.history["train_self_training_loss"].iloc[-1, 0])

    assert trained_scdet.training_summary_["pseudo_labels"] is True
    assert self_training_loss(trained_scdet) > 0
    for pseudo_labels, expected in ((None, False), (True, True)):
        scvi.settings.seed = 0
        adata = scdet_adata.copy()
        lt.SCDET.setup_anndata(adata, labels_key="cell_type", unlabeled_category="Unknown")
        model = lt.SCDET(adata, n_novel=0, n_top_genes=None)
        model.train(max_epochs=3, pseudo_labels=pseudo_labels, **FAST)
        assert model.training_summary_["pseudo_labels"] is expected
        assert (self_training_loss(model) > 0) is expected
        assert (float(model.history["train_soft_contrastive_loss"].iloc[-1, 0]) > 0) is expected
        # the reference cross-entropy and the contrastive loss on all cells are trained either way
        assert float(model.history["train_unsupervised_contrastive_loss"].iloc[-1, 0]) > 0
    # switched off for a model with novel classes: they stay untrained, and it says so
    adata = scdet_adata.copy()
    lt.SCDET.setup_anndata(adata, labels_key="cell_type", unlabeled_category="Unknown")
    model = lt.SCDET(adata, n_novel=2, n_top_genes=None)
    with pytest.warns(UserWarning, match="pseudo_labels=False leaves the 2 novel class"):
        model.train(max_epochs=1, pseudo_labels=False, **FAST)
    assert model.training_summary_["pseudo_labels"] is False


def test_same_seed_same_predictions(scdet_adata):
    """Views, k-means estimation, sampling and the split all follow scvi.settings.seed."""

    def fit(seed: int) -> pd.DataFrame:
        scvi.settings.seed = seed
        adata = scdet_adata.copy()
        lt.SCDET.setup_anndata(adata, labels_key="cell_type", unlabeled_category="Unknown")
        model = lt.SCDET(adata, n_novel=2, n_top_genes=None)
        model.train(max_epochs=6, **{**FAST, "estimation_interval": 3})
        return model.predict(soft=True)

    first = fit(3)
    pd.testing.assert_frame_equal(first, fit(3))
    assert not np.allclose(first.to_numpy(), fit(4).to_numpy())


def test_novel_class_check_compares_the_reference_coverage_of_both_sides():
    partnered = np.array([True] * 8 + [False] * 2 + [True] * 3 + [False] * 7)
    novel = np.array([False] * 10 + [True] * 10)
    check = novel_class_check(partnered, novel)
    assert check["novel_cells"] == 10
    assert check["partnered_seen"] == pytest.approx(0.8)
    assert check["partnered_novel"] == pytest.approx(0.3)
    assert check["passed"]
    # a novel class covered as well as the seen calls fails, and one just inside the margin too
    assert not novel_class_check(np.ones(20, dtype=bool), novel)["passed"]
    partnered[10:20] = [True] * 8 + [False] * 2
    assert not novel_class_check(partnered, novel)["passed"]  # 0.8 - 0.8 < COVERAGE_MARGIN
    partnered[17] = False
    assert novel_class_check(partnered, novel)["passed"]  # 0.8 - 0.7 >= COVERAGE_MARGIN
    # nothing to compare: no cell in a novel class, or none called a seen type
    empty = novel_class_check(partnered, np.zeros(20, dtype=bool))
    assert empty["passed"]
    assert empty["partnered_novel"] is None
    assert empty["novel_cells"] == 0
    assert novel_class_check(partnered, np.ones(20, dtype=bool))["passed"]


def test_planted_novel_types_pass_the_novel_class_check(trained_scdet):
    check = trained_scdet.training_summary_["novel_class_check"]
    assert check["passed"]
    assert "refitted" not in check
    assert check["partnered_seen"] - check["partnered_novel"] >= COVERAGE_MARGIN
    assert trained_scdet.module.n_novel == 2


def test_novel_class_without_a_new_type_is_refitted_without_it(tmp_path):
    """No type is new: the novel class absorbs a seen type, and scDET trains again without it."""
    ref, query = lt.data.synthetic(
        n_reference=400, n_query=400, n_genes=200, n_types=3, n_novel=0, batch_shift=0.3, seed=1
    )
    adata = lt.data.concat_reference_query(ref, query, labels_key="cell_type")
    lt.SCDET.setup_anndata(adata, labels_key="cell_type", unlabeled_category="Unknown")
    scvi.settings.seed = 0
    model = lt.SCDET(adata, n_novel=1, n_top_genes=None)
    with pytest.warns(UserWarning, match="pseudo-labels did not find a new type"):
        model.train(max_epochs=30, **FAST)
    check = model.training_summary_["novel_class_check"]
    assert check["refitted"]
    assert not check["passed"]
    assert check["novel_cells"] >= 100  # measured: 211 of the 400 query cells
    assert check["partnered_seen"] - check["partnered_novel"] < COVERAGE_MARGIN
    assert model.module.n_novel == 0
    assert model.n_novel == 0
    assert model.novel_groups == []
    assert model.training_summary_["pseudo_labels"] is False
    out = model.annotate(copy=True, rejection="paper")
    q = _query(out)
    truth = out.obs["cell_type_original"].astype(str).to_numpy()[q]
    assert (out.obs[KEY].astype(str).to_numpy()[q] == truth).mean() >= 0.9
    assert out.uns[KEY]["training"]["novel_class_check"]["refitted"]
    assert out.uns[KEY]["n_novel"] == 0
    # the refitted classifier (3 classes, created with n_novel=1) survives save and load
    before = model.predict(query, soft=True)
    model.save(tmp_path / "refitted")
    loaded = lt.SCDET.load(tmp_path / "refitted")
    assert loaded.module.n_classes == 3
    pd.testing.assert_frame_equal(loaded.predict(query, soft=True), before)
    # pseudo_labels=True asks for the paper's training: no check, the novel class stays
    scvi.settings.seed = 0
    model = lt.SCDET(adata, n_novel=1, n_top_genes=None)
    model.train(max_epochs=3, pseudo_labels=True, **FAST)
    assert "novel_class_check" not in model.training_summary_
    assert model.module.n_novel == 1
