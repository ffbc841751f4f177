from __future__ import annotations

import pytest
import scvi

import labeltransfer as lt

#: Short training for the tests; the paper's defaults (400 epochs, ramps of 100 and 20
#: epochs) are exercised by the benchmarks.
EPOCHS = 15


@pytest.fixture(scope="session")
def scnym_pair():
    """Reference and strongly shifted query (batch_shift=1.0) of a separable synthetic task."""
    return lt.data.synthetic(
        n_reference=600, n_query=400, n_genes=300, n_types=4, batch_shift=1.0, seed=1
    )


@pytest.fixture(scope="session")
def scnym_adata(scnym_pair):
    ref, query = scnym_pair
    return lt.data.concat_reference_query(ref, query, labels_key="cell_type", batch_key="batch")


@pytest.fixture(scope="session")
def trained_scnym(scnym_adata):
    """An scNym model trained once per session on reference + query (DESIGN workflow)."""
    scvi.settings.seed = 0
    adata = scnym_adata.copy()
    lt.SCNYM.setup_anndata(
        adata, labels_key="cell_type", unlabeled_category="Unknown", batch_key="batch"
    )
    model = lt.SCNYM(adata)
    model.train(max_epochs=EPOCHS, enable_progress_bar=False, accelerator="cpu")
    return model
