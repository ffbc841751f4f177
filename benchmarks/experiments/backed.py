"""Annotating a large query opened in backed mode (h5ad) or stored as zarr: memory and speed.

1. A first child writes a synthetic query of 1,000,000 cells x 2,000 genes (raw counts, CSR,
   about 665 non-zero genes per cell) in each format, in chunks of 100,000 cells joined with
   `anndata.experimental.concat_on_disk`, so the whole matrix is never in memory. Every
   chunk is drawn from the reference's generator (its types, programmes and batch shift;
   ``synthetic(seed=1, query_seed=i)``), as a query of the reference's tissue would be.
2. For each format, a fresh child trains ``lt.JIND`` (5 epochs) on a 20,000-cell reference of
   the same generator, then annotates the query: h5ad through
   ``anndata.read_h5ad(path, backed="r+")``, ``model.annotate(query)`` and ``query.write()``;
   zarr through ``model.annotate(path)``, which writes the results into the store. Both read
   25,000 cells at a time. Peak memory (``VmHWM``) is that of the whole child.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from _common import Stopwatch, peak_rss_mb, rss_mb

from experiments import Experiment

if TYPE_CHECKING:
    import pandas as pd

GENES, TYPES, CHUNK = 2000, 10, 100_000
#: Query cells, reference cells and training epochs per budget.
SIZES = {
    "quick": {"n_cells": 5_000, "n_reference": 1_000, "epochs": 1},
    "small": {"n_cells": 1_000_000, "n_reference": 20_000, "epochs": 5},
    "full": {"n_cells": 1_000_000, "n_reference": 20_000, "epochs": 5},
}


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
                n_reference=10, n_query=n, n_genes=GENES, n_types=TYPES, seed=1, query_seed=i
            )
            query.obs_names = [f"cell_{start + j}" for j in range(n)]
            part = Path(tmp) / f"part_{i}{path.suffix}"  # concat_on_disk: same format
            chunk = ad.AnnData(X=query.X, obs=query.obs[["cell_type"]], var=query.var)
            chunk.write_zarr(part) if path.suffix == ".zarr" else chunk.write_h5ad(part)
            parts.append(part)
        concat_on_disk(parts, path)


def configs(budget: str, seeds: list[int], workdir: Path) -> list[dict[str, Any]]:
    """Write both queries, then annotate each."""
    return [
        {"step": step, "format": fmt, "path": str(workdir / f"query.{fmt}"), **SIZES[budget]}
        for step in ("write", "annotate")
        for fmt in ("h5ad", "zarr")
    ]


def _annotate(config: dict[str, Any]) -> dict[str, Any]:
    import anndata as ad
    import numpy as np
    import scvi
    import torch

    import labeltransfer as lt
    from labeltransfer.base._zarr import is_lazy, open_zarr

    torch.set_num_threads(config["threads"])
    scvi.settings.seed = 0
    sw = Stopwatch()
    with sw("train"):
        reference, _ = lt.data.synthetic(
            n_reference=config["n_reference"], n_query=10, n_genes=GENES, n_types=TYPES, seed=1
        )
        lt.JIND.setup_anndata(reference, labels_key="cell_type")
        model = lt.JIND(reference, n_top_genes=None)
        model.train(max_epochs=config["epochs"], enable_progress_bar=False, accelerator="cpu")
        del reference
    record: dict[str, Any] = {"rss_before_annotate_mb": rss_mb()}
    if config["format"] == "zarr":
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
    record.update(
        n_cells=int(query.n_obs),
        train_s=sw.seconds["train"],
        annotate_s=sw.seconds["annotate"],
        write_s=sw.seconds["write"],
        cells_per_s=query.n_obs / sw.seconds["annotate"],
        accuracy=float(np.mean(pred == truth)),
        rejected=float(query.obs["jind_rejected"].mean()),
        still_backed=bool(is_lazy(query)),
        peak_rss_mb=peak_rss_mb(),
    )
    return record


def child(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Write one query, or annotate it."""
    record = {"step": config["step"], "format": config["format"]}
    path = Path(config["path"])
    if config["step"] == "write":
        start = time.perf_counter()
        _write_query(path, config["n_cells"])
        size = sum(f.stat().st_size for f in [path, *path.rglob("*")] if f.is_file())
        return [{**record, "generate_s": time.perf_counter() - start, "file_gib": size / 2**30}]
    return [{**record, **_annotate(config)}]


def sections(frame: pd.DataFrame, meta: dict[str, Any]) -> list[str]:
    """One row per format."""
    written = frame[frame["step"] == "write"].set_index("format")
    lines = [
        "| format | cells | genes | file GiB | annotate s | cells/s | write-back s "
        "| peak RSS MiB | RSS before annotate MiB | still lazy | accuracy | rejected |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in frame[frame["step"] == "annotate"].to_dict("records"):
        size = (
            written.loc[r["format"], "file_gib"] if r["format"] in written.index else float("nan")
        )
        lines.append(
            f"| {r['format']} | {r['n_cells']:,.0f} | {GENES} | {size:.2f} "
            f"| {r['annotate_s']:.1f} | {r['cells_per_s']:,.0f} | {r['write_s']:.1f} "
            f"| {r['peak_rss_mb']:.0f} | {r['rss_before_annotate_mb']:.0f} "
            f"| {r['still_backed']} | {r['accuracy']:.3f} | {r['rejected']:.3f} |"
        )
    return [
        *lines,
        "",
        "Peak RSS is that of the whole annotation process: interpreter, torch, the JIND model and "
        "its training, then the chunked annotation with the open-set layer (default rule). "
        "Accuracy is that of the argmax calls; rejected, the share of cells the layer "
        "rejected (``jind_rejected``).",
        "",
    ]


EXPERIMENT = Experiment(
    title="Annotating a backed h5ad and a zarr query",
    about=__doc__,
    sections=sections,
    configs=configs,
    child=child,
    seeds=(0,),
    sequential=True,
)
