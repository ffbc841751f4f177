"""``lt.data.gene_activity``: time and peak memory in peak mode and in fragment mode.

Data (simulated):

- peak mode: a cells x peaks CSR count matrix (~2% dense), 500 bp peaks placed uniformly along
  the hg38 primary chromosomes (lengths from ``hs_genes_hg38.tsv.gz``);
- fragment mode: a 10x-style ``fragments.tsv.gz`` (sorted by position, ``#`` header, 5
  columns) with ~2,000 fragments per cell for the same barcodes, written by a first child.

Genes: protein-coding genes of ``hs_genes_hg38.tsv.gz`` (Signac defaults: 2 kb upstream, max
width 500 kb). The peak memory of the ``gene_activity`` call is ``VmHWM`` after resetting it;
in peak mode it must stay under half the size of the dense peak matrix (never densified; the
child fails otherwise, from a dense size of 1 GiB on).
"""

from __future__ import annotations

import gzip
import time
from typing import TYPE_CHECKING, Any

from _common import csr_mib, peak_rss_mb, reset_peak_rss, rss_mb
from _tasks import DATA
from _writer import number

from experiments import Experiment

if TYPE_CHECKING:
    from pathlib import Path

    import numpy as np
    import pandas as pd

GENES = DATA / "hs_genes_hg38.tsv.gz"
CHROMS = [f"chr{i}" for i in range(1, 23)] + ["chrX", "chrY"]
#: The densification check applies from this dense size on (below it the interpreter's own
#: allocations during the call outweigh half the dense matrix).
DENSE_CHECK_MB = 1024
#: Sizes per budget (``small`` runs the full sizes: this suite takes about a minute).
SIZES = {
    "quick": {"n_cells": 500, "n_peaks": 5_000, "density": 0.02, "fragments_per_cell": 200},
    "small": {"n_cells": 20_000, "n_peaks": 100_000, "density": 0.02, "fragments_per_cell": 2000},
    "full": {"n_cells": 20_000, "n_peaks": 100_000, "density": 0.02, "fragments_per_cell": 2000},
}


def _chrom_lengths() -> pd.Series:
    import numpy as np
    import pandas as pd

    table = pd.read_csv(GENES, sep="\t", usecols=["chrom", "end"], low_memory=False)
    table = table[table["chrom"].isin(CHROMS)]
    return (table.groupby("chrom")["end"].max() + 100_000).astype(np.int64).loc[CHROMS]


def _barcodes(n: int) -> np.ndarray:
    """Unique 16-base barcodes with the 10x '-1' suffix (base-4 digits of the cell number)."""
    import numpy as np

    digits = (np.arange(n, dtype=np.int64)[:, None] >> (2 * np.arange(16))) & 3
    letters = np.array(list("ACGT"))[digits]
    return np.array(["".join(row) + "-1" for row in letters])


def _peak_data(n_cells: int, n_peaks: int, density: float, seed: int = 0):
    import anndata as ad
    import numpy as np
    import pandas as pd
    from scipy import sparse

    rng = np.random.default_rng(seed)
    lengths = _chrom_lengths()
    chrom = rng.choice(len(lengths), size=n_peaks, p=lengths / lengths.sum())
    start = (rng.random(n_peaks) * (lengths.to_numpy()[chrom] - 500)).astype(np.int64)
    keys = np.unique(chrom.astype(np.int64) * 2**32 + start)  # sorted, unique peaks
    chrom, start = keys // 2**32, keys % 2**32
    names = pd.Index(
        np.char.add(
            np.char.add(np.asarray(lengths.index)[chrom].astype(str), ":"),
            np.char.add(np.char.add(start.astype(str), "-"), (start + 500).astype(str)),
        )
    )
    # per-cell depth varies (log-normal), columns drawn with replacement then summed
    per_cell = rng.poisson(density * len(keys) * rng.lognormal(0, 0.3, n_cells) / np.exp(0.045))
    indptr = np.concatenate([[0], np.cumsum(per_cell)]).astype(np.int64)
    indices = rng.integers(0, len(keys), size=indptr[-1], dtype=np.int32)
    data = np.ones(indptr[-1], dtype=np.float32)
    X = sparse.csr_matrix((data, indices, indptr), shape=(n_cells, len(keys)))
    X.sum_duplicates()
    return ad.AnnData(
        X=X, obs=pd.DataFrame(index=_barcodes(n_cells)), var=pd.DataFrame(index=names)
    )


def _write_fragments(path: Path, n_cells: int, per_cell: int, seed: int = 1) -> int:
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    lengths = _chrom_lengths()
    barcodes = _barcodes(n_cells)
    counts = rng.multinomial(n_cells * per_cell, lengths / lengths.sum())
    n_written = 0
    with gzip.open(path, "wt", compresslevel=1) as fh:
        fh.write("# id=benchmark\n# pipeline=labeltransfer simulated fragments\n")
        for c, (name, length) in enumerate(lengths.items()):
            for lo in range(0, int(counts[c]), 2_000_000):
                m = min(2_000_000, int(counts[c]) - lo)
                start = np.sort(rng.integers(0, length - 1000, size=m))
                frame = pd.DataFrame(
                    {
                        "chrom": name,
                        "start": start,
                        "end": start + rng.integers(50, 700, size=m),
                        "barcode": barcodes[rng.integers(0, n_cells, size=m)],
                        "count": rng.integers(1, 4, size=m),
                    }
                )
                frame.to_csv(fh, sep="\t", header=False, index=False)
                n_written += m
    return n_written


def configs(budget: str, seeds: list[int], workdir: Path) -> list[dict[str, Any]]:
    """Write the fragments file, then measure peak mode and fragment mode."""
    sizes = {**SIZES[budget], "fragments": str(workdir / "fragments.tsv.gz")}
    return [{"mode": mode, **sizes} for mode in ("write_fragments", "peaks", "fragments")]


def child(config: dict[str, Any]) -> list[dict[str, Any]]:
    """One step of :func:`configs`."""
    from pathlib import Path

    from labeltransfer.data import gene_activity

    record: dict[str, Any] = {"mode": config["mode"]}
    if config["mode"] == "write_fragments":
        start = time.perf_counter()
        path = Path(config["fragments"])
        n = _write_fragments(path, config["n_cells"], config["fragments_per_cell"])
        return [{**record, "n_fragments": n, "seconds": time.perf_counter() - start}]
    if config["mode"] == "peaks":
        atac = _peak_data(config["n_cells"], config["n_peaks"], config["density"])
        record.update(
            n_cells=atac.n_obs,
            n_features=atac.n_vars,
            input_nnz=int(atac.X.nnz),
            input_mb=csr_mib(atac.X),
            dense_input_mb=atac.n_obs * atac.n_vars * 4 / 2**20,
        )

        def call():
            return gene_activity(atac, genes=GENES)
    else:
        cells = _barcodes(config["n_cells"])
        record.update(
            n_cells=len(cells), input_mb=Path(config["fragments"]).stat().st_size / 2**20
        )

        def call():
            return gene_activity(genes=GENES, fragments=config["fragments"], barcodes=cells)

    baseline = rss_mb()
    record["peak_reset"] = reset_peak_rss()
    start = time.perf_counter()
    activity = call()
    record["seconds"] = time.perf_counter() - start
    peak = peak_rss_mb()
    densified = peak - baseline >= 0.5 * record.get("dense_input_mb", float("inf"))
    if densified and record["dense_input_mb"] >= DENSE_CHECK_MB:
        raise RuntimeError(
            f"gene_activity's memory grew by {peak - baseline:.0f} MiB, half the dense peak "
            f"matrix ({record['dense_input_mb']:.0f} MiB) or more: it was densified."
        )
    info = activity.uns["gene_activity"]
    out = activity.X
    record.update(
        rss_before_mb=baseline,
        peak_rss_mb=peak,
        peak_rss_increase_mb=peak - baseline,
        n_genes=info["n_genes"],
        n_genes_with_signal=info["n_genes_with_signal"],
        output_nnz=int(out.nnz),
        output_mb=csr_mib(out),
    )
    return [record]


def sections(frame: pd.DataFrame, meta: dict[str, Any]) -> list[str]:
    """The two modes side by side."""
    rows = frame[frame["mode"] != "write_fragments"]
    written = frame[frame["mode"] == "write_fragments"]
    lines = [
        "| mode | cells | input features | input nnz | input MiB | dense input MiB | genes "
        "| genes with signal | output nnz | seconds | peak RSS MiB | peak increase MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows.to_dict("records"):
        columns = [
            number(r.get(name), digits)
            for name, digits in (
                ("n_cells", 0),
                ("n_features", 0),
                ("input_nnz", 0),
                ("input_mb", 1),
                ("dense_input_mb", 0),
                ("n_genes", 0),
                ("n_genes_with_signal", 0),
                ("output_nnz", 0),
                ("seconds", 1),
                ("peak_rss_mb", 0),
                ("peak_rss_increase_mb", 0),
            )
        ]
        lines.append(f"| {r['mode']} | " + " | ".join(columns) + " |")
    if not written.empty:
        w = written.iloc[0]
        lines += [
            "",
            f"The fragments file ({w['n_fragments']:,.0f} fragments) took "
            f"{w['seconds']:.1f} s to write.",
        ]
    return [*lines, ""]


EXPERIMENT = Experiment(
    title="Gene activity from peaks and from fragments",
    about=__doc__,
    sections=sections,
    configs=configs,
    child=child,
    seeds=(0,),
    sequential=True,
)
