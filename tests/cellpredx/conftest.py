from __future__ import annotations

import warnings

import mudata as md
import pytest
import scvi

import labeltransfer as lt

#: Short training for the tests; the paper's iteration budgets are exercised by the benchmarks.
EPOCHS = 30


def make_mudata(rna, atac) -> md.MuData:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return md.MuData({"rna": rna.copy(), "atac": atac.copy()})


@pytest.fixture(scope="session")
def unpaired_pair():
    """Unpaired RNA reference and ATAC query (different cells) of a synthetic multiome task."""
    return lt.data.synthetic_multiome(
        n_cells=600, n_genes=300, n_background_peaks=400, paired=False, seed=0
    )


@pytest.fixture(scope="session")
def trained_unpaired(unpaired_pair):
    """CellPredX trained once per session through setup_mudata on the unpaired MuData."""
    scvi.settings.seed = 0
    mdata = make_mudata(*unpaired_pair)
    lt.CellPredX.setup_mudata(mdata, labels_key="cell_type")
    model = lt.CellPredX(mdata)
    model.train(max_epochs=EPOCHS, enable_progress_bar=False, accelerator="cpu")
    return model, mdata
