"""Which stored alignment a query gets: fingerprints, explicit choice, warnings, threads."""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pytest
import scvi

import labeltransfer as lt
from labeltransfer.base import AnnotationMixin, fingerprint

TRAIN = {"enable_progress_bar": False, "accelerator": "cpu"}
SAME_NAMES = "has the cell names of the query aligned as 'a' but other expression values"


@pytest.fixture(scope="module")
def aligned(synthetic_pair):
    """A JIND with two stored alignments: ``a`` (first 200 query cells) and ``b`` (the rest)."""
    scvi.settings.seed = 0
    ref = synthetic_pair[0].copy()
    lt.JIND.setup_anndata(ref, labels_key="cell_type")
    model = lt.JIND(ref, n_top_genes=100, n_latent=32, n_hidden=32)
    model.train(max_epochs=3, **TRAIN)
    query = synthetic_pair[1]
    query_a, query_b = query[:200].copy(), query[200:].copy()
    # three epochs neither close the gap nor keep the calls: without early stopping (and its
    # undo of a failed alignment) the generators stay, which is what these tests choose between
    model.align(query_a, name="a", max_epochs=3, early_stopping=False, **TRAIN)
    model.align(query_b, name="b", max_epochs=3, early_stopping=False, **TRAIN)
    return model, query_a, query_b


@pytest.fixture
def no_warning():
    """Fail on any warning about alignments."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*align", category=UserWarning)
        yield


def _latent(model, adata, **kwargs) -> np.ndarray:
    return model.get_latent_representation(adata, **kwargs)


def test_auto_uses_the_alignment_of_the_same_data(aligned, tmp_path, no_warning):
    model, query_a, _ = aligned
    expected = _latent(model, query_a, alignment="a")
    assert not np.allclose(expected, _latent(model, query_a, alignment=None))

    out = model.annotate(query_a, copy=True)
    np.testing.assert_array_equal(out.obsm["X_jind"], expected)
    assert out.uns["jind"]["aligned"]
    assert out.uns["jind"]["alignment"] == "a"
    assert out.uns["jind"]["alignment_matched_by"] == "fingerprint"
    # the same data in another form: a copy, dense float64, a zarr store, a backed h5ad
    dense = query_a.copy()
    dense.X = dense.X.toarray().astype(np.float64)
    np.testing.assert_array_equal(_latent(model, dense), expected)
    query_a.write_zarr(tmp_path / "a.zarr")
    np.testing.assert_allclose(_latent(model, tmp_path / "a.zarr"), expected, rtol=1e-6)
    query_a.write_h5ad(tmp_path / "a.h5ad")
    backed = ad.read_h5ad(tmp_path / "a.h5ad", backed="r")
    np.testing.assert_allclose(_latent(model, backed), expected, rtol=1e-6)
    backed.file.close()


def test_same_names_other_content_is_not_aligned_and_warns(aligned):
    model, query_a, query_b = aligned
    other = query_b[: query_a.n_obs].copy()
    other.obs_names = query_a.obs_names  # e.g. two queries both named "0".."n"
    with pytest.warns(UserWarning, match=SAME_NAMES) as record:
        out = model.annotate(other, copy=True)
    assert "pass alignment='a'" in str(record[0].message)
    assert not out.uns["jind"]["aligned"]
    assert "alignment" not in out.uns["jind"]
    np.testing.assert_array_equal(out.obsm["X_jind"], _latent(model, other, alignment=None))

    changed = query_a.copy()  # the aligned AnnData, changed in place afterwards
    changed.X = changed.X * 2
    with pytest.warns(UserWarning, match=SAME_NAMES):
        _latent(model, changed)


def test_subset_of_an_aligned_query_warns_and_can_ask_for_it(aligned, no_warning):
    model, query_a, _ = aligned
    subset = query_a[:50].copy()
    with pytest.warns(UserWarning, match="shares 50 of its 50 cell names with the query aligned"):
        fallback = _latent(model, subset)
    np.testing.assert_array_equal(fallback, _latent(model, subset, alignment=None))

    out = model.annotate(subset, copy=True, alignment="a")
    assert out.uns["jind"]["alignment"] == "a"
    assert out.uns["jind"]["alignment_matched_by"] == "requested"
    # the generator maps each cell on its own: the subset gets the full query's codes
    np.testing.assert_allclose(out.obsm["X_jind"], _latent(model, query_a)[:50], rtol=1e-5)
    predicted = model.predict(subset, alignment="a", soft=True)
    np.testing.assert_allclose(
        predicted.to_numpy(), model.predict(query_a, soft=True).to_numpy()[:50], rtol=1e-5
    )


def test_unrelated_query_is_not_aligned_without_warning(aligned, synthetic_pair, no_warning):
    model, _, _ = aligned
    unrelated = synthetic_pair[0][:100].copy()
    unrelated.obs_names = [f"other_{i}" for i in range(unrelated.n_obs)]
    out = model.annotate(unrelated, copy=True)
    assert not out.uns["jind"]["aligned"]


def test_choice_errors(aligned):
    model, query_a, _ = aligned
    with pytest.raises(ValueError, match=r"alignment='c' is not a stored alignment.*\['a', 'b'\]"):
        model.annotate(query_a, copy=True, alignment="c")
    with pytest.raises(ValueError, match=r"model.align\(adata, name='c'\)"):
        model.predict(query_a, alignment="c")
    with pytest.raises(
        TypeError, match=r"SimpleNamespace got unexpected keyword .*\['alignment'\]"
    ):
        AnnotationMixin._inference_kwargs(SimpleNamespace(), query_a, alignment="a")


def test_saved_alignments_keep_their_fingerprints(aligned, tmp_path, no_warning):
    model, query_a, query_b = aligned
    model.save(tmp_path / "model")
    loaded = lt.JIND.load(tmp_path / "model")
    for query, name in ((query_a, "a"), (query_b, "b")):
        out = loaded.annotate(query, copy=True)
        assert out.uns["jind"]["alignment"] == name
        np.testing.assert_allclose(out.obsm["X_jind"], _latent(model, query), rtol=1e-6)


def test_alignment_saved_before_fingerprints_matches_by_names(aligned):
    model, query_a, _ = aligned
    # a model saved by an older labeltransfer stored the hash of the cell names only
    old = {
        k: v
        for k, v in model.alignments_["a"].items()
        if k not in {"names_fingerprint", "cell_hashes"}
    }
    old["fingerprint"] = fingerprint(query_a)
    saved = dict(model.alignments_)
    model.alignments_ = {"a": old}
    try:
        with pytest.warns(UserWarning, match="saved by an older labeltransfer"):
            out = model.annotate(query_a, copy=True)
        assert out.uns["jind"]["alignment_matched_by"] == "cell names"
        np.testing.assert_array_equal(out.obsm["X_jind"], _latent(model, query_a, alignment="a"))
    finally:
        model.alignments_ = saved


def test_threads_annotating_two_aligned_queries_keep_their_alignments(aligned, no_warning):
    model, query_a, query_b = aligned
    expected = {
        "a": _latent(model, query_a, batch_size=8),
        "b": _latent(model, query_b, batch_size=8),
    }
    calls = {"a": model.annotate(query_a, copy=True), "b": model.annotate(query_b, copy=True)}
    queries = {"a": query_a, "b": query_b}
    with ThreadPoolExecutor(2) as pool:
        for _ in range(10):  # small minibatches: many switches between the two threads
            latents = {n: pool.submit(_latent, model, q, batch_size=8) for n, q in queries.items()}
            outs = {n: pool.submit(model.annotate, q, copy=True) for n, q in queries.items()}
            for name in queries:
                np.testing.assert_array_equal(latents[name].result(), expected[name])
                out = outs[name].result()
                np.testing.assert_array_equal(out.obs["jind"], calls[name].obs["jind"])
                assert out.uns["jind"]["alignment"] == name
