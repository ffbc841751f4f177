"""Bad input through the model entry points raises errors that name the fix."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import sparse

import labeltransfer as lt


@pytest.fixture
def ref(synthetic_pair):
    return synthetic_pair[0].copy()


def test_missing_labels_key(ref):
    with pytest.raises(KeyError, match="labels_key 'nope'"):
        lt.JIND.setup_anndata(ref, labels_key="nope")


def test_missing_batch_key(ref):
    with pytest.raises(KeyError, match="batch_key 'nope'"):
        lt.JIND.setup_anndata(ref, labels_key="cell_type", batch_key="nope")


def test_missing_layer(ref):
    with pytest.raises(KeyError, match="counts"):
        lt.JIND.setup_anndata(ref, labels_key="cell_type", layer="counts")


def test_nan_values(ref):
    X = ref.X.toarray()
    X[0, 0] = np.nan
    ref.X = sparse.csr_matrix(X)
    with pytest.raises(ValueError, match="NaN"):
        lt.JIND.setup_anndata(ref, labels_key="cell_type")


def test_negative_values(ref):
    ref.X = ref.X.toarray() - 1.0
    with pytest.raises(ValueError, match="negative"):
        lt.JIND.setup_anndata(ref, labels_key="cell_type")


def test_duplicated_genes(ref):
    names = ref.var_names.to_numpy().copy()
    names[1] = names[0]
    ref.var_names = names
    with pytest.raises(ValueError, match="var_names_make_unique"):
        lt.JIND.setup_anndata(ref, labels_key="cell_type")


def test_empty_reference(ref):
    with pytest.raises(ValueError, match="0 cells|no cells|empty"):
        lt.JIND.setup_anndata(ref[:0].copy(), labels_key="cell_type")


def test_all_unlabeled(ref):
    ref.obs["cell_type"] = "Unknown"
    with pytest.raises(ValueError, match="labelled"):
        lt.JIND.setup_anndata(ref, labels_key="cell_type")


def test_single_cell_class_warns(ref):
    ref.obs["cell_type"] = ref.obs["cell_type"].astype(str)
    ref.obs.iloc[0, ref.obs.columns.get_loc("cell_type")] = "lonely"
    with pytest.warns(UserWarning, match="lonely"):
        lt.JIND.setup_anndata(ref, labels_key="cell_type")


def test_nan_labels(ref):
    ref.obs["cell_type"] = ref.obs["cell_type"].astype(object)
    ref.obs.iloc[0, ref.obs.columns.get_loc("cell_type")] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        lt.JIND.setup_anndata(ref, labels_key="cell_type")


def test_untrained_model_cannot_annotate(ref):
    lt.JIND.setup_anndata(ref, labels_key="cell_type")
    model = lt.JIND(ref, n_top_genes=50)
    with pytest.raises(RuntimeError, match="train"):
        model.annotate()


def test_unknown_features(ref):
    lt.JIND.setup_anndata(ref, labels_key="cell_type")
    with pytest.raises(ValueError, match="not genes of the AnnData"):
        lt.JIND(ref, features=["gene_0", "not_a_gene"])


def test_annotate_rejects_non_anndata(trained_jind):
    with pytest.raises(TypeError, match="AnnData"):
        trained_jind.annotate(np.zeros((3, 3)))
