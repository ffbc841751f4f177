"""A model loaded without data maps queries and refuses the calls that need its own data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import labeltransfer as lt
from labeltransfer._constants import LOADED_WITHOUT_DATA_KEY

NO_DATA = (
    "This model was loaded without data: pass the query, e.g. `model.annotate(query)` or "
    "`model.predict(query)`. To use the reference itself, load the model with it: "
    "`JIND.load(dir_path, adata=reference)`."
)


@pytest.fixture(scope="module")
def saved(model_and_query, tmp_path_factory):
    model, query = model_and_query
    folder = tmp_path_factory.mktemp("saved") / "model"
    model.save(folder)
    return folder


def test_loaded_model_has_no_data_and_refuses_calls_that_need_it(saved, model_and_query):
    model, query = model_and_query
    loaded = lt.JIND.load(saved, accelerator="cpu")
    assert loaded.adata is None
    for call in (loaded.predict, loaded.get_latent_representation, loaded.annotate):
        with pytest.raises(ValueError, match="loaded without data: pass the query") as info:
            call()
        assert str(info.value) == NO_DATA
    with pytest.raises(ValueError, match="loaded without data, so save_anndata=True"):
        loaded.save(saved.parent / "again", save_anndata=True)
    with pytest.raises(ValueError, match="loaded without data, so it has no cells to train on"):
        loaded.train(max_epochs=1, enable_progress_bar=False, accelerator="cpu")


def test_loaded_model_annotates_a_query_as_before_saving(saved, model_and_query):
    model, query = model_and_query
    expected = model.annotate(query, key_added="jind", copy=True)
    loaded = lt.JIND.load(saved, accelerator="cpu")
    found = loaded.annotate(query, key_added="jind", copy=True)
    for column in ("jind", "jind_prediction", "jind_confidence", "jind_rejected"):
        pd.testing.assert_series_equal(found.obs[column], expected.obs[column])
    pd.testing.assert_frame_equal(
        found.obsm["jind_probabilities"], expected.obsm["jind_probabilities"]
    )
    np.testing.assert_array_equal(loaded.predict(query), model.predict(query))


def test_the_anndata_built_for_loading_is_in_no_store(saved, model_and_query):
    registered = set(lt.JIND._setup_adata_manager_store)
    loaded = lt.JIND.load(saved, accelerator="cpu")
    assert set(lt.JIND._setup_adata_manager_store) == registered
    assert loaded._per_instance_manager_store[loaded.id] == {}
    assert loaded.adata_manager.adata.uns[LOADED_WITHOUT_DATA_KEY]  # it maps queries only


def test_reference_attached_after_loading(saved, model_and_query):
    model, _ = model_and_query
    loaded = lt.JIND.load(saved, accelerator="cpu")
    reference = model.adata.copy()
    loaded.adata = reference
    assert loaded.adata is reference
    pd.testing.assert_frame_equal(loaded.predict(soft=True), model.predict(soft=True))
