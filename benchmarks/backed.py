"""Annotate a large query opened in backed mode: peak memory and throughput on CPU.

1. Writes a synthetic query of ``--cells`` cells x 2,000 genes (raw counts, CSR, about 665
   non-zero genes per cell) to an h5ad file, in chunks of 100,000 cells joined with
   :func:`anndata.experimental.concat_on_disk`, so the whole matrix is never in memory.
2. In a fresh process: trains :class:`labeltransfer.JIND` (5 epochs) on a 20,000-cell reference
   of the same generator, opens the query with ``anndata.read_h5ad(path, backed="r+")``,
   annotates it (read 50,000 cells at a time), writes the results into the file with
   ``adata.write()`` and reports the peak resident memory (``VmHWM``) and the annotation
   throughput. With ``--format zarr`` the query is a zarr store instead, annotated with
   ``model.annotate(path)`` (read 50,000 cells at a time, results written into the store).

Usage::

    python benchmarks/backed.py --cells 1000000   # -> results/backed.csv / .md
    python benchmarks/backed.py --cells 1000000 --format zarr   # -> results/backed_zarr.*
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    Stopwatch,
    describe_machine,
    emit,
    machine_info,
    peak_rss_mb,
    rss_mb,
    run_child,
    uptime,
)

RESULTS = ROOT / "benchmarks" / "results"
GENES, TYPES, CHUNK, N_REFERENCE = 2000, 10, 100_000, 20_000


def _write_query(path: Path, n_cells: int) -> None:
    """Write ``n_cells`` synthetic query cells to ``path`` without holding them all."""
    import anndata as ad
    from anndata.experimental import concat_on_disk

    import labeltransfer as lt

    parts = []
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        for i, start in enumerate(range(0, n_cells, CHUNK)):
            n = min(CHUNK, n_cells - start)
            _, query = lt.data.synthetic(
                n_reference=10, n_query=n, n_genes=GENES, n_types=TYPES, seed=i + 1
            )
            query.obs_names = [f"cell_{start + j}" for j in range(n)]
            part = Path(tmp) / f"part_{i}{path.suffix}"  # concat_on_disk: same format
            chunk = ad.AnnData(X=query.X, obs=query.obs[["cell_type"]], var=query.var)
            chunk.write_zarr(part) if path.suffix == ".zarr" else chunk.write_h5ad(part)
            parts.append(part)
        concat_on_disk(parts, path)


def _child(config: dict[str, Any]) -> None:
    warnings.simplefilter("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("labeltransfer").setLevel(logging.ERROR)
    import anndata as ad
    import numpy as np
    import scvi
    import torch

    import labeltransfer as lt
    from labeltransfer.base._zarr import is_lazy, open_zarr

    torch.set_num_threads(config["threads"])
    scvi.settings.seed = 0
    sw = Stopwatch()
    record: dict[str, Any] = dict(config)
    with sw("train"):
        reference, _ = lt.data.synthetic(
            n_reference=N_REFERENCE, n_query=10, n_genes=GENES, n_types=TYPES, seed=1
        )
        lt.JIND.setup_anndata(reference, labels_key="cell_type")
        model = lt.JIND(reference, n_top_genes=None)
        model.train(max_epochs=5, enable_progress_bar=False, accelerator="cpu")
        del reference
    record["rss_before_annotate_mb"] = rss_mb()
    if config["path"].endswith(".zarr"):
        with sw("annotate"):  # reads the store in chunks and writes the results into it
            model.annotate(config["path"], key_added="jind")
        sw.seconds["write"] = 0.0
        query = open_zarr(config["path"])  # obs now holds the written results
    else:
        query = ad.read_h5ad(config["path"], backed="r+")
        with sw("annotate"):
            model.annotate(query, key_added="jind")
        with sw("write"):
            query.write()
    truth = query.obs["cell_type"].astype(str).to_numpy()
    pred = query.obs["jind_prediction"].astype(str).to_numpy()
    first = truth.size if truth.size <= CHUNK else CHUNK  # chunk 0 shares the reference's seed
    record.update(
        n_cells=int(query.n_obs),
        annotate_s=sw.seconds["annotate"],
        write_s=sw.seconds["write"],
        cells_per_s=query.n_obs / sw.seconds["annotate"],
        accuracy_first_chunk=float(np.mean(pred[:first] == truth[:first])),
        still_backed=bool(is_lazy(query)),
        peak_rss_mb=peak_rss_mb(),
    )
    emit(record)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=1_000_000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--format", choices=("h5ad", "zarr"), default="h5ad")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(json.loads(args.child))
        return
    import pandas as pd

    start = uptime()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"query.{args.format}"
        t0 = time.perf_counter()
        _write_query(path, args.cells)
        write_s = time.perf_counter() - t0
        size_gb = sum(f.stat().st_size for f in [path, *path.rglob("*")] if f.is_file()) / 2**30
        config = {"path": str(path), "threads": args.threads}
        records, error, wall = run_child([__file__, "--child", json.dumps(config)])
    if error:
        sys.exit(f"the annotation run failed:\n{error}")
    row = {**records[0], "file_gib": size_gb, "generate_s": write_s, "wall_s": wall}
    row.pop("path")
    out = RESULTS / ("backed.csv" if args.format == "h5ad" else "backed_zarr.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([row]).to_csv(out, index=False, float_format="%.5g")
    lines = [
        "# Annotating a backed query" + (" (zarr store)" if args.format == "zarr" else ""),
        "",
        f"Machine: {describe_machine(machine_info())}. Torch threads: {args.threads}.",
        f"Uptime at start: `{start}`; at end: `{uptime()}`. Written by `benchmarks/backed.py`.",
        "",
        "| cells | genes | file GiB | annotate s | cells/s | write-back s | peak RSS MB "
        "| RSS before annotate MB | still backed | accuracy (chunk 0) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {row['n_cells']:,} | {GENES} | {size_gb:.2f} | {row['annotate_s']:.1f} "
        f"| {row['cells_per_s']:,.0f} | {row['write_s']:.1f} | {row['peak_rss_mb']:.0f} "
        f"| {row['rss_before_annotate_mb']:.0f} | {row['still_backed']} "
        f"| {row['accuracy_first_chunk']:.3f} |",
        "",
        "Peak RSS is that of the whole annotation process: interpreter, torch, the JIND model and "
        "its training on 20,000 reference cells, then the backed annotation. Only the first "
        "100,000 query cells come from the reference's generator (the same cell-type "
        "programmes); the other chunks use other seeds, so their accuracy is not meaningful.",
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
