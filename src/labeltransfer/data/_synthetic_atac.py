"""Simulated paired or unpaired scRNA-seq + scATAC-seq data with planted cell types.

This is a *simulation* for tests, tutorials and benchmarks, not real chromatin data: RNA counts
come from a gamma-Poisson model with planted marker genes, and ATAC peaks sit at real gene loci
(when a gene table is given) with an accessibility that follows the gene's expression in the
cell's type, so that a gene-activity matrix built from the peaks carries the cell-type signal.
"""

from __future__ import annotations

import logging
import warnings
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import sparse

if TYPE_CHECKING:
    from anndata import AnnData
    from mudata import MuData

logger = logging.getLogger(__name__)

__all__ = ["synthetic_multiome"]

_PRIMARY = [f"chr{i}" for i in range(1, 23)] + ["chrX"]
_PEAK_WIDTH = 500


def _genes_from_table(path: Path, n_genes: int, rng: np.random.Generator) -> pd.DataFrame:
    table = pd.read_csv(path, sep="\t", low_memory=False, dtype={"chrom": str, "strand": str})
    ok = (
        table["chrom"].isin(_PRIMARY)
        & table["start"].notna()
        & table["end"].notna()
        & table["strand"].isin(["+", "-"])
        & table["gene_type"].astype(str).str.replace("-", "_").eq("protein_coding")
    )
    table = table.loc[ok].drop_duplicates("symbol")
    width = table["end"] - table["start"]
    table = table.loc[(width >= 2 * _PEAK_WIDTH) & (width < 200_000)]
    if len(table) < n_genes:
        raise ValueError(f"The gene table has only {len(table)} usable genes; ask for fewer.")
    pick = np.sort(rng.choice(len(table), size=n_genes, replace=False))
    sub = table.iloc[pick]
    return pd.DataFrame(
        {
            "chrom": sub["chrom"].to_numpy(),
            "start": sub["start"].to_numpy(np.int64),
            "end": sub["end"].to_numpy(np.int64),
            "strand": sub["strand"].to_numpy(),
        },
        index=pd.Index(sub["symbol"].astype(str).to_numpy()),
    )


def _generated_genes(n_genes: int, rng: np.random.Generator) -> pd.DataFrame:
    """Non-overlapping genes spaced along five synthetic chromosomes."""
    chroms = np.sort(rng.integers(0, 5, size=n_genes))
    width = rng.integers(5_000, 60_000, size=n_genes)
    gap = rng.integers(20_000, 200_000, size=n_genes)
    start = np.zeros(n_genes, dtype=np.int64)
    for c in range(5):
        idx = np.flatnonzero(chroms == c)
        start[idx] = 10_000 + np.cumsum(gap[idx] + width[idx]) - width[idx]
    return pd.DataFrame(
        {
            "chrom": [f"chr{c + 1}" for c in chroms],
            "start": start,
            "end": start + width,
            "strand": rng.choice(["+", "-"], size=n_genes),
        },
        index=pd.Index([f"GENE{i:05d}" for i in range(n_genes)]),
    )


def _type_means(
    n_types: int, n_genes: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Per-type mean expression (types x genes) and the type each marker gene marks (-1: none)."""
    base = rng.lognormal(mean=0.0, sigma=1.0, size=n_genes) * 0.5
    means = np.tile(base, (n_types, 1))
    marker_of = np.full(n_genes, -1)
    n_markers = max(2, n_genes // (2 * n_types))
    order = rng.permutation(n_genes)
    for t in range(n_types):
        genes = order[t * n_markers : (t + 1) * n_markers]
        marker_of[genes] = t
        means[t, genes] *= 2.0 ** rng.uniform(2.0, 4.0, size=len(genes))
    # mild non-marker variation between types
    means *= rng.lognormal(0.0, 0.2, size=means.shape)
    return means, marker_of


def _rna_counts(
    types: np.ndarray, means: np.ndarray, rng: np.random.Generator, dispersion: float = 0.3
) -> sparse.csr_matrix:
    size = rng.lognormal(mean=np.log(5.0), sigma=0.3, size=len(types))
    mu = means[types] * size[:, None]
    rate = rng.gamma(shape=1.0 / dispersion, scale=mu * dispersion)
    return sparse.csr_matrix(rng.poisson(rate).astype(np.float32))


def _peaks(
    genes: pd.DataFrame, n_background: int, rng: np.random.Generator
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Promoter + 1-2 gene-body peaks per gene and intergenic background peaks."""
    rows = []
    owner = []
    kind = []
    for g, (chrom, start, end, strand) in enumerate(
        genes[["chrom", "start", "end", "strand"]].itertuples(index=False)
    ):
        tss = start if strand == "+" else end
        # promoter peak: 400 bp upstream to 100 bp downstream of the TSS
        p_start = tss - 400 if strand == "+" else tss - 100
        rows.append((chrom, max(p_start, 0), max(p_start, 0) + _PEAK_WIDTH))
        owner.append(g)
        kind.append("promoter")
        n_body = int(rng.integers(1, 3))
        lo, hi = start + _PEAK_WIDTH, end - _PEAK_WIDTH
        if hi <= lo:
            continue
        for b in np.sort(rng.integers(lo, hi, size=n_body)):
            rows.append((chrom, int(b), int(b) + _PEAK_WIDTH))
            owner.append(g)
            kind.append("gene_body")
    # background: uniform positions on the same chromosomes, away from the simulated genes
    chrom_len = genes.groupby("chrom")["end"].max() + 1_000_000
    bg_chroms = rng.choice(chrom_len.index.to_numpy(), size=n_background)
    bg_start = (
        rng.random(n_background) * (chrom_len.loc[bg_chroms].to_numpy() - _PEAK_WIDTH)
    ).astype(np.int64)
    far = np.ones(n_background, dtype=bool)
    for chrom, sub in genes.groupby("chrom"):
        on = bg_chroms == chrom
        if not on.any():
            continue
        s = sub["start"].to_numpy() - 5_000
        e = sub["end"].to_numpy() + 5_000
        order = np.argsort(s)
        s, e = s[order], np.maximum.accumulate(e[order])
        k = np.searchsorted(s, bg_start[on] + _PEAK_WIDTH, side="left") - 1
        inside = (k >= 0) & (e[np.maximum(k, 0)] > bg_start[on])
        far[np.flatnonzero(on)[inside]] = False
    for chrom, s in zip(bg_chroms[far], bg_start[far], strict=True):
        rows.append((str(chrom), int(s), int(s) + _PEAK_WIDTH))
        owner.append(-1)
        kind.append("background")
    peaks = pd.DataFrame(rows, columns=["chrom", "start", "end"])
    peaks["peak_type"] = kind
    peaks["gene"] = [genes.index[o] if o >= 0 else "" for o in owner]
    chrom_rank = {c: i for i, c in enumerate(sorted(peaks["chrom"].unique(), key=_chrom_key))}
    order = np.lexsort((peaks["start"].to_numpy(), peaks["chrom"].map(chrom_rank).to_numpy()))
    peaks = peaks.iloc[order].drop_duplicates(["chrom", "start", "end"]).reset_index(drop=True)
    peaks.index = (
        peaks["chrom"] + ":" + peaks["start"].astype(str) + "-" + peaks["end"].astype(str)
    )
    owner_arr = genes.index.get_indexer(peaks["gene"]).astype(np.int64)
    return peaks, owner_arr, (peaks["peak_type"] == "promoter").to_numpy()


def _chrom_key(c: str) -> tuple[int, str]:
    s = c.removeprefix("chr")
    return (int(s), "") if s.isdigit() else (1_000, s)


def _atac_counts(
    types: np.ndarray,
    means: np.ndarray,
    owner: np.ndarray,
    promoter: np.ndarray,
    shift: np.ndarray,
    rng: np.random.Generator,
    block: int = 2_000,
) -> sparse.csr_matrix:
    """Binary-ish peak counts: Bernoulli accessibility following the owner gene's expression."""
    # per type x gene relative expression in [0, 1]
    rel = means / means.max(axis=0, keepdims=True)
    p_gene = 0.01 + 0.29 * rel  # 1% (silent) to 30% (highest type) of cells accessible
    n_peaks = len(owner)
    p_type = np.full((means.shape[0], n_peaks), 0.01)  # background peaks
    genic = owner >= 0
    scale = np.where(promoter, 1.0, 0.6)
    p_type[:, genic] = p_gene[:, owner[genic]] * scale[genic]
    p_type = np.clip(p_type * shift[None, :], 0.0, 0.95)
    depth = rng.lognormal(mean=0.0, sigma=0.3, size=len(types))
    blocks = []
    for lo in range(0, len(types), block):
        t = types[lo : lo + block]
        p = np.clip(p_type[t] * depth[lo : lo + block, None], 0.0, 0.95)
        hit = rng.random(p.shape) < p
        counts = hit.astype(np.float32)
        counts[hit & (rng.random(p.shape) < 0.1)] = 2.0  # both Tn5 cuts counted
        blocks.append(sparse.csr_matrix(counts))
    return sparse.vstack(blocks, format="csr")


def synthetic_multiome(
    *,
    n_cells: int = 2000,
    n_types: int = 5,
    n_genes: int = 500,
    n_background_peaks: int = 2000,
    paired: bool = True,
    modality_shift: float = 0.5,
    n_novel: int = 0,
    seed: int = 0,
    genome_table: str | PathLike | None = None,
) -> MuData | tuple[AnnData, AnnData]:
    """Simulate scRNA-seq + scATAC-seq with planted cell types (a simulation, not real data).

    RNA: a gamma-Poisson model (dispersion 0.3, log-normal library sizes) whose per-type means
    carry ``n_genes // (2 * (n_types + n_novel))`` planted marker genes per type (4-16 fold up).
    ATAC: for every gene a promoter peak (400 bp upstream to 100 bp downstream of the TSS) and one or two 500 bp
    gene-body peaks; a cell of type ``t`` has a peak open with probability ``0.01 + 0.29 *
    relative expression of the gene in t`` (gene-body peaks x 0.6), background peaks with
    probability 0.01, times a per-cell depth factor; open peaks count 1 (2 with probability 0.1).
    ``modality_shift`` multiplies each peak's probability by ``exp(N(0, modality_shift))``, so the
    ATAC modality departs from the RNA one peak by peak.

    Parameters
    ----------
    n_cells
        Cells per modality (and in total when ``paired``).
    n_types
        Cell types shared by both modalities (``"type_0"``, ...).
    n_genes
        Genes (RNA features); each gets a promoter and gene-body peaks.
    n_background_peaks
        Intergenic peaks with uniform low accessibility (those falling within 5 kb of a simulated
        gene are dropped).
    paired
        ``True``: the same cells measured twice, returned as a :class:`~mudata.MuData` with
        modalities ``"rna"`` and ``"atac"``. ``False``: different cells for RNA and ATAC, returned
        as a tuple ``(rna, atac)`` of AnnData (a reference and a query).
    modality_shift
        Standard deviation of the log-normal per-peak factor perturbing ATAC rates.
    n_novel
        Extra cell types (``"novel_type_0"``, ...) with their own markers. Unpaired: present only
        in the ATAC cells (novel to an RNA reference). Paired: present in both, flagged by
        ``obs['novel']``.
    seed
        Random seed.
    genome_table
        Path to a gene table like ``hs_genes_hg38.tsv.gz`` (``symbol, gene_type, chrom, start,
        end, strand``): genes are protein-coding hg38 genes and peaks sit at their real loci.
        ``None`` (or a missing file, warned) generates coordinates on five synthetic chromosomes.

    Returns
    -------
    :class:`~mudata.MuData` (paired) or ``(rna, atac)`` (unpaired). Both AnnData have raw counts in
    CSR ``X`` and ``obs`` columns ``cell_type`` (categorical), ``batch`` and ``modality``
    (``"rna"``/``"atac"``) and ``novel``. RNA ``var`` has ``chrom``, ``start``, ``end``,
    ``strand``, ``interval`` (``"chr1:100-200"``, as 10x multiome) and ``marker_of``; ATAC ``var``
    is named ``"chr:start-end"`` with ``chrom``, ``start``, ``end``, ``peak_type``
    (``promoter``/``gene_body``/``background``) and ``gene``. ``uns['synthetic']`` records the
    parameters and whether coordinates are real (``"coordinates"``).
    """
    import anndata as ad

    if n_types < 1 or n_cells < 1 or n_genes < 2:
        raise ValueError("n_cells, n_types must be >= 1 and n_genes >= 2.")
    rng = np.random.default_rng(seed)
    coordinates = "generated"
    genes = None
    if genome_table is not None:
        path = Path(genome_table)
        if path.exists():
            genes = _genes_from_table(path, n_genes, rng)
            coordinates = f"real ({path.name})"
        else:
            warnings.warn(
                f"genome_table {str(path)!r} not found; generating gene coordinates instead.",
                UserWarning,
                stacklevel=2,
            )
    if genes is None:
        logger.info("synthetic_multiome: gene coordinates are generated (no genome_table).")
        genes = _generated_genes(n_genes, rng)

    n_all = n_types + n_novel
    names = [f"type_{t}" for t in range(n_types)] + [f"novel_type_{t}" for t in range(n_novel)]
    means, marker_of = _type_means(n_all, n_genes, rng)
    peaks, owner, promoter = _peaks(genes, n_background_peaks, rng)
    # drawn whatever modality_shift is, so RNA and cell types do not depend on it
    shift = np.exp(modality_shift * rng.standard_normal(len(peaks)))

    def draw_types(n: int, k: int) -> np.ndarray:
        weights = rng.dirichlet(np.full(k, 5.0))
        return np.sort(rng.choice(k, size=n, p=weights))

    if paired:
        t_rna = t_atac = draw_types(n_cells, n_all)
    else:
        t_rna = draw_types(n_cells, n_types)
        t_atac = draw_types(n_cells, n_all)

    def obs(types: np.ndarray, prefix: str, modality: str) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "cell_type": pd.Categorical([names[t] for t in types], categories=names),
                "batch": modality,
                "modality": modality,
                "novel": types >= n_types,
            },
            index=pd.Index([f"{prefix}{i}" for i in range(len(types))]),
        )

    rna_var = genes.copy()
    rna_var["interval"] = (
        rna_var["chrom"] + ":" + rna_var["start"].astype(str) + "-" + rna_var["end"].astype(str)
    )
    rna_var["marker_of"] = [names[m] if m >= 0 else "" for m in marker_of]
    info = {
        "simulation": "synthetic_multiome: simulated data, not real chromatin or expression",
        "coordinates": coordinates,
        "n_types": n_types,
        "n_novel": n_novel,
        "paired": paired,
        "modality_shift": modality_shift,
        "seed": seed,
    }
    rna = ad.AnnData(
        X=_rna_counts(t_rna, means, rng),
        obs=obs(t_rna, "cell_" if paired else "rna_", "rna"),
        var=rna_var,
    )
    atac = ad.AnnData(
        X=_atac_counts(t_atac, means, owner, promoter, shift, rng),
        obs=obs(t_atac, "cell_" if paired else "atac_", "atac"),
        var=peaks,
    )
    rna.uns["synthetic"] = dict(info)
    atac.uns["synthetic"] = dict(info)
    if not paired:
        return rna, atac
    import mudata as md

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # mudata 0.3 pull_on_update notice
        mdata = md.MuData({"rna": rna, "atac": atac})
    mdata.uns["synthetic"] = dict(info)
    return mdata
