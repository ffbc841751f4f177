"""scATAC-seq peaks as input: recognised, read as TF-IDF, saved with the model."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scvi
import torch
from scipy import sparse

import labeltransfer as lt
from labeltransfer.data._peaks import looks_like_peaks, most_open_peaks, peak_weights
from labeltransfer.nn import normalize_input


def _peak_anndata(n_cells: int = 120, n_peaks: int = 40, seed: int = 0) -> ad.AnnData:
    """Two types with their own open peaks, peak names ``chrN:start-end``, raw counts."""
    rng = np.random.default_rng(seed)
    types = np.repeat(["A", "B"], n_cells // 2)
    rate = np.full((n_cells, n_peaks), 0.05)
    rate[types == "A", : n_peaks // 2] = 0.6
    rate[types == "B", n_peaks // 2 :] = 0.6
    counts = (rng.random((n_cells, n_peaks)) < rate) * rng.integers(1, 3, (n_cells, n_peaks))
    var = pd.DataFrame(index=[f"chr1:{1000 * i}-{1000 * i + 500}" for i in range(n_peaks)])
    obs = pd.DataFrame({"cell_type": types}, index=[f"c{i}" for i in range(n_cells)])
    return ad.AnnData(sparse.csr_matrix(counts.astype(np.float32)), obs=obs, var=var)


def test_peaks_are_recognised_by_name_or_coordinate_columns():
    assert looks_like_peaks(pd.DataFrame(index=["chr1:10-20", "chrX-5-9", "chr2_1_4"]))
    assert not looks_like_peaks(pd.DataFrame(index=["CD3E", "chr1:10-20"]))
    by_columns = pd.DataFrame(
        {"chrom": ["chr1", "chr2"], "start": [1, 5], "end": [4, 9]}, index=["p1", "p2"]
    )
    assert looks_like_peaks(by_columns)
    assert not looks_like_peaks(pd.DataFrame(index=pd.Index([], dtype=str)))


def test_tfidf_weights_and_transform_by_hand():
    counts = np.array([[2, 0, 1, 0], [0, 0, 3, 1], [1, 1, 0, 0]], dtype=np.float32)
    adata = ad.AnnData(sparse.csr_matrix(counts))
    features = np.array([0, 2, 3])
    weights = peak_weights(adata, None, features)
    # open in 2, 2 and 1 of 3 cells; every cell has 2 open peaks (the median)
    expected = np.log1p(3 / (1 + np.array([2, 2, 1]))) * 2
    np.testing.assert_allclose(weights, expected, rtol=1e-6)
    x = torch.as_tensor(counts)
    out = normalize_input(x, torch.as_tensor(features), "counts", 1e6, torch.as_tensor(weights))
    binary = (counts > 0).astype(np.float32)
    by_hand = binary[:, features] / binary.sum(axis=1, keepdims=True) * expected
    np.testing.assert_allclose(out.numpy(), by_hand, rtol=1e-6)
    # the most open peaks: 0 and 2 (2 cells each), then 1 and 3 tie: order decides
    np.testing.assert_array_equal(most_open_peaks(adata, None, 3), [0, 1, 2])
    mask = np.array([False, True, True])
    np.testing.assert_array_equal(most_open_peaks(adata, None, 2, mask), [0, 1])


@pytest.mark.parametrize("cls", [lt.JIND, lt.SCNYM, lt.SCDET, lt.CellPredX])
def test_models_read_peak_counts_as_tfidf(cls, tmp_path):
    scvi.settings.seed = 0
    adata = _peak_anndata()
    cls.setup_anndata(adata, labels_key="cell_type")
    init = {"n_novel": 0, "n_top_genes": 30} if cls is lt.SCDET else {}
    model = cls(adata, **init)
    weights = model.module.peak_weights
    assert weights is not None
    assert weights.shape == (model.module.n_features,)
    assert model.module.input_type == "counts"  # the kind of data queries must hold
    assert model.init_params_["non_kwargs"]["input_type"] == "peaks"
    if cls is lt.SCDET:  # the 30 peaks open in most reference cells
        assert model.module.n_features == 30
    model.train(max_epochs=30, accelerator="cpu", enable_progress_bar=False)
    assert (model.predict() == adata.obs["cell_type"].to_numpy()).mean() >= 0.9
    model.save(tmp_path / "model")
    loaded = cls.load(tmp_path / "model")
    torch.testing.assert_close(loaded.module.peak_weights, weights)
    np.testing.assert_allclose(
        loaded.predict(adata, soft=True).to_numpy(), model.predict(adata, soft=True).to_numpy()
    )


def test_peak_input_can_be_declared_or_turned_off():
    adata = _peak_anndata()
    lt.JIND.setup_anndata(adata, labels_key="cell_type")
    assert lt.JIND(adata, input_type="counts").module.peak_weights is None
    genes = _peak_anndata()
    genes.var_names = [f"gene_{i}" for i in range(genes.n_vars)]
    lt.JIND.setup_anndata(genes, labels_key="cell_type")
    assert lt.JIND(genes).module.peak_weights is None  # gene names: log(CPM + 1)
    assert lt.JIND(genes, input_type="peaks").module.peak_weights is not None
    lognorm = _peak_anndata()
    lognorm.X = lognorm.X.log1p()
    lt.JIND.setup_anndata(lognorm, labels_key="cell_type")
    assert lt.JIND(lognorm).module.peak_weights is None  # not counts: used as given
    with pytest.raises(ValueError, match="input_type='peaks' needs the peak counts"):
        lt.JIND(lognorm, input_type="peaks")


def test_open_set_layer_reads_peaks_as_unit_length_tfidf():
    from labeltransfer.base._reference_space import expression_features

    adata = _peak_anndata()
    lt.JIND.setup_anndata(adata, labels_key="cell_type")
    module = lt.JIND(adata).module
    x = torch.as_tensor(adata.X.toarray())
    features = expression_features(x, module)
    tfidf = normalize_input(x, module.feature_idx, "counts", 1e6, module.peak_weights)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(adata.n_obs))
    torch.testing.assert_close(features * tfidf.norm(dim=1, keepdim=True), tfidf)
    genes = _peak_anndata()
    genes.var_names = [f"gene_{i}" for i in range(genes.n_vars)]
    lt.JIND.setup_anndata(genes, labels_key="cell_type")
    module = lt.JIND(genes).module  # genes: log(CP10k + 1), not scaled
    x = torch.as_tensor(genes.X.toarray())
    torch.testing.assert_close(
        expression_features(x, module), normalize_input(x, module.feature_idx, "counts", 1e4)
    )
