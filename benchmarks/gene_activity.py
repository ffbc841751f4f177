"""Benchmark lt.data gene activity: time and peak memory, peak mode and fragment mode.

Data (simulated, no real ATAC data is available here):

- peak mode: a 20,000-cell x 100,000-peak CSR count matrix (~2% dense), 500 bp peaks placed
  uniformly along the hg38 primary chromosomes (lengths from ``hs_genes_hg38.tsv.gz``);
- fragment mode: a 10x-style ``fragments.tsv.gz`` (sorted by position, ``#`` header, 5 columns)
  with ~2,000 fragments per cell for the same 20,000 barcodes, written to a temporary directory.

Genes: protein-coding genes of ``hs_genes_hg38.tsv.gz`` (Signac defaults: 2 kb upstream, max
width 500 kb). Each mode runs in its own subprocess; the peak resident memory of the
``gene_activity`` call is read from ``VmHWM`` after resetting it (``/proc/self/clear_refs``), and
is compared with the size of the dense peak matrix to show that it is never densified.

Usage::

    python benchmarks/gene_activity.py                   # full size, writes the CSV
    python benchmarks/gene_activity.py --n-cells 2000    # quick run
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import scipy
from scipy import sparse

ROOT = Path(__file__).resolve().parents[1]
GENES = ROOT.parent / "shared" / "data" / "hs_genes_hg38.tsv.gz"
RESULTS = ROOT / "benchmarks" / "results" / "gene_activity.csv"
CHROMS = [f"chr{i}" for i in range(1, 23)] + ["chrX", "chrY"]


def _rss_mb(field: str) -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", status).group(1)) / 1024


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _chrom_lengths() -> pd.Series:
    table = pd.read_csv(GENES, sep="\t", usecols=["chrom", "end"], low_memory=False)
    table = table[table["chrom"].isin(CHROMS)]
    return (table.groupby("chrom")["end"].max() + 100_000).astype(np.int64).loc[CHROMS]


def _barcodes(n: int) -> np.ndarray:
    """Unique 16-base barcodes with the 10x '-1' suffix (base-4 digits of the cell number)."""
    digits = (np.arange(n, dtype=np.int64)[:, None] >> (2 * np.arange(16))) & 3
    letters = np.array(list("ACGT"))[digits]
    return np.array(["".join(row) + "-1" for row in letters])


def _peak_data(n_cells: int, n_peaks: int, density: float, seed: int = 0):
    import anndata as ad

    rng = np.random.default_rng(seed)
    lengths = _chrom_lengths()
    chrom = rng.choice(len(lengths), size=n_peaks, p=lengths / lengths.sum())
    start = (rng.random(n_peaks) * (lengths.to_numpy()[chrom] - 500)).astype(np.int64)
    keys = np.unique(chrom.astype(np.int64) * 2**32 + start)  # sorted, unique peaks
    chrom, start = keys // 2**32, keys % 2**32
    n_peaks = len(keys)
    names = pd.Index(
        np.char.add(
            np.char.add(np.asarray(lengths.index)[chrom].astype(str), ":"),
            np.char.add(np.char.add(start.astype(str), "-"), (start + 500).astype(str)),
        )
    )
    # per-cell depth varies (log-normal), columns drawn with replacement then summed
    per_cell = rng.poisson(density * n_peaks * rng.lognormal(0, 0.3, n_cells) / np.exp(0.045))
    indptr = np.concatenate([[0], np.cumsum(per_cell)]).astype(np.int64)
    indices = rng.integers(0, n_peaks, size=indptr[-1], dtype=np.int32)
    data = np.ones(indptr[-1], dtype=np.float32)
    X = sparse.csr_matrix((data, indices, indptr), shape=(n_cells, n_peaks))
    X.sum_duplicates()
    obs = pd.DataFrame(index=_barcodes(n_cells))
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=names))


def _write_fragments(path: Path, n_cells: int, per_cell: int, seed: int = 1) -> int:
    rng = np.random.default_rng(seed)
    lengths = _chrom_lengths()
    barcodes = _barcodes(n_cells)
    n_total = n_cells * per_cell
    counts = rng.multinomial(n_total, lengths / lengths.sum())
    n_written = 0
    with gzip.open(path, "wt", compresslevel=1) as fh:
        fh.write("# id=benchmark\n# pipeline=labeltransfer simulated fragments\n")
        for c, (name, length) in enumerate(lengths.items()):
            n = int(counts[c])
            for lo in range(0, n, 2_000_000):
                m = min(2_000_000, n - lo)
                start = np.sort(rng.integers(0, length - 1000, size=m))
                width = rng.integers(50, 700, size=m)
                frame = pd.DataFrame(
                    {
                        "chrom": name,
                        "start": start,
                        "end": start + width,
                        "barcode": barcodes[rng.integers(0, n_cells, size=m)],
                        "count": rng.integers(1, 4, size=m),
                    }
                )
                frame.to_csv(fh, sep="\t", header=False, index=False)
                n_written += m
    return n_written


def _child(args: argparse.Namespace) -> None:
    from labeltransfer.data._gene_activity import gene_activity

    warnings.simplefilter("ignore", UserWarning)  # genes without coordinates in the table
    record: dict = {"mode": args.child}
    if args.child == "peaks":
        atac = _peak_data(args.n_cells, args.n_peaks, args.density)
        record.update(
            n_cells=atac.n_obs,
            n_features=atac.n_vars,
            input_nnz=int(atac.X.nnz),
            input_density=atac.X.nnz / atac.n_obs / atac.n_vars,
            input_mb=(atac.X.data.nbytes + atac.X.indices.nbytes + atac.X.indptr.nbytes) / 2**20,
            dense_input_mb=atac.n_obs * atac.n_vars * 4 / 2**20,
        )
        kwargs = {"genes": GENES}
        call = lambda: gene_activity(atac, **kwargs)  # noqa: E731
    else:
        cells = _barcodes(args.n_cells)
        record.update(
            n_cells=len(cells),
            n_features=int(args.n_fragments),
            input_nnz=int(args.n_fragments),
            input_density=float("nan"),
            input_mb=Path(args.fragments).stat().st_size / 2**20,
            dense_input_mb=float("nan"),
        )
        call = lambda: gene_activity(  # noqa: E731
            genes=GENES, fragments=args.fragments, barcodes=cells
        )
    baseline = _rss_mb("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    ga = call()
    seconds = time.perf_counter() - t0
    peak = _rss_mb("VmHWM")
    info = ga.uns["gene_activity"]
    if args.child == "peaks":
        # the call must never densify the peak matrix (cells x peaks float32)
        assert peak - baseline < 0.5 * record["dense_input_mb"], "peak matrix was densified?"
    record.update(
        seconds=seconds,
        rss_before_mb=baseline,
        peak_rss_mb=peak,
        peak_rss_increase_mb=peak - baseline,
        n_genes=info["n_genes"],
        n_genes_with_signal=info["n_genes_with_signal"],
        output_nnz=int(ga.X.nnz),
        output_mb=(ga.X.data.nbytes + ga.X.indices.nbytes + ga.X.indptr.nbytes) / 2**20,
    )
    print("RESULT " + json.dumps(record))


def _machine() -> str:
    cpu = "unknown CPU"
    try:
        match = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = match.group(1).strip() if match else cpu
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, no GPU; {platform.platform()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-cells", type=int, default=20_000)
    parser.add_argument("--n-peaks", type=int, default=100_000)
    parser.add_argument("--density", type=float, default=0.02)
    parser.add_argument("--fragments-per-cell", type=int, default=2_000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", choices=["peaks", "fragments"], help=argparse.SUPPRESS)
    parser.add_argument("--fragments", help=argparse.SUPPRESS)
    parser.add_argument("--n-fragments", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return

    base = [
        sys.executable,
        __file__,
        f"--n-cells={args.n_cells}",
        f"--n-peaks={args.n_peaks}",
        f"--density={args.density}",
    ]
    rows = []

    def run(extra: list[str]) -> dict:
        out = subprocess.run(base + extra, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            sys.exit(out.stdout + out.stderr)
        line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
        return json.loads(line.removeprefix("RESULT "))

    rows.append(run(["--child=peaks"]))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fragments.tsv.gz"
        t0 = time.perf_counter()
        n = _write_fragments(path, args.n_cells, args.fragments_per_cell)
        write_s = time.perf_counter() - t0
        record = run(["--child=fragments", f"--fragments={path}", f"--n-fragments={n}"])
        record["fragments_write_s"] = write_s
        rows.append(record)

    import labeltransfer

    table = pd.DataFrame(rows)
    table["machine"] = _machine()
    table["date"] = datetime.now(UTC).strftime("%Y-%m-%d")
    table["labeltransfer"] = getattr(labeltransfer, "__version__", "dev")
    table["numpy"] = np.__version__
    table["scipy"] = scipy.__version__
    table["pandas"] = pd.__version__
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False, float_format="%.4g")
    show = [
        "mode",
        "n_cells",
        "n_features",
        "input_nnz",
        "input_mb",
        "dense_input_mb",
        "n_genes",
        "output_nnz",
        "seconds",
        "peak_rss_mb",
        "peak_rss_increase_mb",
    ]
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table[show].to_string(index=False, float_format=lambda v: f"{v:.1f}"))
    print(f"machine: {table['machine'].iloc[0]}")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
