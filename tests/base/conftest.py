"""Fixtures shared by the on-disk query tests (backed h5ad and zarr)."""

from __future__ import annotations

import pytest
import scvi

import labeltransfer as lt


@pytest.fixture(scope="module")
def model_and_query(synthetic_pair):
    """A JIND trained 3 epochs on the synthetic reference, and the synthetic query."""
    scvi.settings.seed = 0
    ref, query = synthetic_pair
    ref = ref.copy()
    lt.JIND.setup_anndata(ref, labels_key="cell_type")
    model = lt.JIND(ref, n_top_genes=100)
    model.train(max_epochs=3, enable_progress_bar=False, accelerator="cpu")
    return model, query
