"""Every hyper-parameter is checked before any computation (issue 15, family 7).

An invalid constructor argument leaves no model; an invalid ``train()`` argument raises before
the first step that computes anything (each model's first such step is replaced here by a
function that fails the test), leaving the model untrained with its initial weights. The
messages name the owner, the argument, the value, the valid range and the default. The loss
hyper-parameters of scDET and CellPredX live in one configuration each (issue 16, point 3).
"""

from __future__ import annotations

import copy
import inspect
import math
import re
from dataclasses import FrozenInstanceError

import numpy as np
import pytest
import scvi
import torch

import labeltransfer as lt
from labeltransfer.cellpredx import PRESETS, CellPredXLossConfig, CellPredXModule
from labeltransfer.cellpredx import _model as cellpredx_model
from labeltransfer.scdet import SCDETLossConfig, SCDETModule, SCDETTrainingPlan
from labeltransfer.scnym import _model as scnym_model
from labeltransfer.train import AnnotationTrainingPlan
from labeltransfer.train._guards import (
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    UNIT,
    UNIT_OPEN,
    Flag,
    Genes,
    Number,
    OneOf,
    Widths,
    accepted_arguments,
    check_arguments,
    check_names,
)

TRAIN = {"accelerator": "cpu", "enable_progress_bar": False}


@pytest.fixture(scope="module")
def pair():
    return lt.data.synthetic(n_reference=120, n_query=80, n_genes=60, n_types=3, seed=0)


@pytest.fixture(scope="module")
def reference(pair):
    ref = pair[0].copy()
    lt.JIND.setup_anndata(ref, labels_key="cell_type")
    return ref


def _joint(pair, model_cls):
    adata = lt.data.concat_reference_query(pair[0], pair[1], labels_key="cell_type")
    model_cls.setup_anndata(adata, labels_key="cell_type", unlabeled_category="Unknown")
    return adata


@pytest.fixture(scope="module")
def scnym_adata(pair):
    return _joint(pair, lt.SCNYM)


@pytest.fixture(scope="module")
def scdet_adata(pair):
    return _joint(pair, lt.SCDET)


@pytest.fixture(scope="module")
def cellpredx_adata(pair):
    return _joint(pair, lt.CellPredX)


def _message(owner: str, name: str, rule: str, value) -> str:
    return f"{owner}: {name} must be {rule}, got {value!r}."


def _assert_message(err: pytest.ExceptionInfo, owner: str, name: str, rule: str, value) -> None:
    text = str(err.value)
    assert text.startswith(_message(owner, name, rule, value)), text
    assert text.endswith("(the default).") or text.endswith("Leave it out for the default."), text


# ----------------------------------------------------------------------------- constructors
INIT_CASES = [
    # (model, argument, value, rule)
    ("JIND", "theta", 1.0, "a number in [0, 1)"),
    ("JIND", "theta", -0.1, "a number in [0, 1)"),
    ("JIND", "dropout_rate", 1.0, "a number in [0, 1)"),
    ("JIND", "n_latent", 0, "a positive integer"),
    ("JIND", "n_hidden", 2.5, "a positive integer"),
    ("JIND", "class_weight_eps", 0.0, "a positive number"),
    ("JIND", "class_weight_eps", math.inf, "a positive number"),
    ("JIND", "n_top_genes", 0, "a positive integer or None"),
    ("JIND", "n_reference_codes", 0, "a positive integer"),
    ("JIND", "input_type", "raw", "one of 'auto', 'counts', 'lognorm', 'peaks'"),
    ("JIND", "calibrate", "yes", "True or False"),
    ("JIND", "features", "gene_0", str(Genes())),
    ("JIND", "features", [], str(Genes())),
    ("JIND", "features", ["gene_0", "gene_0"], str(Genes())),
    ("SCNYM", "n_hidden", 0, "a positive integer"),
    ("SCNYM", "n_layers", 0, "a positive integer"),
    ("SCNYM", "dropout_rate", -0.5, "a number in [0, 1)"),
    ("SCNYM", "pseudolabel_threshold", 1.5, "a number in [0, 1]"),
    ("SCNYM", "confidence_threshold", 1.5, "a number in [0, 1] or None"),
    ("SCNYM", "theta", 1.0, "a number in [0, 1)"),
    ("SCNYM", "new_identity_discovery", 1, "True or False"),
    ("SCDET", "n_novel", -1, "a non-negative integer or None"),
    ("SCDET", "n_novel", 1.5, "a non-negative integer or None"),
    ("SCDET", "max_novel", 0, "a positive integer"),
    ("SCDET", "n_hidden", (), str(Widths())),
    ("SCDET", "n_hidden", (512, 0), str(Widths())),
    ("SCDET", "n_latent", 0, "a positive integer"),
    ("SCDET", "temperature", 0.0, "a positive number"),
    ("SCDET", "theta", 0.0, "a number in (0, 1)"),
    ("SCDET", "theta", 1.0, "a number in (0, 1)"),
    ("SCDET", "confidence_threshold", 2.0, "a number in [0, 1] or None"),
    ("CellPredX", "preset", "rna_protein", str(OneOf(("auto", *PRESETS)))),
    ("CellPredX", "n_latent", 0, "a positive integer"),
    ("CellPredX", "n_hidden", 0, "a positive integer or None"),
    ("CellPredX", "theta", 1.0, "a number in [0, 1)"),
    ("CellPredX", "confidence_threshold", -0.1, "a number in [0, 1] or None"),
]


@pytest.mark.parametrize(
    ("model", "name", "value", "rule"),
    INIT_CASES,
    ids=[f"{m}-{n}={v!r}" for m, n, v, _ in INIT_CASES],
)
def test_invalid_constructor_argument_raises_naming_it(
    model, name, value, rule, reference, scnym_adata, scdet_adata, cellpredx_adata
):
    adata = {
        "JIND": reference,
        "SCNYM": scnym_adata,
        "SCDET": scdet_adata,
        "CellPredX": cellpredx_adata,
    }[model]
    before = adata.copy()
    with pytest.raises(ValueError, match=re.escape(f"{model}: {name} must be")) as err:
        getattr(lt, model)(adata, **{name: value})
    _assert_message(err, model, name, rule, value)
    assert adata.obs.equals(before.obs)
    assert adata.var.equals(before.var)


def test_theta_one_is_refused_when_jind_is_created(reference):
    # the case: it used to raise after training, leaving a model marked trained
    with pytest.raises(ValueError, match="theta") as err:
        lt.JIND(reference, theta=1.0)
    assert str(err.value) == (
        "JIND: theta must be a number in [0, 1), got 1.0. Pass e.g. theta=0.05 (the default)."
    )


# CellPredX's loss weights are checked once, by its loss configuration
CELLPREDX_LOSS_CASES = [
    ("cl_weight", -1.0, "a non-negative number"),
    ("fa_weight", math.nan, "a non-negative number"),
    ("sc_weight", -0.01, "a non-negative number"),
    ("pr_weight", -0.1, "a non-negative number"),
    ("temperature", 0.0, "a positive number"),
]


@pytest.mark.parametrize(("name", "value", "rule"), CELLPREDX_LOSS_CASES)
def test_invalid_cellpredx_loss_weight_raises_when_created(name, value, rule, cellpredx_adata):
    with pytest.raises(ValueError, match=re.escape(f"CellPredXLossConfig: {name}")) as err:
        lt.CellPredX(cellpredx_adata, **{name: value})
    _assert_message(err, "CellPredXLossConfig", name, rule, value)


# ----------------------------------------------------------------------------- train()
def _forbid(monkeypatch, module, name: str) -> None:
    """Replace a computing step of a model's train() by a failure of the test."""

    def computed(*args, **kwargs):
        raise AssertionError(f"train() reached {name} before refusing its arguments")

    monkeypatch.setattr(module, name, computed)


@pytest.fixture
def models(reference, scnym_adata, scdet_adata, cellpredx_adata, monkeypatch):
    scvi.settings.seed = 0
    built = {
        "JIND": lt.JIND(reference),
        "SCNYM": lt.SCNYM(scnym_adata),
        "SCDET": lt.SCDET(scdet_adata, n_top_genes=None),
        "SCDET_estimating": lt.SCDET(scdet_adata, n_novel=None, n_top_genes=None),
        "CellPredX": lt.CellPredX(cellpredx_adata),
    }
    # the template's first computing step is the data splitter (before scDET's n_novel
    # warm-up); CellPredX builds its query's kNN graph before it
    for model_cls in (lt.JIND, lt.SCNYM, lt.SCDET, lt.CellPredX):
        _forbid(monkeypatch, model_cls, "_splitter_cls")
    _forbid(monkeypatch, cellpredx_model, "query_knn_graph")
    return built


TRAIN_CASES = [
    # (model, train arguments, owner, argument, value, rule)
    ("JIND", {"max_epochs": 0}, "JIND.train", "max_epochs", 0, "a positive integer"),
    ("JIND", {"max_epochs": 2.5}, "JIND.train", "max_epochs", 2.5, "a positive integer"),
    ("JIND", {"batch_size": 0}, "JIND.train", "batch_size", 0, "a positive integer"),
    ("JIND", {"lr": 0.0}, "JIND.train", "lr", 0.0, "a positive number"),
    ("JIND", {"lr": math.nan}, "JIND.train", "lr", math.nan, "a positive number"),
    ("JIND", {"train_size": 0.0}, "JIND.train", "train_size", 0.0, "a number in (0, 1]"),
    ("JIND", {"train_size": 1.5}, "JIND.train", "train_size", 1.5, "a number in (0, 1]"),
    (
        "JIND",
        {"plan_kwargs": {"weight_decay": -1.0}},
        "plan_kwargs",
        "weight_decay",
        -1.0,
        "a non-negative number",
    ),
    ("SCNYM", {"lr": -1.0}, "SCNYM.train", "lr", -1.0, "a positive number"),
    ("SCNYM", {"weight_decay": -1e-4}, "SCNYM.train", "weight_decay", -1e-4, NON_NEGATIVE),
    ("SCNYM", {"early_stopping": "yes"}, "SCNYM.train", "early_stopping", "yes", Flag()),
    (
        "SCNYM",
        {"early_stopping_patience": -1},
        "SCNYM.train",
        "early_stopping_patience",
        -1,
        "a non-negative integer or None",
    ),
    ("SCNYM", {"max_epochs": 0}, "SCNYM.train", "max_epochs", 0, "a positive integer or None"),
    (
        "SCNYM",
        {"early_stopping_monitor": "validation_acc"},
        "SCNYM.train",
        "early_stopping_monitor",
        "validation_acc",
        OneOf(scnym_model.EARLY_STOPPING_METRICS),
    ),
    ("SCNYM", {"warmup_fraction": 1.5}, "SCNYM.train", "warmup_fraction", 1.5, UNIT),
    (
        "SCNYM",
        {"plan_kwargs": {"mixup_alpha": 0.0}},
        "SCNYMTrainingPlan",
        "mixup_alpha",
        0.0,
        POSITIVE,
    ),
    (
        "SCNYM",
        {"plan_kwargs": {"mask_rate": 1.0}},
        "SCNYMTrainingPlan",
        "mask_rate",
        1.0,
        UNIT_OPEN,
    ),
    (
        "SCNYM",
        {"plan_kwargs": {"temperature": 0.0}},
        "SCNYMTrainingPlan",
        "temperature",
        0.0,
        POSITIVE,
    ),
    (
        "SCNYM",
        {"plan_kwargs": {"adversary_max_weight": -0.1}},
        "SCNYMTrainingPlan",
        "adversary_max_weight",
        -0.1,
        NON_NEGATIVE,
    ),
    ("SCDET", {"max_epochs": -1}, "SCDET.train", "max_epochs", -1, "a positive integer or None"),
    ("SCDET", {"lr": 0.0}, "SCDET.train", "lr", 0.0, POSITIVE),
    (
        "SCDET",
        {"estimation_interval": 0},
        "SCDET.train",
        "estimation_interval",
        0,
        "a positive integer or None",
    ),
    (
        "SCDET",
        {"early_stopping_tol": 1.0},
        "SCDET.train",
        "early_stopping_tol",
        1.0,
        UNIT_OPEN,
    ),
    (
        "SCDET",
        {"early_stopping_patience": 0},
        "SCDET.train",
        "early_stopping_patience",
        0,
        POSITIVE_INT,
    ),
    (
        "SCDET",
        {"early_stopping_min_epochs": -1},
        "SCDET.train",
        "early_stopping_min_epochs",
        -1,
        "a non-negative integer or None",
    ),
    (
        "SCDET",
        {"warmup_epochs": 1.5},
        "SCDET.train",
        "warmup_epochs",
        1.5,
        "a non-negative integer or None",
    ),
    (
        "SCDET",
        {"estimation_cells": "both"},
        "SCDET.train",
        "estimation_cells",
        "both",
        "one of 'target', 'all'",
    ),
    ("SCDET", {"plan_kwargs": {"rho": 2.0}}, "SCDETLossConfig", "rho", 2.0, UNIT),
    ("SCDET", {"plan_kwargs": {"gamma": -0.5}}, "SCDETLossConfig", "gamma", -0.5, NON_NEGATIVE),
    ("SCDET", {"plan_kwargs": {"alpha": 1.5}}, "SCDETLossConfig", "alpha", 1.5, UNIT),
    ("SCDET", {"plan_kwargs": {"beta": -0.1}}, "SCDETLossConfig", "beta", -0.1, UNIT),
    (
        "SCDET",
        {"plan_kwargs": {"lambda_cls": -1.0}},
        "SCDETLossConfig",
        "lambda_cls",
        -1.0,
        NON_NEGATIVE,
    ),
    (
        "SCDET",
        {"plan_kwargs": {"pseudo_temperature": 0.0}},
        "SCDETLossConfig",
        "pseudo_temperature",
        0.0,
        POSITIVE,
    ),
    (
        "SCDET",
        {"plan_kwargs": {"mask_rate": 1.0}},
        "SCDETLossConfig",
        "mask_rate",
        1.0,
        UNIT_OPEN,
    ),
    (
        "SCDET",
        {"plan_kwargs": {"regularise": "both"}},
        "SCDETLossConfig",
        "regularise",
        "both",
        "one of 'target', 'all'",
    ),
    (
        "SCDET_estimating",
        {"plan_kwargs": {"rho": 2.0}},
        "SCDETLossConfig",
        "rho",
        2.0,
        UNIT,
    ),
    (
        "CellPredX",
        {"max_epochs": 0},
        "CellPredX.train",
        "max_epochs",
        0,
        "a positive integer or None",
    ),
    ("CellPredX", {"n_neighbors": 0}, "CellPredX.train", "n_neighbors", 0, POSITIVE_INT),
    ("CellPredX", {"n_pcs": 0}, "CellPredX.train", "n_pcs", 0, POSITIVE_INT),
    (
        "CellPredX",
        {"early_stopping_monitor": "validation_centre_loss"},
        "CellPredX.train",
        "early_stopping_monitor",
        "validation_centre_loss",
        OneOf(cellpredx_model.EARLY_STOPPING_METRICS),
    ),
    (
        "CellPredX",
        {"plan_kwargs": {"top_p": 0.0}},
        "CellPredXLossConfig",
        "top_p",
        0.0,
        "a number in (0, 1]",
    ),
    (
        "CellPredX",
        {"plan_kwargs": {"pseudo_label_quantile": 1.5}},
        "CellPredXLossConfig",
        "pseudo_label_quantile",
        1.5,
        UNIT,
    ),
    (
        "CellPredX",
        {"plan_kwargs": {"sc_weight": -1.0}},
        "CellPredXLossConfig",
        "sc_weight",
        -1.0,
        NON_NEGATIVE,
    ),
]


@pytest.mark.parametrize(
    ("model", "kwargs", "owner", "name", "value", "rule"),
    TRAIN_CASES,
    ids=[f"{c[0]}-{c[3]}={c[4]!r}" for c in TRAIN_CASES],
)
def test_invalid_train_argument_raises_before_training(
    models, model, kwargs, owner, name, value, rule
):
    instance = models[model]
    weights = copy.deepcopy(instance.module.state_dict())
    with pytest.raises(ValueError, match=re.escape(f"{owner}: {name} must be")) as err:
        instance.train(**kwargs, **TRAIN)
    _assert_message(err, owner, name, str(rule), value)
    assert instance.is_trained_ is False
    assert instance.history is None
    after = instance.module.state_dict()
    assert all(torch.equal(weights[k], after[k]) for k in weights)
    with pytest.raises(RuntimeError, match="train"):
        instance.predict()


NAME_CASES = [
    ("JIND", {"plan_kwargs": {"lrr": 1e-3}}, "unknown plan_kwargs ['lrr']", "Did you mean lr?"),
    (
        "SCNYM",
        {"plan_kwargs": {"mixup": 0.3}},
        "unknown plan_kwargs ['mixup']",
        "Did you mean mixup_alpha?",
    ),
    ("SCDET", {"plan_kwargs": {"rhoo": 0.5}}, "unknown plan_kwargs ['rhoo']", "Did you mean rho?"),
    (
        "CellPredX",
        {"plan_kwargs": {"top_k": 0.5}},
        "unknown plan_kwargs ['top_k']",
        "Did you mean top_p?",
    ),
    ("JIND", {"max_epoch": 3}, "unknown trainer argument(s) ['max_epoch']", "max_epochs"),
    (
        "SCDET_estimating",
        {"enable_progressbar": False},
        "unknown trainer argument(s)",
        "enable_progress_bar",
    ),
]


@pytest.mark.parametrize(
    ("model", "kwargs", "problem", "hint"),
    NAME_CASES,
    ids=[f"{c[0]}-{next(iter(c[1]))}" for c in NAME_CASES],
)
def test_misspelt_pass_through_names_raise_before_training(models, model, kwargs, problem, hint):
    instance = models[model]
    with pytest.raises(TypeError) as err:
        instance.train(**kwargs, **TRAIN)
    assert problem in str(err.value)
    assert hint in str(err.value)
    assert instance.is_trained_ is False


def test_scdet_estimate_needs_a_warm_up(models):
    with pytest.raises(ValueError, match="warmup_epochs") as err:
        models["SCDET_estimating"].train(warmup_epochs=0, **TRAIN)
    assert str(err.value) == (
        "SCDET.train: warmup_epochs must be a positive integer to estimate n_novel, got 0. "
        "Pass e.g. warmup_epochs=50, leave it out (50, fewer above 20,000 cells), or create "
        "the model with n_novel=<number of novel types>."
    )
    assert models["SCDET_estimating"].n_novel is None


@pytest.mark.parametrize(
    ("model_cls", "adata_fixture", "kwargs"),
    [
        (lt.SCNYM, "scnym_adata", {}),
        (lt.CellPredX, "cellpredx_adata", {"preset": "rna_atac_unmatched"}),
    ],
)
def test_early_stopping_metrics_are_the_logged_ones(model_cls, adata_fixture, kwargs, request):
    # the monitor check accepts exactly the names a training logs
    scvi.settings.seed = 0
    model = model_cls(request.getfixturevalue(adata_fixture), **kwargs)
    model.train(max_epochs=1, batch_size=64, **TRAIN)
    module = scnym_model if model_cls is lt.SCNYM else cellpredx_model
    assert set(module.EARLY_STOPPING_METRICS) <= set(model.history)


# ----------------------------------------------------------------------------- rules
@pytest.mark.parametrize(
    ("rule", "good", "bad", "text"),
    [
        (POSITIVE_INT, [1, np.int64(7)], [0, -1, 1.0, True, None, "1"], "a positive integer"),
        (POSITIVE, [1e-9, 3], [0, -1, math.nan, math.inf, False, None], "a positive number"),
        (NON_NEGATIVE, [0, 2.5], [-1e-9, math.nan, True], "a non-negative number"),
        (UNIT, [0, 1, 0.5], [-0.1, 1.1, math.nan], "a number in [0, 1]"),
        (UNIT_OPEN, [0, 0.99], [1, 1.0, -0.01], "a number in [0, 1)"),
        (
            Number(low=0, high=1, low_open=True, high_open=True, optional=True),
            [None, 0.5],
            [0, 1],
            "a number in (0, 1) or None",
        ),
        (Number(low=2), [2, 3.5], [1.9], "a number >= 2"),
        (OneOf(("a", "b")), ["a", "b"], ["c", None, 1, np.array(["a"])], "one of 'a', 'b'"),
        (Flag(), [True, False], [1, 0, "True", None], "True or False"),
        (Widths(), [(1,), [512, 256], np.array([3, 4])], [(), (0,), "12", (1.5,)], str(Widths())),
        (Genes(), [None, ["g1"], ("g1", "g2")], ["g1", [], ["g1", "g1"], 3], str(Genes())),
    ],
)
def test_rules_accept_their_range_only(rule, good, bad, text):
    assert str(rule) == text
    assert all(rule.accepts(v) for v in good)
    assert not any(rule.accepts(v) for v in bad)


def test_check_arguments_names_owner_value_range_and_default():
    def fit(*, rate: float = 0.25, size: int | None = None) -> None:
        """A function with defaults."""

    with pytest.raises(ValueError, match="rate") as err:
        check_arguments(fit, {"rate": 2.0, "size": None}, {"rate": UNIT, "size": POSITIVE_INT})
    assert str(err.value) == (
        "test_check_arguments_names_owner_value_range_and_default.<locals>.fit: rate must be "
        "a number in [0, 1], got 2.0. Pass e.g. rate=0.25 (the default)."
    )
    with pytest.raises(ValueError, match=re.escape("size must be a positive integer, got None.")):
        check_arguments(fit, {"size": None}, {"size": POSITIVE_INT})
    with pytest.raises(ValueError, match="lr") as err:
        check_arguments("plan_kwargs", {"lr": -1}, {"lr": POSITIVE})
    assert str(err.value) == (
        "plan_kwargs: lr must be a positive number, got -1. Leave it out for the default."
    )
    check_arguments(fit, {"rate": 0.5}, {"rate": UNIT, "absent": POSITIVE})  # absent: unchecked


def test_check_names_suggests_the_closest_accepted_name():
    with pytest.raises(TypeError) as err:
        check_names("plan_kwargs", {"lamda_cls": 1}, {"lambda_cls", "lambda_con"}, owner="X")
    assert str(err.value) == (
        "X: unknown plan_kwargs ['lamda_cls']. Check the spelling. Did you mean lambda_cls?"
    )
    with pytest.raises(TypeError, match="Accepted names: a, b."):
        check_names("options", ["zzz"], ["a", "b"], owner="X")
    check_names("options", None, ["a"], owner="X")
    assert {"lr", "weight_decay", "inference_kwargs", "optimizer"} <= accepted_arguments(
        AnnotationTrainingPlan
    )
    assert "module" not in accepted_arguments(AnnotationTrainingPlan)


# ----------------------------------------------------------------------------- one source
def test_scdet_loss_config_holds_the_papers_defaults():
    config = SCDETLossConfig()
    assert (config.lambda_cls, config.lambda_con, config.contrastive_temperature) == (1.0,) * 3
    assert config.rho == config.gamma == config.alpha == config.beta == 0.5
    assert config.regularise == "target"
    assert not config.warmup
    with pytest.raises(FrozenInstanceError):
        config.rho = 0.1
    with pytest.raises(TypeError):
        SCDETLossConfig(1.0)  # keyword-only: no silent positional mix-up
    module = SCDETModule(
        n_input=8, n_labels=2, n_novel=1, feature_idx=range(8), input_type="counts"
    )
    assert SCDETTrainingPlan(module).config == config


def test_cellpredx_loss_config_comes_from_the_preset(cellpredx_adata):
    model = lt.CellPredX(cellpredx_adata, preset="rna_atac_matched", sc_weight=0.2)
    assert model.loss_config == CellPredXLossConfig(
        cl_weight=0.06, fa_weight=0.05, sc_weight=0.2, temperature=0.04
    )
    assert model.loss_config.pr_weight == 0.1
    assert model.loss_weights_ == {
        "pr_weight": 0.1,
        "cl_weight": 0.06,
        "fa_weight": 0.05,
        "sc_weight": 0.2,
        "temperature": 0.04,
        "max_iterations": 3000,
    }
    with pytest.raises(TypeError):
        CellPredXLossConfig(cl_weight=0.1)  # the tuned four have no default outside a preset


@pytest.mark.parametrize("module_cls", [SCDETModule, CellPredXModule])
def test_module_loss_has_no_hyper_parameter_defaults(module_cls):
    parameters = inspect.signature(module_cls.loss).parameters
    defaults = {n: p.default for n, p in parameters.items() if p.default is not p.empty}
    assert set(defaults) == {"inference_outputs", "generative_outputs", "config", "query"}
    assert all(v is None for v in defaults.values())
