from __future__ import annotations

import os
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scvi

#: The small real data sets: ``../shared/data`` beside the clone, or $LABELTRANSFER_DATA (the
#: variable the tutorials read too).
SHARED_DATA = Path(
    os.environ.get("LABELTRANSFER_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
)


#: CI must run every real-data test: there a missing folder fails them instead of skipping.
IN_CI = os.environ.get("CI", "").lower() in ("true", "1")
MISSING_DATA = (
    f"the real data sets are not at {SHARED_DATA}: put the project's shared data in "
    "../shared/data beside the clone (or set LABELTRANSFER_DATA to their folder) to run this "
    "test"
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Skip the tests that read the real data sets when they are missing, except on CI.

    A test reads them through the ``shared_data`` fixture or carries the ``shared_data``
    marker (a tutorial that asks for the fixture at run time). A user's fresh clone has no
    ``../shared``: those tests skip with a reason that says where the data go.
    """
    skip = pytest.mark.skipif(not SHARED_DATA.is_dir() and not IN_CI, reason=MISSING_DATA)
    for item in items:
        if "shared_data" in getattr(item, "fixturenames", ()) or item.get_closest_marker(
            "shared_data"
        ):
            item.add_marker(skip)


def pytest_addoption(parser):
    parser.addoption("--accelerator", default="cpu", help="accelerator for model tests")


@pytest.fixture(autouse=True)
def _seed():
    scvi.settings.seed = 0
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*litlogger.*")


@pytest.fixture(scope="session")
def accelerator(request) -> str:
    return request.config.getoption("--accelerator")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of the real data sets; fails without them (outside CI their tests skip)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"{'CI=true and ' if IN_CI else ''}{MISSING_DATA}.", pytrace=False)
    return SHARED_DATA


@pytest.fixture(scope="session")
def synthetic_pair():
    """Reference and shifted query of a small separable synthetic task."""
    import labeltransfer as lt

    return lt.data.synthetic(
        n_reference=600, n_query=400, n_genes=300, n_types=4, batch_shift=0.3, seed=1
    )


@pytest.fixture(scope="session")
def trained_jind(synthetic_pair, tmp_path_factory):
    """A JIND model trained once per session on the synthetic reference."""
    import labeltransfer as lt

    scvi.settings.seed = 0
    ref = synthetic_pair[0].copy()
    lt.JIND.setup_anndata(ref, labels_key="cell_type")
    model = lt.JIND(ref, n_top_genes=200)
    model.train(max_epochs=8, enable_progress_bar=False, accelerator="cpu")
    return model


@pytest.fixture(scope="session")
def kang(shared_data) -> ad.AnnData:
    adata = ad.read_h5ad(shared_data / "kang_ifnb_small.h5ad")
    adata.obs_names_make_unique()
    return adata


def rng_subset(adata: ad.AnnData, fraction: float, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(adata.n_obs) < fraction
