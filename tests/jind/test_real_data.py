"""JIND on the small real data sets in ../shared/data (the acceptance checks of the paper's claims)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scvi

import labeltransfer as lt


def _fit(reference: ad.AnnData, **train_kwargs) -> lt.JIND:
    scvi.settings.seed = 0
    lt.JIND.setup_anndata(reference, labels_key="cell_type")
    model = lt.JIND(reference)
    model.train(enable_progress_bar=False, accelerator="cpu", **train_kwargs)
    return model


def test_cellbench_celseq_to_dropseq(shared_data):
    adata = ad.read_h5ad(shared_data / "cellbench_3cl.h5ad")
    reference = adata[adata.obs["batch"] == "CEL-seq2"].copy()
    query = adata[adata.obs["batch"] == "Drop-seq"].copy()
    model = _fit(reference)
    model.annotate(query)
    report = lt.metrics.annotation_report(query, "cell_type", "jind")
    assert report["raw_accuracy"] >= 0.98
    assert report["rejection_rate"] <= 0.1


def test_rejection_rate_without_batch_shift(kang):
    ctrl = kang[kang.obs["batch"] == "ctrl"].copy()
    is_query = np.random.default_rng(0).random(ctrl.n_obs) < 0.3
    reference, query = ctrl[~is_query].copy(), ctrl[is_query].copy()
    model = _fit(reference)
    model.annotate(query)
    report = lt.metrics.annotation_report(query, "cell_type", "jind")
    assert 0.02 <= report["rejection_rate"] <= 0.10
    assert report["effective_accuracy"] >= report["raw_accuracy"]
    assert report["raw_accuracy"] >= 0.85


@pytest.mark.parametrize("theta", [0.05, 0.2])
def test_theta_controls_rejection_on_held_out_reference(kang, theta):
    ctrl = kang[kang.obs["batch"] == "ctrl"].copy()
    model = _fit(ctrl, max_epochs=10)
    thresholds = model.rejection_thresholds(theta).to_numpy()
    conf, pred = model.validation_["confidence"], model.validation_["prediction"]
    assert (conf < thresholds[pred]).mean() == pytest.approx(theta, abs=0.03)
