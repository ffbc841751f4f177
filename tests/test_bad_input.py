"""Bad input at every entry point: a clear error (or a documented warning), input untouched.

One test per case. Set-up, model creation and training cases run for each of the four models
(they share ``setup_anndata``, ``_select_inputs`` and the ``train()`` template of
:class:`~labeltransfer.base.AnnotationMixin`); query cases use one trained JIND (the query
preparation is shared too). Then gene activity, a MuData query and the command line. The
catalogue with every message is ``docs/errors.md``; cases tested elsewhere are referenced there
(e.g. ``tests/data/test_gene_activity.py`` for truncated or unsorted fragment files).
"""

from __future__ import annotations

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
    return lt.data.synthetic(n_reference=200, n_query=100, n_genes=50, n_types=3, seed=0)


def _dense(adata: ad.AnnData) -> ad.AnnData:
    out = adata.copy()
    out.X = out.X.toarray()
    return out


def _snapshot(adata: ad.AnnData) -> tuple:
    x = adata.X.toarray() if hasattr(adata.X, "toarray") else np.array(adata.X)
    return x, adata.obs.copy(), adata.var.copy(), set(adata.uns)


def _assert_unchanged(adata: ad.AnnData, before: tuple) -> None:
    x, obs, var, uns = before
    now = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    np.testing.assert_array_equal(now, x)
    pd.testing.assert_frame_equal(adata.obs, obs)
    pd.testing.assert_frame_equal(adata.var, var)
    assert set(adata.uns) == uns


def _setup_fails(model: str, adata, error, match: str, **kwargs) -> None:
    before = _snapshot(adata) if isinstance(adata, ad.AnnData) else None
    with pytest.raises(error, match=match):
        getattr(lt, model).setup_anndata(adata, **{"labels_key": "cell_type", **kwargs})
    if before is not None:
        _assert_unchanged(adata, before)


@pytest.mark.parametrize("model", MODELS)
def test_setup_rejects_a_non_anndata(model):
    _setup_fails(model, np.zeros((3, 3)), TypeError, "must be an AnnData")


@pytest.mark.parametrize("model", MODELS)
def test_setup_rejects_a_missing_labels_key(model, pair):
    _setup_fails(model, pair[0].copy(), KeyError, "labels_key 'nope'", labels_key="nope")


@pytest.mark.parametrize("model", MODELS)
def test_setup_rejects_an_empty_anndata(model, pair):
    _setup_fails(model, pair[0][:0].copy(), ValueError, "0 cells")


@pytest.mark.parametrize("model", MODELS)
def test_setup_rejects_all_cells_unlabelled(model, pair):
    ref = pair[0].copy()
    ref.obs["cell_type"] = "Unknown"
    _setup_fails(
        model, ref, ValueError, "at least one labelled cell", unlabeled_category="Unknown"
    )


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_setup_rejects_non_finite_values(model, pair, value):
    ref = _dense(pair[0])
    ref.X[0, 0] = value
    _setup_fails(model, ref, ValueError, "non-finite values")


@pytest.mark.parametrize("model", MODELS)
def test_setup_rejects_negative_values(model, pair):
    ref = _dense(pair[0])
    ref.X[0, 0] = -1.0
    _setup_fails(model, ref, ValueError, "negative values")


@pytest.mark.parametrize("model", MODELS)
def test_setup_rejects_a_dataframe(model, pair):
    frame = pd.DataFrame(pair[0].X.toarray(), columns=pair[0].var_names)
    _setup_fails(model, frame, TypeError, "must be an AnnData object, got DataFrame")


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("key", ["batch_key", "layer"])
def test_setup_rejects_a_missing_batch_key_or_layer(model, pair, key):
    match = "batch_key 'nope' is not a column" if key == "batch_key" else "Layer 'nope' not found"
    _setup_fails(model, pair[0].copy(), KeyError, match, **{key: "nope"})


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.filterwarnings("ignore:Variable names are not unique")
def test_setup_rejects_duplicated_gene_names(model, pair):
    ref = pair[0].copy()
    ref.var_names = ["gene_0", *ref.var_names[1:-1], "gene_0"]
    _setup_fails(model, ref, ValueError, r"1 duplicated var_names \(e.g. gene_0\)")


@pytest.mark.parametrize("model", MODELS)
def test_setup_rejects_normalised_but_not_logged_data(model, pair):
    ref = _dense(pair[0])
    ref.X = ref.X / ref.X.sum(axis=1, keepdims=True) * 1e6
    _setup_fails(model, ref, ValueError, r"not log-transformed data \(CPM/TPM\)")


@pytest.mark.parametrize("model", MODELS)
def test_setup_rejects_a_single_cell_type(model, pair):
    ref = pair[0].copy()
    ref.obs["cell_type"] = "T cell"
    _setup_fails(model, ref, ValueError, r"single cell type \('T cell'\) in obs\['cell_type'\]")


@pytest.mark.parametrize("model", MODELS)
def test_setup_rejects_a_single_cell_type_besides_the_unlabelled(model, pair):
    ref = pair[0].copy()
    ref.obs["cell_type"] = np.where(np.arange(ref.n_obs) < 50, "Unknown", "T cell")
    _setup_fails(
        model, ref, ValueError, "a classifier needs at least two", unlabeled_category="Unknown"
    )


def _setup_warns(model: str, adata: ad.AnnData, match: str) -> None:
    """Set-up warns with ``match`` and only adds scvi's registration fields."""
    before = _snapshot(adata)
    with pytest.warns(UserWarning, match=match):
        getattr(lt, model).setup_anndata(adata, labels_key="cell_type")
    x, obs, var, uns = before
    now = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    np.testing.assert_array_equal(now, x)
    pd.testing.assert_frame_equal(adata.obs[obs.columns], obs)
    assert all(c.startswith("_scvi") for c in adata.obs.columns.difference(obs.columns))
    pd.testing.assert_frame_equal(adata.var, var)
    assert all(k.startswith("_scvi") for k in set(adata.uns) - uns)


@pytest.mark.parametrize("model", MODELS)
def test_setup_warns_on_a_singleton_class(model, pair):
    ref = pair[0].copy()
    ref.obs["cell_type"] = ref.obs["cell_type"].astype(str)
    ref.obs.iloc[0, ref.obs.columns.get_loc("cell_type")] = "lonely"
    _setup_warns(model, ref, r"1 reference classes have a single cell \(lonely\)")


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.filterwarnings("ignore:Observation names are not unique")
def test_setup_warns_on_duplicated_cell_names_and_continues(model, pair):
    ref = pair[0].copy()
    ref.obs_names = ["cell_a", "cell_a", *ref.obs_names[2:]]
    _setup_warns(model, ref, r"1 duplicated obs_names \(e.g. cell_a\).*obs_names_make_unique")


@pytest.mark.parametrize("model", MODELS)
def test_setup_warns_on_cells_without_counts(model, pair):
    ref = _dense(pair[0])
    ref.X[[3, 7]] = 0
    _setup_warns(model, ref, r"2 of 200 reference cells have no non-zero value in X")


# ----------------------------------------------------------------------------- model creation
@pytest.mark.parametrize("model", MODELS)
def test_genes_without_counts_are_accepted_silently(model, pair):
    """All-zero genes carry no signal but are valid: no warning, and the model builds."""
    ref = _dense(pair[0])
    ref.X[:, :5] = 0
    before = ref.X.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        getattr(lt, model).setup_anndata(ref, labels_key="cell_type")
        built = getattr(lt, model)(ref, n_top_genes=20)
    np.testing.assert_array_equal(ref.X, before)
    assert built.module.input_type == "counts"


@pytest.mark.parametrize("model", MODELS)
def test_model_rejects_non_integer_data_declared_as_counts(model, pair):
    ref = _dense(pair[0])
    ref.X = np.log1p(ref.X / ref.X.sum(axis=1, keepdims=True) * 1e4)
    getattr(lt, model).setup_anndata(ref, labels_key="cell_type")
    before = ref.X.copy()
    with pytest.raises(ValueError, match="input_type='counts' but the reference data are not"):
        getattr(lt, model)(ref, input_type="counts")
    np.testing.assert_array_equal(ref.X, before)


@pytest.mark.parametrize("model", MODELS)
def test_model_rejects_counts_declared_as_lognorm(model, pair):
    ref = pair[0].copy()
    getattr(lt, model).setup_anndata(ref, labels_key="cell_type")
    with pytest.raises(ValueError, match="input_type='lognorm' but the reference data are all"):
        getattr(lt, model)(ref, input_type="lognorm")


@pytest.mark.parametrize("model", MODELS)
def test_model_rejects_an_unknown_input_type(model, pair):
    ref = pair[0].copy()
    getattr(lt, model).setup_anndata(ref, labels_key="cell_type")
    with pytest.raises(
        ValueError,
        match="input_type must be one of 'auto', 'counts', 'lognorm', 'peaks', got 'raw'",
    ):
        getattr(lt, model)(ref, input_type="raw")


# ----------------------------------------------------------------------------- training
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_epochs": 0}, "max_epochs must be"),  # Lightning would train nothing
        ({"max_epochs": -1}, "max_epochs must be"),  # Lightning would train forever
        ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
        (
            {"max_epochs": 1, "train_size": 1.5},
            r"train_size must be a number in \(0, 1\], got 1.5",
        ),
    ],
)
def test_train_rejects_non_positive_epochs_and_batch_size(model, pair, kwargs, match):
    # reference + unlabelled query: the set-up every model trains on (SCDET needs the query)
    adata = lt.data.concat_reference_query(pair[0], pair[1], labels_key="cell_type")
    getattr(lt, model).setup_anndata(adata, labels_key="cell_type", unlabeled_category="Unknown")
    built = getattr(lt, model)(adata)
    with pytest.raises(ValueError, match=match):
        built.train(accelerator="cpu", enable_progress_bar=False, **kwargs)
    assert not built.is_trained_


def test_train_accepts_a_batch_larger_than_the_data(pair):
    """A batch larger than the data is one batch of every training cell, as in scvi-tools."""
    ref = pair[0].copy()
    lt.JIND.setup_anndata(ref, labels_key="cell_type")
    model = lt.JIND(ref)
    model.train(max_epochs=1, batch_size=10_000, accelerator="cpu", enable_progress_bar=False)
    assert model.is_trained_
    assert model.training_summary_["batch_size"] == 10_000


# ----------------------------------------------------------------------------- query side
@pytest.fixture(scope="module")
def trained_jind(pair):
    scvi.settings.seed = 0
    ref = pair[0].copy()
    lt.JIND.setup_anndata(ref, labels_key="cell_type")
    model = lt.JIND(ref)
    # trained until it tells the three types apart: after 2 epochs it calls one type as
    # another, which the open-set layer rightly flags as cells unlike their predicted type
    model.train(max_epochs=15, enable_progress_bar=False, accelerator="cpu")
    return model


def _annotate_fails(model, query, error, match: str) -> None:
    before = _snapshot(query) if isinstance(query, ad.AnnData) else None
    with pytest.raises(error, match=match):
        model.annotate(query)
    if before is not None:
        _assert_unchanged(query, before)


def test_annotate_rejects_a_non_anndata(trained_jind):
    _annotate_fails(trained_jind, [[1, 2], [3, 4]], TypeError, "Expected an AnnData.*got list")


def test_annotate_rejects_a_missing_path(trained_jind, tmp_path):
    # a path is read as a zarr store (annotated in place)
    missing = str(tmp_path / "query.zarr")
    _annotate_fails(trained_jind, missing, FileNotFoundError, "No zarr store at")


def test_annotate_rejects_an_h5ad_path(trained_jind, pair, tmp_path):
    pair[1].write_h5ad(tmp_path / "query.h5ad")
    _annotate_fails(
        trained_jind, tmp_path / "query.h5ad", ValueError, "is not a zarr store.*read_h5ad"
    )


def test_annotate_rejects_a_query_without_shared_genes(trained_jind, pair):
    query = pair[1].copy()
    query.var_names = [f"other_{i}" for i in range(query.n_vars)]
    _annotate_fails(trained_jind, query, ValueError, "overlap")


def test_annotate_rejects_a_query_of_another_kind(trained_jind, pair):
    query = pair[1].copy()
    query.X = np.log1p(query.X.toarray() / query.X.sum(axis=1).A * 1e4)
    _annotate_fails(trained_jind, query, ValueError, "trained on 'counts'")


def test_annotate_rejects_an_unknown_rejection_rule(trained_jind, pair):
    query = pair[1].copy()
    before = _snapshot(query)
    with pytest.raises(ValueError, match="Unknown rejection rule"):
        trained_jind.annotate(query, rejection="strict")
    _assert_unchanged(query, before)


def test_annotate_rejects_a_key_that_would_overwrite_registered_fields(trained_jind):
    with pytest.raises(ValueError, match="would overwrite"):
        trained_jind.annotate(key_added="cell_type")


def test_annotate_rejects_a_dataframe(trained_jind, pair):
    frame = pd.DataFrame(pair[1].X.toarray(), columns=pair[1].var_names)
    _annotate_fails(trained_jind, frame, TypeError, "Expected an AnnData.*got DataFrame")


def test_annotate_rejects_an_empty_query(trained_jind, pair):
    _annotate_fails(trained_jind, pair[1][:0].copy(), ValueError, "query AnnData has 0 cells")


@pytest.mark.parametrize(("value", "match"), [(np.nan, "non-finite"), (-1.0, "negative")])
def test_annotate_rejects_non_finite_or_negative_values(trained_jind, pair, value, match):
    query = _dense(pair[1])
    query.X[5, 3] = value
    _annotate_fails(trained_jind, query, ValueError, f"The query data .* contain 1 {match}")


def _annotated_fields(key: str) -> set[str]:
    return {key, f"{key}_prediction", f"{key}_confidence", f"{key}_rejected", f"{key}_novelty"}


def test_annotate_warns_on_cells_without_counts_and_rejects_them(trained_jind, pair):
    query = _dense(pair[1])
    query.X[[0, 4, 9]] = 0
    # a cell whose only counts are in a gene the model does not have is just as empty
    extra = np.zeros((query.n_obs, 1), dtype=query.X.dtype)
    extra[11] = 5
    query = ad.AnnData(
        np.hstack([query.X, extra]),
        obs=query.obs.copy(),
        var=pd.DataFrame(index=[*query.var_names, "not_in_model"]),
    )
    query.X[11, :-1] = 0
    before = _snapshot(query)
    with pytest.warns(UserWarning, match=r"4 of 100 query cells have no counts in the model's"):
        trained_jind.annotate(query, key_added="lt")
    x, obs, var, uns = before
    np.testing.assert_array_equal(query.X, x)
    pd.testing.assert_frame_equal(query.obs[obs.columns], obs)
    assert set(query.obs.columns) - set(obs.columns) == _annotated_fields("lt")
    pd.testing.assert_frame_equal(query.var, var)
    empty = np.isin(np.arange(query.n_obs), [0, 4, 9, 11])
    assert query.obs["lt_rejected"].to_numpy()[empty].all()
    assert (query.obs["lt"].astype(str).to_numpy()[empty] == "Unassigned").all()
    assert query.uns["lt"]["rejection"]["n_rejected_without_counts"] == 4
    # the other cells are judged by the rule alone, as without the empty cells
    reference = trained_jind.predict(pair[1], soft=True).max(axis=1).to_numpy()
    np.testing.assert_allclose(query.obs["lt_confidence"][~empty], reference[~empty], rtol=1e-5)


def test_annotate_accepts_genes_without_counts_silently(trained_jind, pair):
    query = _dense(pair[1])
    query.X[:, :5] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        trained_jind.annotate(query, key_added="lt")
    assert not query.uns["lt"]["rejection"].get("n_rejected_without_counts")


@pytest.mark.filterwarnings("ignore:Observation names are not unique")
def test_annotate_warns_on_duplicated_cell_names_and_writes_by_position(trained_jind, pair):
    query = pair[1].copy()
    query.obs_names = ["same", "same", *query.obs_names[2:]]
    with pytest.warns(UserWarning, match=r"The query has 1 duplicated obs_names \(e.g. same\)"):
        trained_jind.annotate(query, key_added="lt")
    expected = trained_jind.predict(pair[1])
    np.testing.assert_array_equal(query.obs["lt_prediction"].astype(str), expected)


# ----------------------------------------------------------------------------- gene activity
GENES = pd.DataFrame(
    {
        "chrom": ["chr1", "chr1"],
        "start": [10_000, 20_000],
        "end": [11_000, 21_000],
        "strand": ["+", "-"],
        "gene": ["G1", "G2"],
    }
)


def _atac(values) -> ad.AnnData:
    X = np.asarray(values, dtype=np.float32)
    var = pd.DataFrame(index=["chr1:9000-9500", "chr1:21500-22000", "chr1:50000-50100"])
    return ad.AnnData(X, obs=pd.DataFrame(index=[f"c{i}" for i in range(len(X))]), var=var)


def _gene_activity_fails(atac, error, match: str) -> None:
    before = _snapshot(atac) if isinstance(atac, ad.AnnData) else None
    with pytest.raises(error, match=match):
        lt.data.gene_activity(atac, genes=GENES, gene_types=None)
    if before is not None:
        _assert_unchanged(atac, before)


def test_gene_activity_rejects_a_non_anndata():
    _gene_activity_fails(np.ones((2, 3)), TypeError, "atac must be an AnnData.*got ndarray")


@pytest.mark.parametrize(("value", "match"), [(np.nan, "NaN or infinite"), (np.inf, "infinite")])
def test_gene_activity_rejects_non_finite_peak_counts(value, match):
    _gene_activity_fails(_atac([[1, 2, 0], [0, value, 1]]), ValueError, match)


def test_gene_activity_rejects_negative_peak_counts():
    _gene_activity_fails(_atac([[1, -2, 0], [0, 1, 1]]), ValueError, r"negative values \(min -2")


def test_gene_activity_warns_on_non_integer_peak_counts_and_sums_them():
    atac = _atac([[1.5, 2, 0], [0, 1, 1]])
    before = _snapshot(atac)
    with pytest.warns(UserWarning, match="non-integer values .* Pass the raw counts via layer="):
        ga = lt.data.gene_activity(atac, genes=GENES, gene_types=None)
    _assert_unchanged(atac, before)
    np.testing.assert_array_equal(ga.X.toarray(), [[1.5, 2], [0, 1]])


def test_add_gene_activity_rejects_an_anndata():
    with pytest.raises(TypeError, match="add_gene_activity needs a MuData, got AnnData"):
        lt.data.add_gene_activity(_atac([[1, 2, 0]]), genes=GENES)


# ----------------------------------------------------------------------------- MuData query
@pytest.fixture(scope="module")
def trained_cellpredx():
    import mudata as md

    rna, atac = lt.data.synthetic_multiome(
        n_cells=120, n_genes=60, n_background_peaks=60, paired=False, seed=0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mdata = md.MuData({"rna": rna, "atac": atac})
    lt.CellPredX.setup_mudata(mdata, labels_key="cell_type")
    model = lt.CellPredX(mdata)
    model.train(max_epochs=1, accelerator="cpu", enable_progress_bar=False)
    return model, rna


def test_annotate_rejects_a_mudata_without_its_atac_modality(trained_cellpredx):
    import mudata as md

    model, rna = trained_cellpredx
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mdata = md.MuData({"rna": rna.copy()})
    before = _snapshot(mdata.mod["rna"])
    with pytest.raises(
        KeyError, match="neither the gene-activity modality 'gene_activity' nor the ATAC modality"
    ):
        model.annotate(mdata)
    assert list(mdata.mod) == ["rna"]
    _assert_unchanged(mdata.mod["rna"], before)


# ----------------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def cli_files(pair, trained_jind, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    pair[0].write_h5ad(root / "ref.h5ad")
    pair[1].write_h5ad(root / "query.h5ad")
    trained_jind.save(root / "jind_model")
    (root / "not_a_model").mkdir()
    (root / "not_h5ad.h5ad").write_text("cell,gene\n")
    foreign = pair[1].copy()
    foreign.var_names = [f"other_{i}" for i in range(foreign.n_vars)]
    foreign.write_h5ad(root / "foreign.h5ad")
    return root


def _cli_fails(root, match: str, *args: str) -> None:
    from labeltransfer.cli import main

    argv = ["annotate", "--labels-key", "cell_type", "--out", str(root / "out.h5ad"), *args]
    argv += ["--accelerator", "cpu", "--no-align"]
    with pytest.raises(SystemExit, match=match):
        main(argv)
    assert not (root / "out.h5ad").exists()


def test_cli_rejects_a_missing_query_file(cli_files):
    _cli_fails(
        cli_files,
        "error: the query file .*missing.h5ad does not exist",
        *(
            "--model-dir",
            str(cli_files / "jind_model"),
            "--query",
            str(cli_files / "missing.h5ad"),
        ),
    )


def test_cli_rejects_a_folder_as_query(cli_files):
    _cli_fails(
        cli_files,
        "error: the query path .* is a folder; pass an .h5ad file",
        *("--model-dir", str(cli_files / "jind_model"), "--query", str(cli_files)),
    )


def test_cli_rejects_a_file_that_is_not_h5ad(cli_files):
    _cli_fails(
        cli_files,
        "error: could not read the query file .*not_h5ad.h5ad as .h5ad",
        *(
            "--model-dir",
            str(cli_files / "jind_model"),
            "--query",
            str(cli_files / "not_h5ad.h5ad"),
        ),
    )


def test_cli_rejects_a_missing_model_dir(cli_files):
    _cli_fails(
        cli_files,
        "error: the --model-dir folder .*nowhere does not exist",
        *("--model-dir", str(cli_files / "nowhere"), "--query", str(cli_files / "query.h5ad")),
    )


def test_cli_rejects_a_model_dir_without_a_model(cli_files):
    _cli_fails(
        cli_files,
        "error: cannot load --model-dir .*not_a_model as --model jind: .* is not a saved model",
        *("--model-dir", str(cli_files / "not_a_model"), "--query", str(cli_files / "query.h5ad")),
    )


def test_cli_rejects_a_model_dir_of_another_model(cli_files):
    from labeltransfer.cli import main

    argv = ["annotate", "--model", "scnym", "--model-dir", str(cli_files / "jind_model")]
    argv += ["--query", str(cli_files / "query.h5ad"), "--labels-key", "cell_type"]
    argv += ["--out", str(cli_files / "out.h5ad"), "--accelerator", "cpu"]
    with pytest.raises(SystemExit, match="holds a JIND model, not a SCNYM one"):
        main(argv)


def test_cli_rejects_an_unknown_model(cli_files, capsys):
    from labeltransfer.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["annotate", "--model", "scanvi", "--query", "q.h5ad", "--labels-key", "x"])
    assert exit_info.value.code == 2
    assert "argument --model: invalid choice: 'scanvi'" in capsys.readouterr().err


def test_cli_reports_library_errors_without_a_traceback(cli_files):
    _cli_fails(
        cli_files,
        r"error: Only 0 of 50 reference genes \(0.0%\) were found in the query",
        *(
            "--model-dir",
            str(cli_files / "jind_model"),
            "--query",
            str(cli_files / "foreign.h5ad"),
        ),
    )


def test_cli_rejects_zero_epochs(cli_files, capsys):
    from labeltransfer.cli import main

    argv = ["annotate", "--reference", str(cli_files / "ref.h5ad"), "--query"]
    argv += [str(cli_files / "query.h5ad"), "--labels-key", "cell_type", "--max-epochs", "0"]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--out", str(cli_files / "out.h5ad")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: argument --max-epochs: must be a positive whole number, got '0'")
    assert not (cli_files / "out.h5ad").exists()


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
def test_annotate_warns_on_duplicated_query_genes_and_sums_them(trained_jind, pair):
    query = _dense(pair[1])
    split = ad.AnnData(
        np.hstack([query.X, np.zeros((query.n_obs, 1), dtype=query.X.dtype)]),
        obs=query.obs.copy(),
        var=pd.DataFrame(index=[*query.var_names, "gene_0"]),
    )
    split.X[:, 0] = np.floor(query.X[:, 0] / 2)  # gene_0's counts split over two columns
    split.X[:, -1] = query.X[:, 0] - split.X[:, 0]
    before = split.X.copy()
    with pytest.warns(UserWarning, match="1 query genes matched a reference gene .*; summed"):
        trained_jind.annotate(split, key_added="lt")
    np.testing.assert_array_equal(split.X, before)
    np.testing.assert_allclose(
        split.obsm["lt_probabilities"], trained_jind.predict(pair[1], soft=True), rtol=1e-5
    )
