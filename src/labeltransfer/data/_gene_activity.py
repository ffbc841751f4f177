"""Signac-like gene activity for scATAC-seq: peaks or fragments overlapping gene regions.

The gene region is the gene body extended ``extend_upstream`` bases upstream of the TSS
(strand aware) and ``extend_downstream`` bases past the TTS, as Signac's ``GeneActivity``
(Stuart et al., Nat Methods 18:1333, 2021). All coordinates are half-open and 0-based (BED,
10x ``fragments.tsv.gz`` and 10x peak names follow this convention); a peak or fragment counts
for a gene when it overlaps the region by at least one base.
"""

from __future__ import annotations

import gzip
import logging
import re
import warnings
import zlib
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import sparse

from ._genes import read_gene_coordinates

if TYPE_CHECKING:
    from anndata import AnnData
    from mudata import MuData

logger = logging.getLogger(__name__)

__all__ = ["add_gene_activity", "gene_activity"]

# chromosome code * 2**36 + position: positions stay below 2**36 (68 Gb) and codes below 2**26.
_CHROM_SHIFT = np.int64(1) << np.int64(36)
_PEAK_NAME_RE = re.compile(r"^(?P<chrom>.+)[:\-_](?P<start>\d+)[\-_](?P<end>\d+)$")


# --------------------------------------------------------------------------------------------
# interval overlap


def _expand_ranges(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each ``i`` enumerate ``j in [lo[i], hi[i])``; return ``(i, j)`` without Python loops."""
    counts = np.maximum(hi - lo, 0)
    total = int(counts.sum())
    if total == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    owner = np.repeat(np.arange(len(lo), dtype=np.int64), counts)
    first = np.cumsum(counts) - counts
    within = np.arange(total, dtype=np.int64) - np.repeat(first, counts)
    return owner, within + np.repeat(lo.astype(np.int64), counts)


def overlap_pairs(
    a_chrom: np.ndarray,
    a_start: np.ndarray,
    a_end: np.ndarray,
    b_chrom: np.ndarray,
    b_start: np.ndarray,
    b_end: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """All pairs of half-open intervals ``a[i]``, ``b[j]`` that share at least one base.

    Chromosomes are integer codes (negative = unknown, never overlaps). Two intervals overlap when
    ``a_start < b_end`` and ``b_start < a_end`` on the same chromosome. The pairs split into those
    where ``b`` starts inside ``a`` (``a_start <= b_start < a_end``) and those where ``a`` starts
    strictly inside ``b`` (``b_start < a_start < b_end``); each set is found with two
    :func:`numpy.searchsorted` calls on sorted starts, so the cost is
    ``O((n + m) log(n + m) + pairs)`` and no interval length bound is needed.

    Returns
    -------
    ``(i, j)`` int64 arrays of the overlapping pairs (unordered).
    """
    a_chrom = np.asarray(a_chrom, dtype=np.int64)
    b_chrom = np.asarray(b_chrom, dtype=np.int64)
    a_start = np.asarray(a_start, dtype=np.int64)
    a_end = np.asarray(a_end, dtype=np.int64)
    b_start = np.asarray(b_start, dtype=np.int64)
    b_end = np.asarray(b_end, dtype=np.int64)
    a_ok = (a_chrom >= 0) & (a_end > a_start)
    b_ok = (b_chrom >= 0) & (b_end > b_start)
    a_idx = np.flatnonzero(a_ok)
    b_idx = np.flatnonzero(b_ok)
    a_s = a_chrom[a_idx] * _CHROM_SHIFT + a_start[a_idx]
    a_e = a_chrom[a_idx] * _CHROM_SHIFT + a_end[a_idx]
    b_s = b_chrom[b_idx] * _CHROM_SHIFT + b_start[b_idx]
    b_e = b_chrom[b_idx] * _CHROM_SHIFT + b_end[b_idx]

    # b starts in [a_start, a_end)
    b_order = np.argsort(b_s, kind="stable")
    b_sorted = b_s[b_order]
    lo = np.searchsorted(b_sorted, a_s, side="left")
    hi = np.searchsorted(b_sorted, a_e, side="left")
    ia1, pos1 = _expand_ranges(lo, hi)
    jb1 = b_order[pos1]

    # a starts in (b_start, b_end)
    a_order = np.argsort(a_s, kind="stable")
    a_sorted = a_s[a_order]
    lo = np.searchsorted(a_sorted, b_s, side="right")
    hi = np.searchsorted(a_sorted, b_e, side="left")
    jb2, pos2 = _expand_ranges(lo, hi)
    ia2 = a_order[pos2]

    i = a_idx[np.concatenate([ia1, ia2])]
    j = b_idx[np.concatenate([jb1, jb2])]
    return i, j


# --------------------------------------------------------------------------------------------
# chromosome names


def _canonical_chrom(names: Sequence[str] | np.ndarray) -> np.ndarray:
    """``chr1``/``1`` -> ``1``; ``chrM``/``M``/``MT`` -> ``MT``; case of the prefix ignored."""
    out = pd.Series(np.asarray(names, dtype=object)).astype(str)
    out = out.str.replace(r"^chr", "", regex=True, case=False)
    out = out.where(~out.isin(["M", "m", "Mt", "mt"]), "MT")
    return out.to_numpy(dtype=object)


def _chrom_style(names: Sequence[str]) -> str:
    names = [str(n) for n in names]
    if not names:
        return "none"
    with_chr = sum(n.lower().startswith("chr") for n in names)
    if with_chr == len(names):
        return "UCSC ('chr1')"
    if with_chr == 0:
        return "Ensembl ('1')"
    return "mixed"


class _ChromMatcher:
    """Match data chromosome names to gene chromosome codes, harmonising chr1/1 and chrM/MT."""

    def __init__(self, gene_chroms: np.ndarray):
        self.gene_names = pd.Index(pd.unique(gene_chroms))
        self.gene_codes = self.gene_names.get_indexer(gene_chroms).astype(np.int64)
        self.canon_to_code: dict[str, int] = {}
        for code, canon in enumerate(_canonical_chrom(self.gene_names)):
            self.canon_to_code.setdefault(canon, code)
        self.data_seen: set[str] = set()
        self.n_exact = 0
        self.n_harmonised = 0
        self.harmonised_examples: dict[str, str] = {}

    def codes(self, data_chroms: Sequence[str]) -> np.ndarray:
        """Gene-chromosome code for each (unique) data chromosome name; -1 when absent."""
        names = pd.Index(np.asarray(data_chroms, dtype=object).astype(str))
        exact = self.gene_names.get_indexer(names).astype(np.int64)
        loose = np.array(
            [self.canon_to_code.get(c, -1) for c in _canonical_chrom(names)], dtype=np.int64
        )
        out = np.where(exact >= 0, exact, loose)
        for name, e, lo in zip(names, exact, loose, strict=True):
            if name in self.data_seen:
                continue
            self.data_seen.add(name)
            if e >= 0:
                self.n_exact += 1
            elif lo >= 0:
                self.n_harmonised += 1
                self.harmonised_examples.setdefault(name, str(self.gene_names[lo]))
        return out

    @property
    def fixed(self) -> bool:
        return self.n_harmonised > 0

    def report(self) -> None:
        if self.fixed:
            examples = ", ".join(
                f"{k}->{v}" for k, v in list(self.harmonised_examples.items())[:3]
            )
            logger.info(
                "Chromosome names differ between the data (%s) and the genes (%s); harmonised %d "
                "chromosome(s) (%s).",
                _chrom_style(sorted(self.data_seen)),
                _chrom_style(self.gene_names),
                self.n_harmonised,
                examples,
            )

    def zero_overlap_error(self, what: str) -> ValueError:
        data = sorted(self.data_seen)
        genes = list(self.gene_names)
        return ValueError(
            f"No gene region overlaps any {what}. Chromosomes in the data look "
            f"{_chrom_style(data)} (e.g. {data[:5]}), in the gene coordinates "
            f"{_chrom_style(genes)} (e.g. {genes[:5]}). Check that both use the same genome "
            "assembly (hg38 vs hg19, human vs mouse) and chromosome naming; pass gene coordinates "
            "matching the data."
        )


# --------------------------------------------------------------------------------------------
# gene regions


def _gene_regions(
    genes: Any,
    *,
    gene_types: Sequence[str] | None,
    extend_upstream: int,
    extend_downstream: int,
    max_width: float | None,
) -> tuple[pd.DataFrame, int]:
    if extend_upstream < 0 or extend_downstream < 0:
        raise ValueError(
            "extend_upstream and extend_downstream must be >= 0 (Signac defaults: 2000 and 0)."
        )
    table = read_gene_coordinates(genes, gene_types=gene_types)
    if len(table) == 0:
        raise ValueError("The gene coordinates are empty after filtering; check gene_types.")
    minus = (table["strand"] == "-").to_numpy()
    start = table["start"].to_numpy(np.int64)
    end = table["end"].to_numpy(np.int64)
    up = np.int64(extend_upstream)
    down = np.int64(extend_downstream)
    region_start = np.where(minus, start - down, start - up)
    region_end = np.where(minus, end + up, end + down)
    region_start = np.maximum(region_start, 0)
    table = table.assign(region_start=region_start, region_end=region_end)
    n_wide = 0
    if max_width is not None:
        # Signac keeps width(transcripts) < max.width after extension.
        keep = (region_end - region_start) < max_width
        n_wide = int((~keep).sum())
        if n_wide:
            logger.info(
                "Dropped %d genes whose extended region is >= max_width=%g bp.", n_wide, max_width
            )
        table = table.loc[keep]
    if len(table) == 0:
        raise ValueError(f"Every gene is wider than max_width={max_width}; raise max_width.")
    return table, n_wide


# --------------------------------------------------------------------------------------------
# peaks


def _peak_coordinates(var: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lower = {str(c).lower(): c for c in var.columns}
    chrom_col = next(
        (lower[c] for c in ("chrom", "chr", "chromosome", "seqnames") if c in lower), None
    )
    if chrom_col is not None and "start" in lower and "end" in lower:
        chrom = var[chrom_col].astype(str).to_numpy()
        start = pd.to_numeric(var[lower["start"]], errors="coerce").to_numpy()
        end = pd.to_numeric(var[lower["end"]], errors="coerce").to_numpy()
        if np.isnan(start).any() or np.isnan(end).any():
            raise ValueError("Peak var columns start/end contain missing or non-numeric values.")
        return chrom, start.astype(np.int64), end.astype(np.int64)
    parsed = pd.Series(var.index.astype(str)).str.extract(_PEAK_NAME_RE)
    bad = parsed["chrom"].isna().to_numpy()
    if bad.any():
        examples = list(var.index[bad][:3])
        raise ValueError(
            f"{int(bad.sum())} of {len(var)} peak names are not 'chr:start-end' or "
            f"'chr-start-end' (e.g. {examples}); name the peaks that way or add var columns "
            "'chrom', 'start', 'end'."
        )
    start = parsed["start"].astype(np.int64).to_numpy()
    end = parsed["end"].astype(np.int64).to_numpy()
    return parsed["chrom"].to_numpy(dtype=object), start, end


def _peak_mode(
    atac: AnnData, regions: pd.DataFrame, matcher: _ChromMatcher, layer: str | None
) -> tuple[sparse.csr_matrix, dict[str, Any]]:
    chrom, start, end = _peak_coordinates(atac.var)
    if (end < start).any():
        i = int(np.flatnonzero(end < start)[0])
        raise ValueError(f"Peak {atac.var_names[i]!r} has end < start.")
    uniq, inverse = np.unique(chrom.astype(str), return_inverse=True)
    peak_codes = matcher.codes(uniq)[inverse]
    pi, gi = overlap_pairs(
        peak_codes,
        start,
        end,
        matcher.gene_codes[regions["_row"].to_numpy()],
        regions["region_start"].to_numpy(),
        regions["region_end"].to_numpy(),
    )
    if len(pi) == 0:
        raise matcher.zero_overlap_error("peak")
    overlap = sparse.csr_matrix(
        (np.ones(len(pi), dtype=np.float32), (pi, gi)), shape=(atac.n_vars, len(regions))
    )
    X = atac.layers[layer] if layer is not None else atac.X
    if X is None:
        raise ValueError("The ATAC AnnData has no X; pass layer= with the peak counts.")
    if not sparse.issparse(X):
        X = sparse.csr_matrix(np.asarray(X))
    X = sparse.csr_matrix(X)
    _check_counts(X.data)
    out = (X @ overlap).astype(np.float32)
    info = {
        "n_peaks": int(atac.n_vars),
        "n_peaks_overlapping_genes": int(overlap.getnnz(axis=1).astype(bool).sum()),
    }
    return sparse.csr_matrix(out), info


def _check_counts(values: np.ndarray) -> None:
    """Raise on NaN/inf or negative peak counts; warn on non-integer ones (first 1M values)."""
    if values.size == 0:
        return
    low, high = values.min(), values.max()  # no temporary arrays; NaN propagates to both
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ValueError(
            "The peak matrix has NaN or infinite values; gene activity sums raw peak counts. "
            "Pass the raw counts via layer= (or remove the affected cells)."
        )
    if low < 0:
        raise ValueError(
            f"The peak matrix has negative values (min {low:.4g}): it looks scaled or "
            "normalised, but gene activity sums raw peak counts. Pass the raw counts via layer=."
        )
    head = values[:1_000_000]
    if np.any(head != np.round(head)):
        warnings.warn(
            "The peak matrix has non-integer values (normalised, TF-IDF or imputed data?); "
            "gene activity sums raw counts. Pass the raw counts via layer=.",
            UserWarning,
            stacklevel=4,
        )


# --------------------------------------------------------------------------------------------
# fragments


def _open_fragments(path: Path):
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rb")  # bgzip files are multi-member gzip: read fine
    return open(path, "rb")


def _fragment_layout(path: Path) -> tuple[int, int]:
    """Count the leading '#' header lines and the columns of the first record."""
    n_header = 0
    try:
        with _open_fragments(path) as fh:
            for raw in fh:
                if raw.startswith(b"#"):
                    n_header += 1
                    continue
                fields = raw.rstrip(b"\r\n").split(b"\t")
                if len(fields) < 4:
                    raise ValueError(
                        f"{path}: line {n_header + 1} has {len(fields)} tab-separated columns; a "
                        "fragments file needs chrom, start, end, barcode[, count]."
                    )
                return n_header, len(fields)
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise _truncated(path, err) from err
    raise ValueError(f"Fragments file {path} has no records.")


def _truncated(path: Path, err: Exception) -> ValueError:
    return ValueError(
        f"Fragments file {str(path)!r} is truncated or not a valid gzip/bgzip file ({err}); "
        "re-download or re-create it (e.g. `bgzip -t` checks it)."
    )


def _fragment_mode(
    path: Path,
    cells: pd.Index,
    regions: pd.DataFrame,
    matcher: _ChromMatcher,
    chunk_size: int,
) -> tuple[sparse.csr_matrix, dict[str, Any]]:
    n_header, n_cols = _fragment_layout(path)
    n_cells, n_genes = len(cells), len(regions)
    gene_chrom = matcher.gene_codes[regions["_row"].to_numpy()]
    g_start = regions["region_start"].to_numpy(np.int64)
    g_end = regions["region_end"].to_numpy(np.int64)
    acc = sparse.csr_matrix((n_cells, n_genes), dtype=np.float32)
    n_fragments = n_in_cells = n_overlapping = 0
    n_barcodes_seen: set[str] = set()
    try:
        with _open_fragments(path) as fh:
            reader = pd.read_csv(
                fh,
                sep="\t",
                header=None,
                skiprows=n_header,
                dtype={0: "category", 3: "category"},
                chunksize=chunk_size,
                skip_blank_lines=False,
            )
            for chunk in reader:
                if chunk.shape[1] != n_cols:
                    raise ValueError(
                        f"{path}: expected {n_cols} columns, found {chunk.shape[1]} near line "
                        f"{n_header + int(chunk.index[0]) + 1}."
                    )
                line0 = n_header + 1  # line number of chunk.index == 0
                starts, ends = _check_chunk(chunk, path, line0, n_cols)
                n_fragments += len(chunk)
                bc = chunk[3]
                if len(n_barcodes_seen) < 1_000:
                    n_barcodes_seen.update(map(str, bc.cat.categories[:1_000]))
                row_of_cat = cells.get_indexer(bc.cat.categories.astype(str))
                rows = row_of_cat[bc.cat.codes.to_numpy()]
                rows[bc.cat.codes.to_numpy() < 0] = -1
                in_cell = rows >= 0
                n_in_cells += int(in_cell.sum())
                if not in_cell.any():
                    continue
                chrom = chunk[0]
                code_of_cat = matcher.codes(chrom.cat.categories.astype(str))
                codes = code_of_cat[chrom.cat.codes.to_numpy()]
                codes[~in_cell] = -1
                fi, gi = overlap_pairs(codes, starts, ends, gene_chrom, g_start, g_end)
                hit = np.zeros(len(codes), dtype=bool)
                hit[fi] = True
                n_overlapping += int(hit.sum())
                if len(fi):
                    part = sparse.csr_matrix(
                        (np.ones(len(fi), dtype=np.float32), (rows[fi], gi)),
                        shape=(n_cells, n_genes),
                    )
                    acc = acc + part
    except pd.errors.ParserError as err:
        match = re.search(r"line (\d+)", str(err))
        where = f"line {match.group(1)}" if match else "a line"
        raise ValueError(
            f"Malformed fragments file {str(path)!r}: {where} has a different number of columns "
            f"than the first record ({n_cols}): {err}"
        ) from err
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise _truncated(path, err) from err
    if n_in_cells == 0:
        examples = sorted(n_barcodes_seen)[:3]
        raise ValueError(
            f"None of the barcodes in {str(path)!r} (e.g. {examples}) are cells (e.g. "
            f"{list(cells[:3])}); pass barcodes= with the fragment-file barcode of each cell "
            "(e.g. strip a sample prefix or add the '-1' suffix)."
        )
    if acc.nnz == 0:
        raise matcher.zero_overlap_error("fragment")
    info = {
        "fragments": str(path),
        "n_fragments": int(n_fragments),
        "n_fragments_in_cells": int(n_in_cells),
        "n_fragments_overlapping_genes": int(n_overlapping),
    }
    acc.sum_duplicates()
    return acc, info


def _check_chunk(
    chunk: pd.DataFrame, path: Path, line0: int, n_cols: int
) -> tuple[np.ndarray, np.ndarray]:
    """Validate a chunk of fragments; return start and end as int64."""
    missing = chunk.isna().any(axis=1).to_numpy()
    if missing.any():
        i = int(chunk.index[np.flatnonzero(missing)[0]])
        raise ValueError(
            f"Malformed fragments file {str(path)!r}: line {line0 + i} has fewer than {n_cols} "
            "columns (or an empty field); expected chrom, start, end, barcode[, count]."
        )
    cols = []
    for c in (1, 2):
        values = chunk[c]
        if not pd.api.types.is_integer_dtype(values):
            numeric = pd.to_numeric(values, errors="coerce")
            bad = numeric.isna().to_numpy() | (numeric.to_numpy() != np.round(numeric.to_numpy()))
            if bad.any():
                i = int(chunk.index[np.flatnonzero(bad)[0]])
                raise ValueError(
                    f"Malformed fragments file {str(path)!r}: line {line0 + i} has a non-integer "
                    f"{'start' if c == 1 else 'end'} ({values.iloc[np.flatnonzero(bad)[0]]!r})."
                )
            values = numeric
        cols.append(values.to_numpy().astype(np.int64))
    start, end = cols
    bad = end < start
    if bad.any():
        i = int(chunk.index[np.flatnonzero(bad)[0]])
        raise ValueError(
            f"Malformed fragments file {str(path)!r}: line {line0 + i} has end < start "
            f"({start[i - chunk.index[0]]} > {end[i - chunk.index[0]]})."
        )
    return start, end


# --------------------------------------------------------------------------------------------
# public API


def gene_activity(
    atac: AnnData | None = None,
    *,
    genes: str | PathLike | pd.DataFrame | AnnData,
    fragments: str | PathLike | None = None,
    barcodes: Sequence[str] | None = None,
    extend_upstream: int = 2000,
    extend_downstream: int = 0,
    gene_types: Sequence[str] | None = ("protein_coding",),
    max_width: float | None = 500_000,
    layer: str | None = None,
    chunk_size: int = 2_000_000,
) -> AnnData:
    """Gene activity of scATAC-seq cells, as Signac's ``GeneActivity``.

    Each gene's region is its body plus ``extend_upstream`` bases upstream of the TSS and
    ``extend_downstream`` bases downstream of the TTS (strand aware: for a ``-`` gene upstream is
    past its end). With a fragments file, the activity of a gene in a cell is the number of the
    cell's fragments that overlap the region (each fragment counts once per gene; the duplicate
    count column is ignored, as Signac counts fragments, not cut sites). Without one, it is the sum
    of the counts of the peaks that overlap the region (Seurat v3 ``CreateGeneActivityMatrix``).

    Parameters
    ----------
    atac
        Cells x peaks AnnData. Peaks are located by var columns ``chrom``, ``start``, ``end`` or by
        names ``"chr1:100-200"`` / ``"chr1-100-200"`` (0-based start, exclusive end, as 10x
        ``peaks.bed``). Optional when ``fragments`` and ``barcodes`` are given.
    genes
        Gene coordinates: anything :func:`read_gene_coordinates` reads (GTF/GFF path, gene table
        such as ``hs_genes_hg38.tsv.gz``, DataFrame, or an RNA AnnData with ``var['interval']``).
    fragments
        10x ``fragments.tsv.gz`` (chrom, start, end, barcode[, count]; gzip, bgzip or plain text;
        ``#`` header lines skipped; the tabix index is not needed). The file need not be sorted:
        it is streamed in chunks of ``chunk_size`` lines and each chunk is matched on its own, so
        memory is bounded by the chunk and the cells x genes result.
    barcodes
        Fragment-file barcode of each cell. Defaults to ``atac.obs_names``; without ``atac`` these
        are the cells (the output's ``obs_names``). Fragments of other barcodes are ignored.
    extend_upstream
        Bases upstream of the TSS (Signac default ``extend.upstream = 2000``).
    extend_downstream
        Bases downstream of the TTS (Signac default ``extend.downstream = 0``).
    gene_types
        Gene biotypes to keep (Signac default ``biotypes = "protein_coding"``); ``None`` keeps all.
    max_width
        Drop genes whose extended region is ``>= max_width`` bases (Signac default
        ``max.width = 5e5``); ``None`` keeps all.
    layer
        Layer of ``atac`` with raw peak counts (peak mode); ``None`` uses ``X``.
    chunk_size
        Fragment lines read per chunk.

    Returns
    -------
    Cells x genes AnnData, ``X`` CSR float32 counts; ``obs`` copied from ``atac`` (or built from
    ``barcodes``); ``var`` the genes used (``chrom``, ``start``, ``end``, ``strand``, ``gene``,
    ``region_start``, ``region_end``, ...); ``uns['gene_activity']`` records ``source``
    (``"fragments"`` or ``"peaks"``), the extensions, ``n_genes``, ``n_genes_with_signal``,
    ``chrom_style_fixed`` and counts of peaks/fragments used.

    Notes
    -----
    Chromosome names are matched as given, and otherwise after harmonising the ``chr`` prefix and
    the mitochondrial name (``chr1``/``1``, ``chrM``/``MT``); ``uns['gene_activity']
    ['chrom_style_fixed']`` says whether that was needed. When no gene overlaps any peak or
    fragment a :class:`ValueError` names both chromosome styles. Overlaps are found with sorted
    interval starts and :func:`numpy.searchsorted` (no Python loop over peaks, fragments or genes);
    the peak matrix is never densified (``X @ overlap`` with a sparse peaks x genes matrix).
    Peak counts with NaN, infinite or negative values raise; non-integer values only warn.

    Examples
    --------
    >>> ga = gene_activity(atac, genes="hs_genes_hg38.tsv.gz")  # doctest: +SKIP
    >>> ga = gene_activity(atac, genes=gtf_path, fragments="fragments.tsv.gz")  # doctest: +SKIP
    """
    import anndata as ad

    if atac is not None and not isinstance(atac, ad.AnnData):
        raise TypeError(
            f"atac must be an AnnData of cells x peaks (or None with fragments=), got "
            f"{type(atac).__name__}; for a MuData use `add_gene_activity(mdata)`."
        )
    if atac is None and fragments is None:
        raise ValueError(
            "Pass an ATAC AnnData (peak counts) and/or fragments= (a fragments file)."
        )
    if atac is None and barcodes is None:
        raise ValueError(
            "Without an ATAC AnnData, pass barcodes= (the cell barcodes to count fragments for)."
        )
    if chunk_size < 1:
        raise ValueError("chunk_size must be a positive number of lines.")
    regions, n_wide = _gene_regions(
        genes,
        gene_types=gene_types,
        extend_upstream=extend_upstream,
        extend_downstream=extend_downstream,
        max_width=max_width,
    )
    regions = regions.assign(_row=np.arange(len(regions)))
    matcher = _ChromMatcher(regions["chrom"].to_numpy(dtype=object))

    if atac is not None:
        obs = atac.obs.copy()
        if barcodes is not None and len(barcodes) != atac.n_obs:
            raise ValueError(
                f"barcodes has {len(barcodes)} entries but atac has {atac.n_obs} cells; pass one "
                "fragment-file barcode per cell of atac."
            )
    else:
        obs = pd.DataFrame(index=pd.Index(np.asarray(barcodes, dtype=str)))
    cells = pd.Index(np.asarray(barcodes if barcodes is not None else obs.index, dtype=str))
    if not cells.is_unique:
        raise ValueError("Cell barcodes are not unique; make them unique before counting.")

    if fragments is not None:
        path = Path(fragments)
        if not path.exists():
            raise FileNotFoundError(f"Fragments file {str(path)!r} does not exist.")
        X, info = _fragment_mode(path, cells, regions, matcher, int(chunk_size))
        source = "fragments"
    else:
        X, info = _peak_mode(atac, regions, matcher, layer)
        source = "peaks"
        info["layer"] = layer if layer is not None else "X"
    matcher.report()

    var = regions.drop(columns="_row")
    if matcher.fixed:
        # report gene chromosomes in the data's style ("chr1"/"chrM" or "1"/"MT")
        canon = _canonical_chrom(var["chrom"].to_numpy())
        if _chrom_style(sorted(matcher.data_seen)).startswith("UCSC"):
            canon = np.array(["chrM" if c == "MT" else f"chr{c}" for c in canon], dtype=object)
        var["chrom"] = canon
    var.index = pd.Index(var["gene"].to_numpy(dtype=str))
    n_signal = int((X.getnnz(axis=0) > 0).sum())
    uns = {
        "source": source,
        "extend_upstream": int(extend_upstream),
        "extend_downstream": int(extend_downstream),
        "max_width": float(max_width) if max_width is not None else -1.0,
        "gene_types": list(gene_types) if gene_types is not None else ["all"],
        "n_genes": int(len(var)),
        "n_genes_with_signal": n_signal,
        "n_genes_dropped_max_width": int(n_wide),
        "chrom_style_fixed": bool(matcher.fixed),
        "chrom_style_data": _chrom_style(sorted(matcher.data_seen)),
        "chrom_style_genes": _chrom_style(matcher.gene_names),
        "method": "Signac-like GeneActivity: fragments (or peak counts) overlapping gene body + "
        "upstream promoter",
        **info,
    }
    out = ad.AnnData(X=sparse.csr_matrix(X, dtype=np.float32), obs=obs, var=var)
    out.uns["gene_activity"] = uns
    return out


def add_gene_activity(
    mdata: MuData,
    *,
    atac_mod: str = "atac",
    key_added: str = "gene_activity",
    **kwargs: Any,
) -> None:
    """Add a gene-activity modality to a MuData, from its ATAC modality.

    Parameters
    ----------
    mdata
        MuData with an ATAC modality of peak counts.
    atac_mod
        Name of the ATAC modality.
    key_added
        Name of the new modality (cells x genes).
    **kwargs
        Passed to :func:`gene_activity`. When ``genes`` is not given, the first modality whose
        ``var`` has an ``interval`` column (the RNA modality of 10x multiome data) supplies it.
    """
    from mudata import MuData

    if not isinstance(mdata, MuData):
        raise TypeError(
            f"add_gene_activity needs a MuData, got {type(mdata).__name__}; for an AnnData of "
            "peaks use `gene_activity(atac, genes=...)`."
        )
    if atac_mod not in mdata.mod:
        raise KeyError(
            f"MuData has no modality {atac_mod!r} (modalities: {list(mdata.mod)}); pass atac_mod=."
        )
    if "genes" not in kwargs:
        with_interval = [k for k, m in mdata.mod.items() if "interval" in m.var.columns]
        if not with_interval:
            raise ValueError(
                "Pass genes= (GTF/GFF, gene table or DataFrame): no modality has var['interval']."
            )
        kwargs["genes"] = mdata.mod[with_interval[0]]
    mdata.mod[key_added] = gene_activity(mdata.mod[atac_mod], **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # mudata 0.3 pull_on_update notice
        # gene activity shares gene names with the RNA modality by design
        warnings.filterwarnings("ignore", message="Cannot join columns with the same name")
        mdata.update()
