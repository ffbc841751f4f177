"""Issue 14: the models that train on the query too do not collapse under a strong shift."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

import labeltransfer as lt

FAST = {"accelerator": "cpu", "enable_progress_bar": False}


@pytest.fixture(scope="module")
def cellbench_strongshift(shared_data):
    """CellBench CEL-seq2 -> Drop-seq, the query through ``lt.data.strong_shift`` (seed 0)."""
    adata = ad.read_h5ad(shared_data / "cellbench_3cl.h5ad")
    reference = adata[adata.obs["batch"] == "CEL-seq2"].copy()
    query = lt.data.strong_shift(adata[adata.obs["batch"] == "Drop-seq"].copy(), seed=0)
    truth = query.obs["cell_type"].astype(str).to_numpy()
    query.obs = query.obs[["batch"]]
    return reference, query, truth


@pytest.mark.parametrize(
    ("model_cls", "init", "epochs"),
    [(lt.SCNYM, {}, 25), (lt.SCDET, {"n_novel": 0}, 25), (lt.CellPredX, {}, 40)],
    ids=["SCNYM", "SCDET", "CellPredX"],
)
def test_co_trained_models_beat_chance_widely_on_a_strongly_shifted_query(
    cellbench_strongshift, model_cls, init, epochs
):
    """Three balanced types (chance 0.33); a logistic regression keeps about 0.94.

    Before the query's own batch-norm statistics and CellPredX's lower sparse-center weight,
    seed 0 gave scNym 0.41 (one type for every cell), CellPredX 0.59 and scDET 0.65.
    """
    reference, query, truth = cellbench_strongshift
    adata = lt.data.concat_reference_query(reference.copy(), query.copy(), labels_key="cell_type")
    model_cls.setup_anndata(adata, labels_key="cell_type")
    model = model_cls(adata, **init)
    model.train(max_epochs=epochs, **FAST)
    is_query = (adata.obs["lt_role"] == "query").to_numpy()
    accuracy = (np.asarray(model.predict())[is_query] == truth).mean()
    assert accuracy >= 0.7


def test_a_query_shifted_beyond_a_translation_is_scaled_before_the_novelty_test(
    cellbench_strongshift,
):
    """Its cells are called right (0.96), so most must not be rejected as novel (93% were)."""
    reference, query, truth = cellbench_strongshift
    adata = lt.data.concat_reference_query(reference.copy(), query.copy(), labels_key="cell_type")
    lt.SCNYM.setup_anndata(adata, labels_key="cell_type")
    model = lt.SCNYM(adata)
    model.train(max_epochs=25, **FAST)
    with pytest.warns(UserWarning, match=r"no mutual nearest neighbour .* scaled to the refer"):
        model.annotate(key_added="lt")
    coverage = adata.uns["lt"]["rejection"]["coverage"]
    assert coverage["novel_fraction_before"] > 0.5
    assert coverage["novel_fraction_after"] < 0.2
    assert list(coverage["rescaled_domains"]) == [0]
    is_query = (adata.obs["lt_role"] == "query").to_numpy()
    assert adata.obs["lt_rejected"].to_numpy()[is_query].mean() < 0.25
    assert (adata.obs["lt_prediction"].astype(str).to_numpy()[is_query] == truth).mean() > 0.9
