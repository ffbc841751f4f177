"""Inference minibatches read straight from the registered matrix equal scvi's data loader's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import sparse

import labeltransfer as lt
from labeltransfer._constants import REGISTRY_KEYS
from labeltransfer.base._batches import ExpressionBatches


@pytest.mark.parametrize("storage", ["csr", "dense_float64"])
@pytest.mark.parametrize("rows", ["all", "shuffled"])
def test_batches_equal_the_data_loader(synthetic_pair, storage, rows):
    adata = synthetic_pair[0][:700].copy()
    if storage == "dense_float64":
        adata.X = adata.X.toarray().astype(np.float64)
    lt.JIND.setup_anndata(adata, labels_key="cell_type")
    model = lt.JIND(adata)
    indices = None if rows == "all" else np.random.default_rng(0).permutation(adata.n_obs)[:500]
    batches = model._batches(adata, indices, 128)
    assert isinstance(batches, ExpressionBatches)
    assert batches.matrix is adata.X
    ours = list(batches)
    theirs = list(model._make_data_loader(adata=adata, indices=indices, batch_size=128))
    n_rows = adata.n_obs if indices is None else indices.size
    assert len(ours) == len(theirs) == len(batches) == -(-n_rows // 128)
    for a, b in zip(ours, theirs, strict=True):
        assert a[REGISTRY_KEYS.X_KEY].dtype == torch.float32
        assert torch.equal(a[REGISTRY_KEYS.X_KEY], b[REGISTRY_KEYS.X_KEY])


def test_batches_never_share_the_callers_memory():
    """A module writing into its input cannot reach the caller's matrix."""
    matrix = np.ones((10, 4), dtype=np.float32)
    for batch in ExpressionBatches(matrix, batch_size=4):
        batch[REGISTRY_KEYS.X_KEY].zero_()
    csr = sparse.csr_matrix(matrix)
    for batch in ExpressionBatches(csr, batch_size=4):
        batch[REGISTRY_KEYS.X_KEY].zero_()
    assert matrix.min() == 1
    assert csr.toarray().min() == 1
