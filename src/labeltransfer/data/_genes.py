"""Gene-coordinate readers for the gene-activity builder.

Every reader returns the same table: one row per gene with ``chrom``, ``start`` (0-based),
``end`` (exclusive), ``strand`` (``"+"``, ``"-"`` or ``"."``) and ``gene`` (the name used for the
gene-activity features), plus ``gene_type`` when the source has one. Coordinates follow the BED
convention (half-open, 0-based) throughout the package.
"""

from __future__ import annotations

import gzip
import logging
import re
import warnings
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from anndata import AnnData

logger = logging.getLogger(__name__)

__all__ = ["read_gene_coordinates"]

GENE_COLUMNS = ["chrom", "start", "end", "strand", "gene"]

_GTF_SUFFIXES = (".gtf", ".gff", ".gff3", ".gtf.gz", ".gff.gz", ".gff3.gz")
_BED_SUFFIXES = (".bed", ".bed.gz")
_CHROM_ALIASES = ("chrom", "chr", "chromosome", "seqnames", "seqname", "seqid")
_TYPE_ALIASES = ("gene_type", "gene_biotype", "biotype", "type")
_NAME_ALIASES = ("gene", "symbol", "gene_name", "gene_symbol", "name")
# "chr1:100-200" (10x `interval`), also "chr1-100-200" and "chr1_100_200".
_INTERVAL_RE = re.compile(r"^(?P<chrom>.+)[:\-_](?P<start>\d+)[\-_](?P<end>\d+)$")


def read_gene_coordinates(
    source: str | PathLike | pd.DataFrame | AnnData,
    *,
    gene_types: Sequence[str] | None = ("protein_coding",),
    id_column: str = "symbol",
) -> pd.DataFrame:
    """Read gene coordinates into a uniform, BED-style table.

    Parameters
    ----------
    source
        Where the genes come from:

        - a path to a GTF or GFF(3) file (optionally gzipped). ``gene`` records are used, with the
          ``gene_name`` / ``gene_id`` and ``gene_type`` (GENCODE) or ``gene_biotype`` (Ensembl)
          attributes. Files without ``gene`` records (e.g. UCSC GTFs) are collapsed to one locus
          per ``gene_id`` (smallest start, largest end), never kept exon by exon;
        - a path to a tab-separated table with a header, such as
          ``hs_genes_hg38.tsv.gz`` (``entrez_id, symbol, gene_type, chrom, start, end, strand,
          ensembl_ids``, 0-based start, exclusive end), or a BED file (``chrom, start, end, name,
          score, strand``, no header);
        - a :class:`~pandas.DataFrame` with columns ``chrom``, ``start``, ``end`` (and optionally
          ``strand``, ``gene_type`` and a name column);
        - an :class:`~anndata.AnnData` (its ``var``) or a ``var`` DataFrame with an ``interval``
          column such as the RNA modality of 10x multiome data (``"chr1:100-200"``, 0-based start,
          names taken from ``var_names``). 10x intervals carry no strand: a ``strand`` column is
          used when present, otherwise genes are unstranded (see Notes).
    gene_types
        Gene types (biotypes) to keep. Signac's ``GeneActivity`` default is protein-coding genes
        only (``biotypes = "protein_coding"``). Spellings are normalised, so
        ``"protein-coding"`` (NCBI/org.Hs.eg.db) matches ``"protein_coding"`` (GENCODE/Ensembl).
        ``None`` keeps every gene. Sources without a type column are not filtered (logged).
    id_column
        Which identifier names the genes. ``"symbol"`` (default) uses the gene symbol
        (``gene_name`` in a GTF, ``symbol`` in a table, ``var_names`` for an ``interval``
        source); ``"gene_id"`` (or ``"ensembl"``) uses the gene id of a GTF; for a table or
        ``var`` any column name can be given (e.g. ``"ensembl_ids"``, ``"gene_ids"``).

    Returns
    -------
    DataFrame indexed by gene name with columns ``chrom``, ``start`` (0-based, int64), ``end``
    (exclusive, int64), ``strand``, ``gene`` and, when known, ``gene_type``.

    Notes
    -----
    Genes without coordinates (missing chromosome/start/end, or ``NA`` intervals) are dropped with
    a warning giving their number. Duplicated names keep the widest locus (warned). Unstranded
    genes (``"."``/``"*"``) are extended as if on the ``+`` strand, as Signac's ``Extend`` does.
    """
    table = _read_any(source, id_column=id_column)
    return _finalise(table, gene_types=gene_types)


# --------------------------------------------------------------------------------------------
# dispatch


def _read_any(source: Any, *, id_column: str) -> pd.DataFrame:
    if isinstance(source, str | PathLike):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(
                f"Gene coordinate file {str(path)!r} does not exist; pass a GTF/GFF, a gene table "
                "(e.g. hs_genes_hg38.tsv.gz) or a DataFrame with chrom/start/end columns."
            )
        kind = _sniff_file(path)
        if kind == "gtf":
            return _read_gtf(path, id_column=id_column)
        if kind == "bed":
            return _read_bed(path)
        table = pd.read_csv(path, sep="\t", comment=None, dtype={"chrom": str, "strand": str})
        return _from_table(table, id_column=id_column, what=str(path))
    if hasattr(source, "var") and hasattr(source, "obs"):  # AnnData / MuData modality
        return _from_var(source.var, id_column=id_column)
    if isinstance(source, pd.DataFrame):
        if _find_column(source, _CHROM_ALIASES) is None and "interval" in source.columns:
            return _from_var(source, id_column=id_column)
        return _from_table(source, id_column=id_column, what="the DataFrame")
    raise TypeError(
        f"Cannot read gene coordinates from a {type(source).__name__}; pass a path to a GTF/GFF "
        "or TSV table, a DataFrame with chrom/start/end columns, or an AnnData whose var has an "
        "'interval' column."
    )


def _open_text(path: Path):
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rt")
    return open(path)


def _sniff_file(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(_GTF_SUFFIXES):
        return "gtf"
    if name.endswith(_BED_SUFFIXES):
        return "bed"
    with _open_text(path) as fh:
        for line in fh:
            if line.startswith("#") or not line.strip():
                continue
            fields = line.rstrip("\n").split("\t")
            if len(fields) == 9 and fields[3].isdigit() and fields[4].isdigit():
                return "gtf"
            return "table"
    return "table"


def _find_column(df: pd.DataFrame, aliases: Sequence[str]) -> str | None:
    lower = {str(c).lower(): c for c in df.columns}
    for alias in aliases:
        if alias in lower:
            return lower[alias]
    return None


# --------------------------------------------------------------------------------------------
# readers


def _from_table(table: pd.DataFrame, *, id_column: str, what: str) -> pd.DataFrame:
    chrom = _find_column(table, _CHROM_ALIASES)
    missing = [
        c
        for c, col in (("chrom", chrom), ("start", "start"), ("end", "end"))
        if col is None or col not in table.columns
    ]
    if missing:
        raise ValueError(
            f"{what} has no {missing} column(s) (columns: {list(table.columns)[:12]}); gene "
            "coordinates need chrom, start (0-based) and end (exclusive) columns, or an "
            "'interval' column like 'chr1:100-200'."
        )
    if id_column in table.columns:
        names = table[id_column]
    elif id_column in ("symbol", "gene_name") and _find_column(table, _NAME_ALIASES) is not None:
        names = table[_find_column(table, _NAME_ALIASES)]
    elif id_column in ("symbol", "gene_name"):
        names = pd.Series(table.index.astype(str), index=table.index)
    else:
        raise ValueError(
            f"id_column={id_column!r} is not a column of {what} (columns: "
            f"{list(table.columns)[:12]}); pass one of them, or 'symbol'."
        )
    strand_col = _find_column(table, ("strand",))
    type_col = _find_column(table, _TYPE_ALIASES)
    out = pd.DataFrame(
        {
            "chrom": table[chrom].to_numpy(),
            "start": pd.to_numeric(table["start"], errors="coerce").to_numpy(),
            "end": pd.to_numeric(table["end"], errors="coerce").to_numpy(),
            "strand": table[strand_col].to_numpy() if strand_col is not None else ".",
            "gene": names.to_numpy(),
        }
    )
    if type_col is not None:
        out["gene_type"] = table[type_col].to_numpy()
    return out


def _from_var(var: pd.DataFrame, *, id_column: str) -> pd.DataFrame:
    if "interval" not in var.columns:
        if _find_column(var, _CHROM_ALIASES) is not None:
            return _from_table(var, id_column=id_column, what="var")
        raise ValueError(
            "The AnnData's var has no 'interval' column (10x multiome 'chr1:100-200') and no "
            "chrom/start/end columns; pass a GTF/GFF path or a gene table instead."
        )
    parsed = var["interval"].astype(str).str.extract(_INTERVAL_RE)
    if id_column in ("symbol", "gene_name"):
        names = var.index.astype(str).to_numpy()
    elif id_column in var.columns:
        names = var[id_column].astype(str).to_numpy()
    else:
        raise ValueError(
            f"id_column={id_column!r} is not a column of var (columns: {list(var.columns)}); "
            "pass 'symbol' to use var_names."
        )
    strand_col = _find_column(var, ("strand",))
    out = pd.DataFrame(
        {
            "chrom": parsed["chrom"].to_numpy(),
            "start": pd.to_numeric(parsed["start"], errors="coerce").to_numpy(),
            "end": pd.to_numeric(parsed["end"], errors="coerce").to_numpy(),
            "strand": var[strand_col].to_numpy() if strand_col is not None else ".",
            "gene": names,
        }
    )
    type_col = _find_column(var, ("gene_type", "gene_biotype", "biotype"))
    if type_col is not None:
        out["gene_type"] = var[type_col].to_numpy()
    return out


def _read_bed(path: Path) -> pd.DataFrame:
    bed = pd.read_csv(path, sep="\t", header=None, comment="#", dtype={0: str})
    if bed.shape[1] < 3:
        raise ValueError(f"BED file {str(path)!r} has fewer than 3 columns (chrom, start, end).")
    out = pd.DataFrame(
        {
            "chrom": bed[0].to_numpy(),
            "start": pd.to_numeric(bed[1], errors="coerce").to_numpy(),
            "end": pd.to_numeric(bed[2], errors="coerce").to_numpy(),
            "strand": bed[5].to_numpy() if bed.shape[1] > 5 else ".",
            "gene": bed[3].astype(str).to_numpy() if bed.shape[1] > 3 else None,
        }
    )
    if bed.shape[1] <= 3:
        out["gene"] = out["chrom"] + ":" + out["start"].astype(str) + "-" + out["end"].astype(str)
    return out


def _attribute(attrs: pd.Series, keys: Sequence[str]) -> pd.Series:
    """Extract the first of ``keys`` from GTF (``key "v";``) or GFF3 (``key=v;``) attributes."""
    result: pd.Series | None = None
    for key in keys:
        pattern = rf'(?:^|;)\s*{re.escape(key)}(?:\s+"?|=)([^";]+)"?'
        found = attrs.str.extract(pattern, expand=False).astype(object)
        result = found if result is None else result.where(result.notna(), found)
    return result


def _read_gtf(path: Path, *, id_column: str, chunksize: int = 500_000) -> pd.DataFrame:
    """Read gene records of a GTF/GFF3 in chunks (a GENCODE GTF has ~3M lines)."""
    genes: list[pd.DataFrame] = []
    others: list[pd.DataFrame] = []
    reader = pd.read_csv(
        path,
        sep="\t",
        header=None,
        comment="#",
        names=["seqname", "source", "feature", "start", "end", "score", "strand", "frame", "attr"],
        usecols=["seqname", "feature", "start", "end", "strand", "attr"],
        dtype={"seqname": str, "feature": str, "strand": str, "attr": str},
        chunksize=chunksize,
        quoting=3,  # csv.QUOTE_NONE: GTF attributes contain double quotes
    )
    for chunk in reader:
        is_gene = chunk["feature"] == "gene"
        if is_gene.any():
            genes.append(chunk[is_gene])
        elif not genes:
            # keep a per-gene_id extent in case the file has no gene records at all
            sub = chunk.assign(gene_id=_attribute(chunk["attr"].fillna(""), ["gene_id"]))
            sub = sub.dropna(subset=["gene_id"])
            agg = sub.groupby("gene_id", sort=False).agg(
                seqname=("seqname", "first"),
                start=("start", "min"),
                end=("end", "max"),
                strand=("strand", "first"),
                attr=("attr", "first"),
            )
            others.append(agg.reset_index(drop=True))
    if genes:
        gtf = pd.concat(genes, ignore_index=True)
    elif others:
        logger.info("%s has no 'gene' records; collapsing records to one locus per gene_id.", path)
        gtf = pd.concat(others, ignore_index=True)
        gtf = gtf.assign(gene_id=_attribute(gtf["attr"].fillna(""), ["gene_id"]))
        gtf = gtf.groupby("gene_id", sort=False).agg(
            seqname=("seqname", "first"),
            start=("start", "min"),
            end=("end", "max"),
            strand=("strand", "first"),
            attr=("attr", "first"),
        )
        gtf = gtf.reset_index(drop=True)
    else:
        raise ValueError(f"GTF/GFF file {str(path)!r} has no records.")
    attrs = gtf["attr"].fillna("")
    gene_id = _attribute(attrs, ["gene_id", "ID"]).str.replace(r"^gene:", "", regex=True)
    if id_column in ("symbol", "gene_name", "name"):
        names = _attribute(attrs, ["gene_name", "Name", "gene"]).fillna(gene_id)
    elif id_column in ("gene_id", "ensembl", "ensembl_ids", "ensembl_id", "ID"):
        names = gene_id
    else:
        names = _attribute(attrs, [id_column])
    # GTF/GFF are 1-based, inclusive: BED start = start - 1, end unchanged.
    start = pd.to_numeric(gtf["start"], errors="coerce") - 1
    return pd.DataFrame(
        {
            "chrom": gtf["seqname"].to_numpy(),
            "start": start.to_numpy(),
            "end": pd.to_numeric(gtf["end"], errors="coerce").to_numpy(),
            "strand": gtf["strand"].to_numpy(),
            "gene": names.to_numpy(),
            "gene_type": _attribute(attrs, ["gene_type", "gene_biotype", "biotype"]).to_numpy(),
        }
    )


# --------------------------------------------------------------------------------------------
# common clean-up


def _normalise_type(values: pd.Series | Sequence[str]) -> pd.Series:
    return (
        pd.Series(values, dtype=object)
        .astype(str)
        .str.lower()
        .str.replace(r"[\s\-]", "_", regex=True)
    )


def _finalise(table: pd.DataFrame, *, gene_types: Sequence[str] | None) -> pd.DataFrame:
    table = table.copy()
    if gene_types is not None:
        if isinstance(gene_types, str):
            gene_types = [gene_types]
        if "gene_type" in table.columns and table["gene_type"].notna().any():
            wanted = set(_normalise_type(list(gene_types)))
            keep = _normalise_type(table["gene_type"]).isin(wanted).to_numpy()
            if not keep.any():
                seen = sorted(table["gene_type"].dropna().astype(str).unique())[:10]
                raise ValueError(
                    f"No gene has a type in gene_types={list(gene_types)} (types present: "
                    f"{seen}); pass gene_types=None to keep every gene."
                )
            table = table.loc[keep]
        else:
            logger.info(
                "Gene coordinates have no gene type column: gene_types=%s not applied.",
                list(gene_types),
            )
    chrom = table["chrom"]
    bad = (
        chrom.isna().to_numpy()
        | chrom.astype(str).isin(["", "nan", "NA", "None"]).to_numpy()
        | table["start"].isna().to_numpy()
        | table["end"].isna().to_numpy()
        | table["gene"].isna().to_numpy()
    )
    if bad.any():
        warnings.warn(
            f"Dropped {int(bad.sum())} of {len(table)} genes without coordinates (no chrom, start "
            "or end).",
            UserWarning,
            stacklevel=3,
        )
        table = table.loc[~bad]
    table["chrom"] = table["chrom"].astype(str)
    table["start"] = table["start"].astype(np.int64)
    table["end"] = table["end"].astype(np.int64)
    table["gene"] = table["gene"].astype(str)
    strand = table["strand"].astype(str).where(table["strand"].notna(), ".")
    strand = strand.where(strand.isin(["+", "-"]), ".")
    table["strand"] = strand
    inverted = (table["end"] < table["start"]).to_numpy()
    if inverted.any():
        raise ValueError(
            f"{int(inverted.sum())} genes have end < start (e.g. "
            f"{table.loc[inverted, 'gene'].iloc[0]!r}); coordinates must be 0-based start, "
            "exclusive end."
        )
    n_unstranded = int((table["strand"] == ".").sum())
    if n_unstranded and n_unstranded < len(table):
        logger.info("%d genes are unstranded; they are extended as '+' genes.", n_unstranded)
    elif n_unstranded:
        logger.info(
            "Gene coordinates carry no strand: the upstream extension is applied before the start "
            "of every gene (as for '+'); pass a GTF or gene table for strand-aware promoters."
        )
    width = (table["end"] - table["start"]).to_numpy()
    if table["gene"].duplicated().any():
        order = np.argsort(-width, kind="stable")
        dedup = table.iloc[order]
        dup = dedup["gene"].duplicated()
        warnings.warn(
            f"{int(dup.sum())} duplicated gene names; kept the widest locus of each.",
            UserWarning,
            stacklevel=3,
        )
        table = dedup.loc[~dup.to_numpy()].sort_index()
    columns = GENE_COLUMNS + (["gene_type"] if "gene_type" in table.columns else [])
    table = table[columns]
    table.index = pd.Index(table["gene"].to_numpy(), name=None)
    return table
