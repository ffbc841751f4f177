from __future__ import annotations

import warnings
from pathlib import Path

import mudata as md
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from labeltransfer.data._gene_activity import gene_activity
from labeltransfer.data._synthetic_atac import synthetic_multiome


@pytest.fixture(scope="module")
def hg38(shared_data) -> Path:
    """The shared gene table (the test skips without ``../shared/data``, fails on CI)."""
    return shared_data / "hs_genes_hg38.tsv.gz"


def _log1p_cpm(X) -> np.ndarray:
    X = np.asarray(X.todense(), dtype=np.float64)
    return np.log1p(X / np.maximum(X.sum(1, keepdims=True), 1) * 1e4)


def _zscore(A: np.ndarray) -> np.ndarray:
    return (A - A.mean(0)) / (A.std(0) + 1e-8)


def _centroid_accuracy(rna, ga, atac_types: np.ndarray) -> float:
    """Nearest centroid trained on RNA log1p-CPM of markers, applied to gene activity."""
    markers = rna.var_names[rna.var["marker_of"] != ""]
    R = _zscore(_log1p_cpm(rna[:, markers].X))
    G = _zscore(_log1p_cpm(ga[:, markers].X))
    cats = rna.obs["cell_type"].cat.categories
    rna_types = rna.obs["cell_type"].to_numpy()
    present = [c for c in cats if (rna_types == c).any()]
    centroids = np.stack([R[rna_types == c].mean(0) for c in present])
    pred = np.asarray(present)[((G[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)]
    return float((pred == atac_types).mean())


def test_paired_structure_and_real_loci(hg38):
    mdata = synthetic_multiome(n_cells=300, n_genes=120, n_background_peaks=300, genome_table=hg38)
    assert isinstance(mdata, md.MuData)
    rna, atac = mdata.mod["rna"], mdata.mod["atac"]
    assert list(rna.obs_names) == list(atac.obs_names)
    assert (rna.obs["cell_type"].to_numpy() == atac.obs["cell_type"].to_numpy()).all()
    assert set(rna.obs["modality"]) == {"rna"}
    assert set(atac.obs["batch"]) == {"atac"}
    assert sparse.issparse(rna.X)
    assert sparse.issparse(atac.X)
    assert set(np.unique(atac.X.data)) <= {1.0, 2.0}  # binary-ish
    density = atac.X.nnz / np.prod(atac.shape)
    assert 0.005 < density < 0.15
    assert np.allclose(rna.X.data, np.round(rna.X.data))
    assert "simulat" in mdata.uns["synthetic"]["simulation"]
    assert mdata.uns["synthetic"]["coordinates"].startswith("real")
    # genes are real hg38 protein-coding loci
    table = pd.read_csv(hg38, sep="\t", low_memory=False).drop_duplicates("symbol")
    table = table.set_index("symbol").loc[rna.var_names]
    assert (table["chrom"].to_numpy() == rna.var["chrom"].to_numpy()).all()
    assert (table["start"].to_numpy() == rna.var["start"].to_numpy()).all()
    assert (table["gene_type"] == "protein-coding").all()
    # each gene has a promoter peak within 2 kb upstream of its TSS and 1-2 body peaks
    peaks = atac.var
    prom = peaks[peaks["peak_type"] == "promoter"]
    assert len(prom) == rna.n_vars
    g = rna.var.loc[prom["gene"]]
    tss = np.where(g["strand"] == "+", g["start"], g["end"])
    mid = (prom["start"].to_numpy() + prom["end"].to_numpy()) // 2
    upstream = np.where(g["strand"] == "+", tss - mid, mid - tss)
    assert ((upstream > 0) & (upstream < 2000)).all()
    body = peaks[peaks["peak_type"] == "gene_body"]["gene"].value_counts()
    assert body.between(1, 2).all()
    assert (peaks["peak_type"] == "background").sum() > 200
    assert peaks.index.is_unique
    assert (
        peaks.index[0]
        == f"{peaks['chrom'].iloc[0]}:{peaks['start'].iloc[0]}-{peaks['end'].iloc[0]}"
    )


def test_gene_activity_carries_cell_type_signal(hg38):
    mdata = synthetic_multiome(n_cells=1000, n_genes=300, genome_table=hg38, modality_shift=0.5)
    rna, atac = mdata.mod["rna"], mdata.mod["atac"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # genes without coordinates in the table
        ga_table = gene_activity(atac, genes=hg38)
    ga_rna = gene_activity(atac, genes=rna)  # 10x-style var['interval'], no strand
    truth = atac.obs["cell_type"].to_numpy()
    chance = 1 / 5
    assert _centroid_accuracy(rna, ga_table, truth) > 3 * chance
    assert _centroid_accuracy(rna, ga_rna, truth) > 3 * chance


def test_unpaired_generated_coordinates_and_novel():
    rna, atac = synthetic_multiome(
        n_cells=400, n_genes=100, n_background_peaks=200, paired=False, n_novel=1, seed=2
    )
    assert not set(rna.obs_names) & set(atac.obs_names)
    assert "novel_type_0" not in set(rna.obs["cell_type"])
    assert "novel_type_0" in set(atac.obs["cell_type"])
    assert atac.obs["novel"].any()
    assert not rna.obs["novel"].any()
    assert rna.uns["synthetic"]["coordinates"] == "generated"
    ga = gene_activity(atac, genes=rna, gene_types=None)
    assert ga.uns["gene_activity"]["n_genes_with_signal"] == rna.n_vars
    seen = ~atac.obs["novel"].to_numpy()
    acc = _centroid_accuracy(rna, ga[seen], atac.obs["cell_type"].to_numpy()[seen])
    assert acc > 0.6


def test_missing_table_warns_and_seed_reproducible(tmp_path):
    with pytest.warns(UserWarning, match="not found"):
        a = synthetic_multiome(
            n_cells=50, n_genes=20, n_background_peaks=20, genome_table=tmp_path / "x.tsv"
        )
    b = synthetic_multiome(n_cells=50, n_genes=20, n_background_peaks=20)
    assert (a.mod["atac"].X != b.mod["atac"].X).nnz == 0
    assert list(a.mod["atac"].var_names) == list(b.mod["atac"].var_names)
    c = synthetic_multiome(n_cells=50, n_genes=20, n_background_peaks=20, seed=1)
    assert (c.mod["rna"].X != b.mod["rna"].X).nnz > 0


def test_modality_shift_perturbs_atac_only():
    a = synthetic_multiome(n_cells=300, n_genes=50, n_background_peaks=50, modality_shift=0.0)
    b = synthetic_multiome(n_cells=300, n_genes=50, n_background_peaks=50, modality_shift=1.0)
    assert (a.mod["rna"].X != b.mod["rna"].X).nnz == 0
    ra = np.asarray(a.mod["atac"].X.mean(0)).ravel()
    rb = np.asarray(b.mod["atac"].X.mean(0)).ravel()
    assert np.std(np.log((rb + 1e-3) / (ra + 1e-3))) > 0.3
