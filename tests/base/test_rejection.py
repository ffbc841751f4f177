from __future__ import annotations

import numpy as np
import pytest
from scipy.special import log_softmax

from labeltransfer.base import fit_temperature, per_type_thresholds
from labeltransfer.base._uns import h5ad_safe


def test_per_type_thresholds_by_hand():
    conf = np.array([0.9, 0.5, 0.7, 0.6, 0.99, 0.8])
    pred = np.array([0, 0, 0, 0, 1, 1])
    # type 0: confidences 0.5 0.6 0.7 0.9 -> 10% quantile = 0.5 + 0.3 * 0.1 = 0.53
    # type 1: 0.8 0.99 -> 0.8 + 0.1 * 0.19 = 0.819 ; type 2 never predicted -> 0
    thresholds = per_type_thresholds(conf, pred, 3, theta=0.1)
    np.testing.assert_allclose(thresholds, [0.53, 0.819, 0.0])
    assert (per_type_thresholds(conf, pred, 3, theta=0.0) == [0.5, 0.8, 0.0]).all()
    with pytest.raises(ValueError, match="theta"):
        per_type_thresholds(conf, pred, 3, theta=1.0)


def test_rejection_fraction_matches_theta_on_large_sample():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.3, 1.0, 20_000)
    pred = rng.integers(0, 4, 20_000)
    thresholds = per_type_thresholds(conf, pred, 4, theta=0.05)
    assert (conf < thresholds[pred]).mean() == pytest.approx(0.05, abs=0.002)


def test_temperature_recovers_overconfidence():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(size=(5000, 3)) * 2
    probs = np.exp(log_softmax(true_logits, axis=1))
    labels = np.array([rng.choice(3, p=p) for p in probs])
    temperature = fit_temperature(true_logits * 3.0, labels)  # logits 3x too sharp
    assert temperature == pytest.approx(3.0, rel=0.15)
    assert fit_temperature(np.zeros((0, 3)), np.zeros(0, int)) == 1.0
    # an under-confident model is sharpened back
    assert fit_temperature(true_logits / 3.0, labels) == pytest.approx(1 / 3, rel=0.15)
    # perfectly separated held-out cells (the NLL optimum would be T -> 0): sharpened only
    # until the mean confidence reaches the smoothed accuracy (n + 1) / (n + 2), never to 1
    separable = np.eye(3)[labels] * 5.0
    temperature = fit_temperature(separable, labels)
    confidence = np.exp(log_softmax(separable / temperature, axis=1)).max(axis=1)
    assert temperature < 1.0
    assert confidence.mean() == pytest.approx(5001 / 5002, abs=1e-6)
    # a model already that confident is not sharpened
    assert fit_temperature(np.eye(3)[labels[:10]] * 30.0, labels[:10]) == 1.0


def test_h5ad_safe():
    out = h5ad_safe(
        {"a": None, "b": (1, 2), "c": {"d": np.float32(1.5)}, 3: ["x", "y"], "e": [1, "x"]}
    )
    assert out["a"] == "None"
    assert list(out["b"]) == [1, 2]
    assert isinstance(out["c"]["d"], float)
    assert list(out["3"]) == ["x", "y"]
    assert out["e"] == {"0": 1, "1": "x"}


def test_diverged_training_is_reported_not_calibrated():
    import scvi
    import torch

    import labeltransfer as lt

    scvi.settings.seed = 0
    ref, _ = lt.data.synthetic(n_reference=120, n_query=10, n_genes=40, n_types=3, seed=0)
    lt.JIND.setup_anndata(ref, labels_key="cell_type")
    model = lt.JIND(ref)
    with torch.no_grad():
        next(model.module.parameters()).fill_(float("nan"))  # as a diverged optimiser leaves it
    with pytest.raises(RuntimeError, match="Training diverged: the JIND model's outputs"):
        model.train(max_epochs=1, accelerator="cpu", enable_progress_bar=False)
