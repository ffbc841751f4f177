"""Property test of the whole gene-activity builder (peak mode) against a brute-force count.

``tests/data/test_gene_activity.py`` checks :func:`overlap_pairs` against brute force and the
builder on hand-made cases; here random genes (both strands), peaks, extensions and chromosome
naming styles go through :func:`~labeltransfer.data.gene_activity` end to end: strand-aware
region, half-open overlap, ``chr1``/``1`` harmonisation and the sum of peak counts.
"""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import sparse

from labeltransfer.data import gene_activity

CHROMS = ["chr1", "chr2"]
gene = st.tuples(
    st.sampled_from(CHROMS), st.integers(0, 400), st.integers(1, 120), st.sampled_from("+-")
)
peak = st.tuples(st.sampled_from([*CHROMS, "chr3"]), st.integers(0, 500), st.integers(1, 80))


def _expected(genes, peaks, counts, up: int, down: int) -> np.ndarray:
    """Cells x genes sums of the counts of peaks sharing >= 1 base with each gene region."""
    overlap = np.zeros((len(peaks), len(genes)))
    for g, (g_chrom, g_start, g_width, strand) in enumerate(genes):
        g_end = g_start + g_width
        lo, hi = (g_start - up, g_end + down) if strand == "+" else (g_start - down, g_end + up)
        lo = max(lo, 0)
        for p, (p_chrom, p_start, p_width) in enumerate(peaks):
            if p_chrom == g_chrom and max(lo, p_start) < min(hi, p_start + p_width):
                overlap[p, g] = 1
    return counts @ overlap


@settings(max_examples=60, deadline=None)
@given(
    genes=st.lists(gene, min_size=1, max_size=6),
    peaks=st.lists(peak, min_size=1, max_size=12),
    up=st.integers(0, 100),
    down=st.integers(0, 100),
    ensembl_peaks=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_peak_mode_matches_brute_force(genes, peaks, up, down, ensembl_peaks, seed):
    table = pd.DataFrame(
        {
            "chrom": [c for c, _, _, _ in genes],
            "start": [s for _, s, _, _ in genes],
            "end": [s + w for _, s, w, _ in genes],
            "strand": [d for _, _, _, d in genes],
            "gene": [f"G{i}" for i in range(len(genes))],
        }
    )
    names = [
        f"{c.removeprefix('chr') if ensembl_peaks else c}:{s}-{s + w}-{i}"
        for i, (c, s, w) in enumerate(peaks)
    ]
    counts = np.random.default_rng(seed).integers(0, 4, size=(3, len(peaks))).astype(np.float32)
    atac = ad.AnnData(
        sparse.csr_matrix(counts),
        obs=pd.DataFrame(index=["a", "b", "c"]),
        var=pd.DataFrame(
            {
                "chrom": [n.split(":")[0] for n in names],
                "start": [s for _, s, _ in peaks],
                "end": [s + w for _, s, w in peaks],
            },
            index=names,
        ),
    )
    expected = _expected(genes, peaks, counts, up, down)
    kwargs = {
        "genes": table,
        "gene_types": None,
        "extend_upstream": up,
        "extend_downstream": down,
        "max_width": None,
    }
    if not _any_overlap(genes, peaks, up, down):
        with pytest.raises(ValueError, match="No gene region overlaps any peak"):
            gene_activity(atac, **kwargs)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # e.g. duplicated gene coordinates
        ga = gene_activity(atac, **kwargs)
    np.testing.assert_array_equal(ga.X.toarray(), expected)
    assert list(ga.var_names) == list(table["gene"])
    assert ga.uns["gene_activity"]["chrom_style_fixed"] is ensembl_peaks


def _any_overlap(genes, peaks, up: int, down: int) -> bool:
    return bool(_expected(genes, peaks, np.ones((1, len(peaks))), up, down).any())
