"""Type names with "/" in written results, and all-or-nothing writes into a zarr store."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scvi
import zarr

import labeltransfer as lt
from labeltransfer.base import _zarr

#: Names as in scanpy's pbmc68k_reduced ``bulk_labels``.
RENAME = {"type_0": "CD4+/CD25 T Reg", "type_1": "CD4+/CD45RA+/CD25- Naive T"}
SLASH_WARNING = "cannot be column names in a zarr store"


def _renamed(adata: ad.AnnData) -> ad.AnnData:
    adata = adata.copy()
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str).replace(RENAME).astype("category")
    return adata


@pytest.fixture(scope="module")
def slash_model(synthetic_pair):
    """A JIND trained 3 epochs on a reference whose type names contain "/"."""
    scvi.settings.seed = 0
    ref = _renamed(synthetic_pair[0])
    lt.JIND.setup_anndata(ref, labels_key="cell_type")
    model = lt.JIND(ref, n_top_genes=100)
    model.train(max_epochs=3, enable_progress_bar=False, accelerator="cpu")
    assert any("/" in t for t in model.cell_types)
    return model


@pytest.fixture
def query(synthetic_pair) -> ad.AnnData:
    return _renamed(synthetic_pair[1])


def _snapshot(path: Path) -> dict[str, bytes]:
    """Every file of a store, by relative path, with its bytes."""
    return {
        str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()
    }


def _keys(value, prefix=""):
    """Every dict key of a nested uns entry, as a path."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield f"{prefix}/{k}"
            yield from _keys(v, f"{prefix}/{k}")


def _thresholds(uns: dict) -> pd.Series:
    rule = uns["rejection"]
    return pd.Series(np.asarray(rule["thresholds"], dtype=float), index=list(rule["types"]))


def test_slash_type_names_survive_an_h5ad_round_trip(slash_model, query, tmp_path):
    out = slash_model.annotate(query, key_added="jind", copy=True)
    assert not [k for k in _keys(out.uns["jind"]) if "/" in k.rsplit("/", 1)[1]]
    out.write_h5ad(tmp_path / "q.h5ad")
    back = ad.read_h5ad(tmp_path / "q.h5ad")
    expected = slash_model.rejection_thresholds()
    assert list(back.uns["jind"]["rejection"]["types"]) == slash_model.cell_types
    pd.testing.assert_series_equal(
        _thresholds(back.uns["jind"]), expected, check_names=False, rtol=1e-12
    )
    pd.testing.assert_series_equal(back.obs["jind"], out.obs["jind"])


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_slash_type_names_in_a_zarr_store(slash_model, query, tmp_path, zarr_format):
    path = tmp_path / "query.zarr"
    with ad.settings.override(zarr_write_format=zarr_format):
        query.write_zarr(path)
    expected = slash_model.annotate(query, key_added="jind", copy=True)
    with pytest.warns(UserWarning, match=SLASH_WARNING) as record:
        slash_model.annotate(path, key_added="jind")
    message = str(next(w.message for w in record if SLASH_WARNING in str(w.message)))
    assert "obsm['jind_probabilities'] is stored there as an array" in message
    assert "uns['jind']['classes']" in message

    back = ad.read_zarr(path)
    for column in ("jind", "jind_prediction", "jind_confidence", "jind_rejected"):
        pd.testing.assert_series_equal(back.obs[column], expected.obs[column])
    assert list(back.uns["jind"]["classes"]) == slash_model.cell_types
    np.testing.assert_allclose(
        back.obsm["jind_probabilities"], expected.obsm["jind_probabilities"], rtol=1e-6
    )
    pd.testing.assert_series_equal(
        _thresholds(back.uns["jind"]),
        slash_model.rejection_thresholds(),
        check_names=False,
        rtol=1e-12,
    )
    # annotating the same store again, under the same and another key, keeps it readable
    for key in ("jind", "again"):
        with pytest.warns(UserWarning, match=SLASH_WARNING):
            slash_model.annotate(path, key_added=key)
    back = ad.read_zarr(path)
    assert {"X_jind", "X_again", "jind_probabilities", "again_probabilities"} <= set(back.obsm)
    assert {"jind", "again"} <= set(back.uns)
    assert [p.name for p in tmp_path.iterdir()] == ["query.zarr"]  # no staging folder left


def test_store_without_obsm_and_uns_groups(slash_model, query, tmp_path):
    path = tmp_path / "query.zarr"
    query.write_zarr(path)
    for name in ("obsm", "uns"):  # empty groups in a fresh store: a store may lack them
        shutil.rmtree(path / name)
    zarr.consolidate_metadata(os.fspath(path))
    with pytest.warns(UserWarning, match=SLASH_WARNING):
        slash_model.annotate(path, key_added="jind")
    back = ad.read_zarr(path)
    assert set(back.obsm) == {"jind_probabilities", "X_jind"}
    assert set(back.uns) == {"jind"}


def _fail_on_call(function, n: int, store: Path | None = None):
    """``function`` that raises an OSError on its ``n``-th call (touching ``store``, if given).

    zarr itself renames files while writing: with ``store``, only the calls with a path in
    the store are counted (the swap of elements into it).
    """
    calls = []

    def failing(*args, **kwargs):
        if store is None or any(str(a).startswith(str(store)) for a in args):
            calls.append(1)
            if len(calls) == n:
                raise OSError("injected failure")
        return function(*args, **kwargs)

    return failing


@pytest.mark.parametrize(
    ("target", "attribute", "call"),
    [
        (ad.io, "write_elem", 2),  # while staging obsm: nothing of the store touched yet
        # renames: each of obs, obsm/<2 keys>, uns/<key> is moved aside, then the new one in
        (os, "replace", 1),  # moving the old obs aside
        (os, "replace", 4),  # mid-swap: obs swapped, obsm half swapped
        (os, "replace", 8),  # the last element (uns[key]) swapped in
        (zarr, "consolidate_metadata", 1),  # after every element was swapped in
    ],
)
def test_a_failed_write_leaves_the_store_as_it_was(
    slash_model, query, tmp_path, monkeypatch, target, attribute, call
):
    path = tmp_path / "query.zarr"
    query.write_zarr(path)
    with pytest.warns(UserWarning, match=SLASH_WARNING):
        slash_model.annotate(path, key_added="jind", rejection=None)  # an earlier annotation
    before = _snapshot(path)
    first = ad.read_zarr(path)

    store = path if target is os else None
    monkeypatch.setattr(target, attribute, _fail_on_call(getattr(target, attribute), call, store))
    with pytest.raises(OSError, match="injected failure"), pytest.warns(UserWarning, match="/"):
        slash_model.annotate(path, key_added="jind", rejection="per_type")
    monkeypatch.undo()

    assert _snapshot(path) == before
    assert [p.name for p in tmp_path.iterdir()] == ["query.zarr"]
    back = ad.read_zarr(path)
    pd.testing.assert_frame_equal(back.obs, first.obs)
    assert back.uns["jind"]["rejection"]["rule"] == "none"
    # and the store takes the next annotation normally
    with pytest.warns(UserWarning, match=SLASH_WARNING):
        slash_model.annotate(path, key_added="jind", rejection="per_type")
    assert ad.read_zarr(path).uns["jind"]["rejection"]["rule"] == "per_type"


def test_unstorable_key_is_refused_before_inference(slash_model, query, tmp_path, monkeypatch):
    path = tmp_path / "query.zarr"
    query.write_zarr(path)
    before = _snapshot(path)
    monkeypatch.setattr(slash_model, "_infer", lambda *a, **k: pytest.fail("inference ran"))
    with pytest.raises(ValueError, match=r"key_added='a/b' contains '/'.*without '/'"):
        slash_model.annotate(path, key_added="a/b")
    with pytest.raises(ValueError, match=r"key_added='a/b' contains '/'"):
        slash_model.annotate(query, key_added="a/b")
    assert _snapshot(path) == before
    assert "a/b" not in query.obs


def test_staging_folder_failure_names_the_fix(slash_model, query, tmp_path, monkeypatch):
    path = tmp_path / "query.zarr"
    query.write_zarr(path)
    before = _snapshot(path)

    def refuse(*args, **kwargs):
        raise PermissionError("read-only")

    monkeypatch.setattr(_zarr.tempfile, "mkdtemp", refuse)
    with pytest.raises(OSError, match="Cannot create a staging folder.*Make that folder writable"):
        with pytest.warns(UserWarning, match=SLASH_WARNING):
            slash_model.annotate(path, key_added="jind")
    assert _snapshot(path) == before
