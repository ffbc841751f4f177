from __future__ import annotations

import gzip
import logging
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import sparse

from labeltransfer.data._gene_activity import add_gene_activity, gene_activity, overlap_pairs
from labeltransfer.data._genes import read_gene_coordinates

# Toy genome (0-based, half-open). Regions with Signac defaults (2 kb upstream, 0 downstream):
#   G1 + chr1 [10000, 11000) -> [8000, 11000)
#   G2 - chr1 [20000, 21000) -> [20000, 23000)   (upstream of a '-' gene is past its end)
#   G3 + chr2 [5000, 6000)   -> [3000, 6000)
#   G4 + chr1 [1000, 1500)   -> [0, 1500)        (clipped at 0)
GENES = pd.DataFrame(
    {
        "chrom": ["chr1", "chr1", "chr2", "chr1"],
        "start": [10000, 20000, 5000, 1000],
        "end": [11000, 21000, 6000, 1500],
        "strand": ["+", "-", "+", "+"],
        "gene": ["G1", "G2", "G3", "G4"],
    }
)
PEAKS = [
    ("chr1", 7999, 8001),  # G1 promoter extension, 1 bp inside
    ("chr1", 7900, 8000),  # touches G1 region start: no overlap (half-open)
    ("chr1", 11000, 11100),  # touches G1 end: no overlap
    ("chr1", 10999, 11000),  # last base of G1
    ("chr1", 19900, 20000),  # downstream of '-' gene G2, touching: no overlap
    ("chr1", 22999, 23000),  # last base of G2's upstream extension
    ("chr1", 23000, 23100),  # just past G2's extension
    ("chr2", 2999, 3001),  # G3 promoter extension
    ("chr1", 1400, 20500),  # spans G4, G1, G2
    ("chrX", 1, 100),  # chromosome without genes
]
# peaks x genes overlap, computed by hand from the comments above
EXPECTED_OVERLAP = np.array(
    [
        [1, 0, 0, 0],
        [0, 0, 0, 0],
        [0, 0, 0, 0],
        [1, 0, 0, 0],
        [0, 0, 0, 0],
        [0, 1, 0, 0],
        [0, 0, 0, 0],
        [0, 0, 1, 0],
        [1, 1, 0, 1],
        [0, 0, 0, 0],
    ]
)
RNG = np.random.default_rng(0)
COUNTS = RNG.integers(0, 4, size=(3, len(PEAKS))).astype(np.float32)


def _peak_names(style: str, fmt: str) -> list[str]:
    names = []
    for chrom, start, end in PEAKS:
        c = chrom if style == "ucsc" else chrom.removeprefix("chr")
        names.append(f"{c}:{start}-{end}" if fmt == "colon" else f"{c}-{start}-{end}")
    return names


def _atac(style: str = "ucsc", fmt: str = "colon") -> ad.AnnData:
    obs = pd.DataFrame({"sample": ["s1", "s1", "s2"]}, index=["c1", "c2", "c3"])
    var = pd.DataFrame(index=_peak_names(style, fmt))
    return ad.AnnData(sparse.csr_matrix(COUNTS), obs=obs, var=var)


def _quiet(**kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return gene_activity(**kwargs)


# ---------------------------------------------------------------------------------------------
# peak mode


@pytest.mark.parametrize("data_style", ["ucsc", "ensembl"])
@pytest.mark.parametrize("gene_style", ["ucsc", "ensembl"])
@pytest.mark.parametrize("fmt", ["colon", "dash"])
def test_peak_mode_hand_computed(data_style, gene_style, fmt, caplog):
    genes = GENES.copy()
    if gene_style == "ensembl":
        genes["chrom"] = genes["chrom"].str.removeprefix("chr")
    atac = _atac(data_style, fmt)
    with caplog.at_level(logging.INFO, logger="labeltransfer.data._gene_activity"):
        ga = gene_activity(atac, genes=genes, gene_types=None)
    assert sparse.isspmatrix_csr(ga.X) or sparse.issparse(ga.X)
    assert ga.X.dtype == np.float32
    assert list(ga.var_names) == ["G1", "G2", "G3", "G4"]
    assert list(ga.obs_names) == ["c1", "c2", "c3"]
    assert list(ga.obs["sample"]) == ["s1", "s1", "s2"]
    np.testing.assert_array_equal(ga.X.toarray(), COUNTS @ EXPECTED_OVERLAP)
    info = ga.uns["gene_activity"]
    assert info["source"] == "peaks"
    assert info["extend_upstream"] == 2000
    assert info["extend_downstream"] == 0
    assert info["n_genes"] == 4
    assert info["chrom_style_fixed"] is (data_style != gene_style)
    if data_style != gene_style:
        assert "harmonised" in caplog.text
    np.testing.assert_array_equal(ga.var["region_start"], [8000, 20000, 3000, 0])
    np.testing.assert_array_equal(ga.var["region_end"], [11000, 23000, 6000, 1500])
    # var reports the genes' chromosomes in the data's style
    assert ga.var["chrom"].iloc[2] == ("chr2" if data_style == "ucsc" else "2")


def test_peak_mode_var_columns_and_layer_and_dense():
    atac = _atac()
    atac.var["chrom"] = [p[0] for p in PEAKS]
    atac.var["start"] = [p[1] for p in PEAKS]
    atac.var["end"] = [p[2] for p in PEAKS]
    atac.var_names = [f"peak{i}" for i in range(len(PEAKS))]  # unparseable names: columns used
    atac.layers["counts"] = atac.X.copy()
    atac.X = np.zeros(atac.shape, dtype=np.float32)  # dense X is fine too
    ga = gene_activity(atac, genes=GENES, gene_types=None, layer="counts")
    np.testing.assert_array_equal(ga.X.toarray(), COUNTS @ EXPECTED_OVERLAP)
    assert ga.uns["gene_activity"]["layer"] == "counts"
    ga = gene_activity(atac, genes=GENES, gene_types=None)
    assert ga.X.nnz == 0


def test_extensions_strand_aware():
    atac = _atac()
    ga = gene_activity(
        atac, genes=GENES, gene_types=None, extend_upstream=0, extend_downstream=500
    )
    # G1 [10000, 11500); G2 '-' [19500, 21000): downstream of a '-' gene is before its start
    np.testing.assert_array_equal(ga.var["region_start"], [10000, 19500, 5000, 1000])
    np.testing.assert_array_equal(ga.var["region_end"], [11500, 21000, 6500, 2000])
    expected = np.array(
        [
            [0, 0, 0, 0],
            [0, 0, 0, 0],
            [1, 0, 0, 0],  # 11000-11100 now inside G1's downstream extension
            [1, 0, 0, 0],
            [0, 1, 0, 0],  # 19900-20000 inside G2's downstream extension
            [0, 0, 0, 0],
            [0, 0, 0, 0],
            [0, 0, 0, 0],
            [1, 1, 0, 1],
            [0, 0, 0, 0],
        ]
    )
    np.testing.assert_array_equal(ga.X.toarray(), COUNTS @ expected)


def test_max_width_and_gene_types():
    genes = GENES.assign(
        gene_type=["protein_coding", "lncRNA", "protein-coding", "protein_coding"]
    )
    ga = gene_activity(_atac(), genes=genes, max_width=3001)
    # G2 (lncRNA) dropped by the protein-coding default; G1 and G3 regions are 3000 wide (kept,
    # Signac keeps width < max.width), nothing else is wider.
    assert list(ga.var_names) == ["G1", "G3", "G4"]
    ga = gene_activity(_atac(), genes=genes, max_width=3000)
    assert list(ga.var_names) == ["G4"]
    assert ga.uns["gene_activity"]["n_genes_dropped_max_width"] == 2


def test_zero_overlap_raises_naming_styles():
    genes = GENES.assign(chrom=["NC_000001.11"] * 4)
    with pytest.raises(ValueError, match=r"(?s)UCSC \('chr1'\).*NC_000001.11"):
        gene_activity(_atac(), genes=genes, gene_types=None)


def test_bad_peak_names_raise():
    atac = _atac()
    atac.var_names = [f"peak{i}" for i in range(len(PEAKS))]
    with pytest.raises(ValueError, match="chr:start-end"):
        gene_activity(atac, genes=GENES, gene_types=None)


def test_non_integer_counts_warn():
    atac = _atac()
    atac.X = atac.X * 0.5
    with pytest.warns(UserWarning, match="raw counts"):
        gene_activity(atac, genes=GENES, gene_types=None)


def test_output_writes_h5ad(tmp_path):
    ga = gene_activity(_atac(), genes=GENES, gene_types=None)
    ga.write_h5ad(tmp_path / "ga.h5ad")
    back = ad.read_h5ad(tmp_path / "ga.h5ad")
    np.testing.assert_array_equal(back.X.toarray(), ga.X.toarray())
    assert back.uns["gene_activity"]["source"] == "peaks"


# ---------------------------------------------------------------------------------------------
# fragment mode


def _write_fragments(path: Path, lines: list[str], header: bool = True) -> Path:
    with gzip.open(path, "wt") as fh:
        if header:
            fh.write("# id=toy\n# pipeline=test\n")
        fh.write("\n".join(lines) + "\n")
    return path


def _fragment_lines(style: str = "ucsc", seed: int = 0) -> list[str]:
    """One fragment per peak count (count column = duplicates, ignored) + foreign barcodes."""
    lines = []
    for cell, barcode in enumerate(["c1", "c2", "c3"]):
        for p, (chrom, start, end) in enumerate(PEAKS):
            c = chrom if style == "ucsc" else chrom.removeprefix("chr")
            lines += [f"{c}\t{start}\t{end}\t{barcode}\t{7}"] * int(COUNTS[cell, p])
    lines += ["chr1\t10000\t10100\tNOT_A_CELL\t1"] * 5
    order = np.random.default_rng(seed).permutation(len(lines))  # unsorted on purpose
    return [lines[i] for i in order]


@pytest.mark.parametrize("style", ["ucsc", "ensembl"])
@pytest.mark.parametrize("chunk_size", [3, 1000])
def test_fragment_mode_hand_computed(tmp_path, style, chunk_size):
    path = _write_fragments(tmp_path / "fragments.tsv.gz", _fragment_lines(style))
    atac = _atac()
    ga = gene_activity(atac, genes=GENES, gene_types=None, fragments=path, chunk_size=chunk_size)
    np.testing.assert_array_equal(ga.X.toarray(), COUNTS @ EXPECTED_OVERLAP)
    info = ga.uns["gene_activity"]
    assert info["source"] == "fragments"
    assert info["chrom_style_fixed"] is (style == "ensembl")
    assert info["n_fragments"] == int(COUNTS.sum()) + 5
    assert info["n_fragments_in_cells"] == int(COUNTS.sum())
    assert list(ga.obs["sample"]) == ["s1", "s1", "s2"]


def test_fragment_counts_fragments_not_cut_sites(tmp_path):
    # one fragment spanning two genes counts once for each; its count column (9) is ignored
    path = _write_fragments(tmp_path / "f.tsv.gz", ["chr1\t1400\t20500\tc1\t9"], header=False)
    ga = gene_activity(genes=GENES, gene_types=None, fragments=path, barcodes=["c1", "c2"])
    np.testing.assert_array_equal(ga.X.toarray(), [[1, 1, 0, 1], [0, 0, 0, 0]])
    assert list(ga.obs_names) == ["c1", "c2"]


def test_fragment_barcodes_map_cells(tmp_path):
    path = _write_fragments(tmp_path / "f.tsv.gz", ["chr1\t10000\t10100\tAAAC-1\t1"])
    atac = _atac()
    ga = gene_activity(
        atac, genes=GENES, gene_types=None, fragments=path, barcodes=["x", "AAAC-1", "y"]
    )
    assert list(ga.obs_names) == ["c1", "c2", "c3"]
    np.testing.assert_array_equal(ga.X.toarray()[:, 0], [0, 1, 0])


def test_fragments_plain_text_four_columns(tmp_path):
    path = tmp_path / "fragments.tsv"
    path.write_text("chr2\t4000\t4100\tc1\nchr2\t100\t200\tc1\n")
    ga = gene_activity(genes=GENES, gene_types=None, fragments=path, barcodes=["c1"])
    np.testing.assert_array_equal(ga.X.toarray(), [[0, 0, 1, 0]])


def test_fragments_no_cell_barcodes_raise(tmp_path):
    path = _write_fragments(tmp_path / "f.tsv.gz", ["chr1\t10000\t10100\tAAAC-1\t1"])
    with pytest.raises(ValueError, match="barcodes="):
        gene_activity(genes=GENES, gene_types=None, fragments=path, barcodes=["AAAC"])


def test_fragments_zero_overlap_raises(tmp_path):
    path = _write_fragments(tmp_path / "f.tsv.gz", ["chrUn\t10000\t10100\tc1\t1"])
    with pytest.raises(ValueError, match="No gene region overlaps any fragment"):
        gene_activity(genes=GENES, gene_types=None, fragments=path, barcodes=["c1"])


def test_truncated_gzip_raises_naming_file(tmp_path):
    rng = np.random.default_rng(1)
    starts = rng.integers(0, 30000, size=20000)
    lines = [f"chr1\t{s}\t{s + 150}\tc{s % 3 + 1}\t1" for s in starts]
    full = _write_fragments(tmp_path / "full.tsv.gz", lines)
    raw = full.read_bytes()
    bad = tmp_path / "truncated.tsv.gz"
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"truncated\.tsv\.gz.*truncated"):
        gene_activity(
            genes=GENES, gene_types=None, fragments=bad, barcodes=["c1", "c2"], chunk_size=1000
        )


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("chr1\t100\t200\tc1\t1\textra", "line 5"),
        ("chr1\t100\t200\tc1", "line 5"),
        ("chr1\t300\t200\tc1\t1", r"line 5 has end < start"),
        ("chr1\tabc\t200\tc1\t1", "line 5 has a non-integer start"),
    ],
)
def test_malformed_line_raises_with_line_number(tmp_path, bad_line, message):
    # lines 1-2 are the header, 3-4 good records, 5 the bad one
    lines = ["chr1\t10000\t10100\tc1\t1", "chr1\t10000\t10100\tc2\t1", bad_line]
    lines += ["chr1\t10000\t10100\tc1\t1"] * 3
    path = _write_fragments(tmp_path / "f.tsv.gz", lines)
    with pytest.raises(ValueError, match=message):
        gene_activity(genes=GENES, gene_types=None, fragments=path, barcodes=["c1", "c2"])


def test_fragment_mode_equals_peak_mode_on_synthetic(tmp_path):
    from labeltransfer.data._synthetic_atac import synthetic_multiome

    mdata = synthetic_multiome(n_cells=200, n_genes=80, n_background_peaks=100, seed=3)
    atac = mdata.mod["atac"]
    X = atac.X.tocoo()
    lines = [
        f"{atac.var['chrom'].iloc[j]}\t{atac.var['start'].iloc[j]}\t{atac.var['end'].iloc[j]}"
        f"\t{atac.obs_names[i]}\t1"
        for i, j, v in zip(X.row, X.col, X.data, strict=True)
        for _ in range(int(v))
    ]
    path = _write_fragments(tmp_path / "f.tsv.gz", lines[::-1])
    by_peaks = gene_activity(atac, genes=mdata.mod["rna"])
    by_frags = gene_activity(atac, genes=mdata.mod["rna"], fragments=path, chunk_size=500)
    np.testing.assert_array_equal(by_peaks.X.toarray(), by_frags.X.toarray())


# ---------------------------------------------------------------------------------------------
# MuData


def test_add_gene_activity_uses_rna_intervals():
    from labeltransfer.data._synthetic_atac import synthetic_multiome

    mdata = synthetic_multiome(n_cells=100, n_genes=40, n_background_peaks=50, seed=1)
    add_gene_activity(mdata)
    ga = mdata.mod["gene_activity"]
    assert ga.shape == (100, 40)
    assert list(ga.obs_names) == list(mdata.mod["atac"].obs_names)
    # RNA intervals carry no gene type: no biotype filter, all genes kept
    add_gene_activity(mdata, key_added="ga2", genes=mdata.mod["rna"].var, gene_types=None)
    assert "ga2" in mdata.mod
    with pytest.raises(KeyError, match="atac_mod"):
        add_gene_activity(mdata, atac_mod="ATAC")


# ---------------------------------------------------------------------------------------------
# gene coordinates


GTF = """\
#!genome-build GRCh38
chr1\tHAVANA\tgene\t10001\t11000\t.\t+\t.\tgene_id "ENSG1.1"; gene_type "protein_coding"; gene_name "G1";
chr1\tHAVANA\ttranscript\t10001\t11000\t.\t+\t.\tgene_id "ENSG1.1"; transcript_id "T1"; gene_type "protein_coding"; gene_name "G1";
chr1\tHAVANA\texon\t10001\t10200\t.\t+\t.\tgene_id "ENSG1.1"; transcript_id "T1"; gene_type "protein_coding"; gene_name "G1";
chr1\tHAVANA\tgene\t20001\t21000\t.\t-\t.\tgene_id "ENSG2.1"; gene_type "protein_coding"; gene_name "G2";
chr2\tHAVANA\tgene\t5001\t6000\t.\t+\t.\tgene_id "ENSG3.1"; gene_type "lncRNA"; gene_name "L3";
chr1\tHAVANA\tgene\t1001\t1500\t.\t+\t.\tgene_id "ENSG4.1"; gene_biotype "protein_coding";
"""


def test_read_gtf(tmp_path):
    path = tmp_path / "genes.gtf"
    path.write_text(GTF)
    genes = read_gene_coordinates(path)
    # 1-based inclusive GTF -> 0-based half-open; lncRNA dropped; missing gene_name -> gene_id
    assert list(genes["gene"]) == ["G1", "G2", "ENSG4.1"]
    assert list(genes["start"]) == [10000, 20000, 1000]
    assert list(genes["end"]) == [11000, 21000, 1500]
    assert list(genes["strand"]) == ["+", "-", "+"]
    assert len(read_gene_coordinates(path, gene_types=None)) == 4
    ids = read_gene_coordinates(path, id_column="gene_id")
    assert list(ids.index) == ["ENSG1.1", "ENSG2.1", "ENSG4.1"]
    gz = tmp_path / "genes.gtf.gz"
    with gzip.open(gz, "wt") as fh:
        fh.write(GTF)
    ga = gene_activity(_atac(), genes=gz)
    np.testing.assert_array_equal(ga.X.toarray(), COUNTS @ EXPECTED_OVERLAP[:, [0, 1, 3]])


def test_read_gtf_without_gene_records_and_gff3(tmp_path):
    no_genes = "\n".join(line for line in GTF.splitlines() if "\tgene\t" not in line)
    path = tmp_path / "ucsc.gtf"
    path.write_text(no_genes + "\n")
    genes = read_gene_coordinates(path)
    assert list(genes["gene"]) == ["G1"]
    assert (genes["start"].iloc[0], genes["end"].iloc[0]) == (10000, 11000)
    gff = tmp_path / "genes.gff3"
    gff.write_text(
        "##gff-version 3\n"
        "1\tensembl\tgene\t10001\t11000\t.\t-\t.\tID=gene:ENSG1;Name=G1;biotype=protein_coding\n"
        "1\tensembl\tmRNA\t10001\t11000\t.\t-\t.\tID=transcript:T1;Parent=gene:ENSG1\n"
    )
    genes = read_gene_coordinates(gff)
    assert list(genes.index) == ["G1"]
    assert genes["strand"].iloc[0] == "-"
    assert list(read_gene_coordinates(gff, id_column="gene_id").index) == ["ENSG1"]


def test_read_table_and_var_interval(tmp_path):
    table = pd.DataFrame(
        {
            "entrez_id": [1, 2, 3, 4],
            "symbol": ["G1", "G2", "G3", "NOPOS"],
            "gene_type": ["protein-coding", "protein-coding", "ncRNA", "protein-coding"],
            "chrom": ["chr1", "chr1", "chr2", None],
            "start": [10000.0, 20000.0, 5000.0, np.nan],
            "end": [11000.0, 21000.0, 6000.0, np.nan],
            "strand": ["+", "-", "+", None],
            "ensembl_ids": ["E1", "E2", "E3", "E4"],
        }
    )
    path = tmp_path / "genes.tsv.gz"
    table.to_csv(path, sep="\t", index=False)
    with pytest.warns(UserWarning, match="Dropped 1 of 3 genes without coordinates"):
        genes = read_gene_coordinates(path)
    assert list(genes.index) == ["G1", "G2"]
    assert genes["start"].dtype == np.int64
    with pytest.warns(UserWarning, match="Dropped 1"):
        assert list(read_gene_coordinates(path, id_column="ensembl_ids").index) == ["E1", "E2"]
    var = pd.DataFrame(
        {
            "gene_ids": ["E1", "E2", "E9"],
            "interval": ["chr1:10000-11000", "chr1:20000-21000", "NA"],
        },
        index=["G1", "G2", "G9"],
    )
    with pytest.warns(UserWarning, match="Dropped 1 of 3"):
        genes = read_gene_coordinates(ad.AnnData(var=var))
    assert list(genes.index) == ["G1", "G2"]
    assert set(genes["strand"]) == {"."}  # 10x intervals carry no strand
    with pytest.raises(ValueError, match="id_column"):
        read_gene_coordinates(table, id_column="nope")
    with pytest.raises(ValueError, match="chrom"):
        read_gene_coordinates(pd.DataFrame({"a": [1]}))


def test_duplicated_gene_names_keep_widest():
    genes = pd.concat([GENES, GENES.iloc[[0]].assign(start=0)], ignore_index=True)
    with pytest.warns(UserWarning, match="1 duplicated"):
        out = read_gene_coordinates(genes, gene_types=None)
    assert out.loc["G1", "start"] == 0
    assert out.index.is_unique


def test_hg38_table(shared_data):
    with pytest.warns(UserWarning, match="without coordinates"):
        genes = read_gene_coordinates(shared_data / "hs_genes_hg38.tsv.gz")
    assert len(genes) > 19_000
    assert genes.index.is_unique
    assert genes.loc["A1BG", "strand"] == "-"


# ---------------------------------------------------------------------------------------------
# vectorised overlap == brute force


interval = st.tuples(st.integers(-1, 2), st.integers(0, 60), st.integers(0, 30))


@settings(max_examples=200, deadline=None)
@given(st.lists(interval, max_size=25), st.lists(interval, max_size=25))
def test_overlap_pairs_matches_brute_force(a, b):
    def arrays(items):
        chrom = np.array([c for c, _, _ in items], dtype=np.int64)
        start = np.array([s for _, s, _ in items], dtype=np.int64)
        end = np.array([s + w for _, s, w in items], dtype=np.int64)
        return chrom, start, end

    ac, as_, ae = arrays(a)
    bc, bs, be = arrays(b)
    i, j = overlap_pairs(ac, as_, ae, bc, bs, be)
    got = sorted(zip(i.tolist(), j.tolist(), strict=True))
    expected = sorted(
        (x, y)
        for x in range(len(a))
        for y in range(len(b))
        if ac[x] >= 0
        and ac[x] == bc[y]
        and max(as_[x], bs[y]) < min(ae[x], be[y])  # >= 1 shared base
    )
    assert got == expected
