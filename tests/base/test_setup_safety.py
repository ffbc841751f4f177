"""Set-up refuses labels and genes that would break later, and never leaves half a setup behind.

Issue 15, families 8 (labels) and 10 (Ensembl versions). Every refusal is checked for its
message and for an AnnData left exactly as it was (``obs`` columns and values, ``uns`` keys
and values, ``var``). Set-up is shared by the four models, so the cases run for each.
"""

from __future__ import annotations

import copy
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scvi

import labeltransfer as lt

MODELS = ["JIND", "SCNYM", "SCDET", "CellPredX"]


@pytest.fixture(scope="module")
def pair():
    return lt.data.synthetic(n_reference=120, n_query=60, n_genes=40, n_types=3, seed=0)


@pytest.fixture
def ref(pair):
    return pair[0].copy()


def _state(adata: ad.AnnData) -> tuple:
    return adata.obs.copy(), copy.deepcopy(dict(adata.uns)), adata.var.copy()


def _assert_same(adata: ad.AnnData, before: tuple) -> None:
    obs, uns, var = before
    pd.testing.assert_frame_equal(adata.obs, obs)
    assert list(adata.uns) == list(uns)
    for key, value in uns.items():
        if isinstance(value, str | int | float):
            assert adata.uns[key] == value
    pd.testing.assert_frame_equal(adata.var, var)


def _refused(model: str, adata: ad.AnnData, error: type, match: str, **kwargs) -> None:
    before = _state(adata)
    with pytest.raises(error, match=match):
        getattr(lt, model).setup_anndata(adata, **{"labels_key": "cell_type", **kwargs})
    _assert_same(adata, before)


def _rename(adata: ad.AnnData, old: str, new: str) -> None:
    adata.obs["cell_type"] = adata.obs["cell_type"].cat.rename_categories({old: new})


def _mapping(adata: ad.AnnData, model: str = "JIND") -> list[str]:
    manager = getattr(lt, model)._setup_adata_manager_store[adata.uns["_scvi_uuid"]]
    return list(manager.get_state_registry("labels").categorical_mapping)


# ------------------------------------------------------------------ label names
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("name", ["Unassigned", "novel_0", "novel_12"])
def test_setup_refuses_a_type_named_like_an_output_label(model, ref, name):
    _rename(ref, "type_1", name)
    _refused(
        model,
        ref,
        ValueError,
        rf"obs\['cell_type'\] has reference cell types named \['{name}'\] \(40 cells\), but "
        r"annotate\(\) writes 'Unassigned' for rejected cells and 'novel_<i>' for novel "
        rf"groups.*\.replace\(\{{'{name}': '{name}_reference'\}}\)",
    )


def test_a_type_that_only_starts_like_an_output_label_is_accepted(ref):
    _rename(ref, "type_1", "novel_progenitor")
    _rename(ref, "type_2", "Unassigned_ref")
    lt.SCDET.setup_anndata(ref, labels_key="cell_type")
    assert {"novel_progenitor", "Unassigned_ref"} <= set(_mapping(ref, "SCDET"))


def test_unassigned_as_the_unlabeled_category_is_not_a_type(ref):
    """Cells marked with the unlabelled token are query cells, whatever the token."""
    _rename(ref, "type_1", "Unassigned")
    ref.obs["batch"] = np.where(ref.obs["cell_type"] == "Unassigned", "query", "reference")
    lt.SCNYM.setup_anndata(
        ref, labels_key="cell_type", unlabeled_category="Unassigned", batch_key="batch"
    )
    assert _mapping(ref, "SCNYM")[-1] == "Unassigned"


# ------------------------------------------------------------------ label dtypes
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize(
    ("kind", "values"),
    [
        ("integer", lambda codes: codes.astype(np.int64)),
        ("boolean", lambda codes: codes == 0),
        ("floating", lambda codes: codes.astype(float)),
        ("integer", lambda codes: pd.Categorical(codes.astype(np.int64))),
    ],
)
def test_setup_refuses_non_string_labels_with_the_fix(model, ref, kind, values):
    ref.obs["cell_type"] = values(ref.obs["cell_type"].cat.codes.to_numpy())
    _refused(
        model,
        ref,
        TypeError,
        rf"obs\['cell_type'\] holds {kind} labels \(e.g. .*\), but cell types must be strings. "
        r"Convert the column first: `adata.obs\['cell_type'\] = "
        r"adata.obs\['cell_type'\].astype\(str\)`",
    )


def test_integer_labels_work_after_the_suggested_conversion(ref):
    ref.obs["cell_type"] = ref.obs["cell_type"].cat.codes.astype(np.int64)
    with pytest.raises(TypeError, match="astype"):
        lt.JIND.setup_anndata(ref, labels_key="cell_type")
    ref.obs["cell_type"] = ref.obs["cell_type"].astype(str)
    lt.JIND.setup_anndata(ref, labels_key="cell_type")
    assert lt.JIND(ref, n_top_genes=None).cell_types == ["0", "1", "2"]


def test_setup_refuses_a_non_string_unlabeled_category(ref):
    _refused(
        "SCNYM",
        ref,
        TypeError,
        r"unlabeled_category must be a string, got -1 \(int\)",
        unlabeled_category=-1,
    )


# ------------------------------------------------------------------ unused categories
@pytest.mark.parametrize("model", MODELS)
def test_unused_categories_are_left_out_with_a_warning(model, ref):
    column = ref.obs["cell_type"].cat.add_categories(["ghost", "Unassigned"])
    ref.obs["cell_type"] = column.cat.reorder_categories(
        ["ghost", "type_2", "Unassigned", "type_0", "type_1"]
    )
    before = ref.obs["cell_type"].copy()
    with pytest.warns(
        UserWarning,
        match=r"2 categories of obs\['cell_type'\] have no cell \('ghost', 'Unassigned'\); they "
        r"are left out of the model's cell types \(the column itself is not changed\).*"
        r"remove_unused_categories",
    ):
        getattr(lt, model).setup_anndata(ref, labels_key="cell_type")
    pd.testing.assert_series_equal(ref.obs["cell_type"], before)  # the user's column as it was
    assert _mapping(ref, model) == ["type_2", "type_0", "type_1", "Unknown"]
    codes = ref.obs["_scvi_labels"].to_numpy()
    expected = pd.Categorical(before, categories=["type_2", "type_0", "type_1"]).codes
    np.testing.assert_array_equal(codes, expected)


def test_a_model_on_labels_with_unused_categories_predicts_only_present_types(ref):
    ref.obs["cell_type"] = ref.obs["cell_type"].cat.add_categories(["ghost"])
    with pytest.warns(UserWarning, match="have no cell"):
        lt.JIND.setup_anndata(ref, labels_key="cell_type")
    scvi.settings.seed = 0
    model = lt.JIND(ref, n_top_genes=None)
    model.train(max_epochs=1, enable_progress_bar=False, accelerator="cpu")
    assert model.cell_types == ["type_0", "type_1", "type_2"]
    assert list(model.predict(soft=True).columns) == ["type_0", "type_1", "type_2"]


# ------------------------------------------------------------------ the unlabelled token
@pytest.mark.parametrize("model", MODELS)
def test_a_reference_type_named_like_the_unlabeled_category_warns(model, ref):
    _rename(ref, "type_1", "Unknown")
    with pytest.warns(
        UserWarning,
        match=r"40 of 120 cells in obs\['cell_type'\] are labelled 'Unknown', the "
        r"unlabeled_category: they are treated as unlabelled query cells and left out of the "
        r"supervised training. If they are a reference cell type, pass another "
        r"unlabeled_category",
    ):
        getattr(lt, model).setup_anndata(ref, labels_key="cell_type")
    assert _mapping(ref, model) == ["type_0", "type_2", "Unknown"]  # the warned consequence


def _quiet_setup(model: str, adata: ad.AnnData, **kwargs) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        getattr(lt, model).setup_anndata(adata, labels_key="cell_type", **kwargs)


def test_query_cells_of_concat_reference_query_do_not_warn(pair):
    adata = lt.data.concat_reference_query(*pair, labels_key="cell_type")
    _quiet_setup("SCNYM", adata)


def test_query_cells_in_their_own_batch_do_not_warn(pair):
    adata = lt.data.concat_reference_query(*pair, labels_key="cell_type", batch_key="batch")
    del adata.obs["lt_role"]
    _quiet_setup("SCNYM", adata, batch_key="batch")


def test_query_cells_sharing_a_batch_with_the_reference_warn(pair):
    adata = lt.data.concat_reference_query(*pair, labels_key="cell_type")
    del adata.obs["lt_role"]
    adata.obs["batch"] = "donor_1"
    with pytest.warns(UserWarning, match="60 of 180 cells .* are labelled 'Unknown'"):
        lt.SCNYM.setup_anndata(adata, labels_key="cell_type", batch_key="batch")


# ------------------------------------------------------------------ failed set-up
def test_a_failed_setup_leaves_no_scvi_fields(ref):
    """scvi writes ``_scvi_batch`` before the labels: a failure after it is rolled back."""
    ref.obs["cell_type"] = ref.obs["cell_type"].astype(str)
    ref.obs.iloc[:2, ref.obs.columns.get_loc("cell_type")] = "pair"  # scvi warns under 3 cells
    before = _state(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        with pytest.raises(UserWarning, match="fewer than 3 cells"):
            lt.JIND.setup_anndata(ref, labels_key="cell_type")
    _assert_same(ref, before)
    assert not [c for c in ref.obs.columns if c.startswith("_scvi")]
    assert not [k for k in ref.uns if k.startswith("_scvi")]


def test_a_failed_second_setup_restores_the_first(ref):
    lt.JIND.setup_anndata(ref, labels_key="cell_type")
    first = _state(ref)
    ref.obs["batch"] = ["b0", "b1", *["b2"] * (ref.n_obs - 2)]  # scvi warns under 3 cells
    first = (ref.obs.copy(), first[1], first[2])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        with pytest.raises(UserWarning, match="fewer than 3 cells"):
            lt.SCNYM.setup_anndata(ref, labels_key="cell_type", batch_key="batch")
    _assert_same(ref, first)
    assert ref.uns["_scvi_uuid"] == first[1]["_scvi_uuid"]
    scvi.settings.seed = 0
    lt.JIND(ref, n_top_genes=None)  # the first setup still holds


# ------------------------------------------------------------------ genes
@pytest.mark.parametrize("model", MODELS)
def test_setup_refuses_two_versions_of_one_ensembl_id(model, ref):
    ids = [f"ENSG{i:011d}.1" for i in range(ref.n_vars)]
    ids[7] = "ENSG00000000003.2"  # a second version of ids[3]
    ref.var_names = ids
    _refused(
        model,
        ref,
        ValueError,
        r"The reference AnnData has 1 Ensembl ids in several versions \(e.g. "
        r"ENSG00000000003.1, ENSG00000000003.2\); genes are matched between data sets without "
        r"the version suffix.*Keep one version of each gene",
    )


def test_the_suggested_fix_for_ensembl_versions_works(ref):
    ids = [f"ENSG{i:011d}.1" for i in range(ref.n_vars)]
    ids[7] = "ENSG00000000003.2"
    ref.var_names = ids
    fixed = ref[:, ~ref.var_names.str.replace(r"\.\d+$", "", regex=True).duplicated()].copy()
    lt.JIND.setup_anndata(fixed, labels_key="cell_type")
    assert fixed.n_vars == ref.n_vars - 1


def test_one_version_per_ensembl_id_is_accepted(ref):
    ref.var_names = [f"ENSG{i:011d}.{i % 3 + 1}" for i in range(ref.n_vars)]
    lt.JIND.setup_anndata(ref, labels_key="cell_type")
