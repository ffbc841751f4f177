"""Time to a result: from counts on disk to an annotated query, next to the peers (issue 18).

For each data set a first child writes a reference and a query of raw counts (CSR float32)
to two h5ad files:

- ``synthetic``: ``lt.data.synthetic`` (2,000 genes, 10 types, library size 500, about 300
  non-zero genes per cell, the query shifted by a per-gene log-fold change of sd 0.3);
- ``kang``: the Kang PBMC cells, control as reference and IFN-beta stimulated as query
  (``../shared/data/kang_ifnb_small.h5ad``, 1,267 genes), each side resampled to the size:
  cells drawn with replacement and their counts thinned binomially to 80%, so that no two
  drawn cells are the same. Fit for timing, not for the rejection rate: the held-out
  reference cells that set a model's thresholds have near-copies among its training cells.

Each tool then runs in a fresh child, with 1 and (``full`` budget) 2 threads (torch and the
BLAS libraries): it reads both files, runs the tool's benchmark recipe with the tool's default
training budget (``_tools.TOOLS``; the four models as their guides say, scANVI's
reference-mapping recipe, CellTypist in its own environment, logistic regression on the 2,000
most variable genes) and scores the argmax calls on the query. *End to end* is reading +
training + everything per query (JIND: alignment and annotation; scANVI: the query's
``load_query_data`` training and prediction); CellTypist's hand-over to its environment
(writing its input files, starting the interpreter, its majority-voting run) is outside it and
in *child wall*. Peak memory is the resident peak of the child (CellTypist: of its own
process, which reads the data again).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from _common import Stopwatch, peak_rss_mb, reset_peak_rss
from _writer import marked, number

from experiments import Experiment

if TYPE_CHECKING:
    import pandas as pd
    from anndata import AnnData

GENES, TYPES, LIBRARY, BATCH_SHIFT = 2000, 10, 500.0, 0.3
#: Share of a resampled Kang cell's counts kept (binomial thinning).
THINNING = 0.8
DATASETS = ("synthetic", "kang")
TOOL_NAMES = ("jind", "scnym", "scdet", "cellpredx", "scanvi", "celltypist", "logreg")
#: Cells per side (reference and query) and thread counts per budget.
SIZES = {"quick": 300, "small": 5_000, "full": 100_000}
THREADS = {"quick": (1,), "small": (1,), "full": (1, 2)}


def configs(budget: str, seeds: list[int], workdir: Path) -> list[dict[str, Any]]:
    """Write every data set's two files, then run every tool on each, one thread first.

    Every one-thread run comes before any two-thread run, so that ``--stop-after`` cut short
    still leaves the one-thread comparison on both data sets (the suite is sequential: a
    tool reads the files its data set's step writes).
    """
    size = SIZES[budget]
    common = {data: {"data": data, "size": size, "dir": str(workdir / data)} for data in DATASETS}
    out = [{"step": "data", **common[data]} for data in DATASETS]
    out += [
        {"step": "tool", **common[data], "method": name, "n_threads": threads}
        for threads in THREADS[budget]
        for data in DATASETS
        for name in TOOL_NAMES
    ]
    return out


def resample(adata: AnnData, n_cells: int, rng) -> AnnData:
    """``n_cells`` cells drawn with replacement, their counts thinned to :data:`THINNING`."""
    import numpy as np

    drawn = np.sort(rng.integers(0, adata.n_obs, n_cells))
    out = adata[drawn].copy()
    out.X.data = rng.binomial(out.X.data.astype(np.int64), THINNING).astype(np.float32)
    out.X.eliminate_zeros()
    out.obs_names = [f"{name}-{i}" for i, name in enumerate(adata.obs_names[drawn])]
    return out


def _write_data(config: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    from _tasks import SOURCES, _clean

    import labeltransfer as lt

    size, directory = config["size"], Path(config["dir"])
    directory.mkdir(parents=True, exist_ok=True)
    if config["data"] == "synthetic":
        reference, query = lt.data.synthetic(
            n_reference=size,
            n_query=size,
            n_genes=GENES,
            n_types=TYPES,
            batch_shift=BATCH_SHIFT,
            library_size=LIBRARY,
            seed=0,
        )
        reference.obs["batch"], query.obs["batch"] = "reference", "query"
        reference, query = _clean(reference), _clean(query)
    else:
        parts = SOURCES["kang"](0, "full", "batch").parts
        rng = np.random.default_rng(0)
        reference, query = resample(parts["ctrl"], size, rng), resample(parts["stim"], size, rng)
    reference.write_h5ad(directory / "reference.h5ad")
    query.write_h5ad(directory / "query.h5ad")
    return {
        "n_genes": int(reference.n_vars),
        "nnz_per_cell": float((reference.X.nnz + query.X.nnz) / (2 * size)),
        "file_mib": sum((directory / f).stat().st_size for f in ("reference.h5ad", "query.h5ad"))
        / 2**20,
    }


def _run_tool(config: dict[str, Any]) -> dict[str, Any]:
    import anndata as ad
    from _scoring import score
    from _tasks import Task
    from _tools import TOOLS, RunContext

    name, threads = config["method"], config["n_threads"]  # BLAS: the parent set the variables
    tool = TOOLS[name]
    budget = "quick" if config["budget"] == "quick" else "full"  # default training budgets
    if tool.uses_torch:
        import scvi
        import torch

        torch.set_num_threads(threads)
        scvi.settings.seed = 0
    reset_peak_rss()
    sw = Stopwatch()
    directory = Path(config["dir"])
    with sw("read"):
        reference = ad.read_h5ad(directory / "reference.h5ad")
        query = ad.read_h5ad(directory / "query.h5ad")
    task = Task(config["data"], reference, query, (), shifted=True)
    ctx = RunContext(name, tool, 0, budget, config["max_epochs"], config["timeout"])
    with sw("run"):
        calls, info = tool.run(task, ctx)[name]
    scores = score(task, calls)
    return {
        "n_reference": int(reference.n_obs),
        "n_query": int(query.n_obs),
        "read_s": sw.seconds["read"],
        "train_s": info["train_s"],
        "predict_s": info["predict_s"],
        "end_to_end_s": sw.seconds["read"] + info["train_s"] + info["predict_s"],
        "child_wall_s": sw.seconds["read"] + sw.seconds["run"],
        "cpu_s": sw.cpu_seconds["read"] + sw.cpu_seconds["run"],
        # a peer run in its own environment reports the peak of that process
        "peak_rss_mb": info.get("peak_rss_mb", peak_rss_mb()),
        "train_epochs": info.get("train_epochs"),
        "align_epochs": info.get("align_epochs"),
        "raw_accuracy": scores["raw_accuracy"],
        "balanced_accuracy": scores["balanced_accuracy"],
        "rejection_rate": scores["rejection_rate"],
        "load_1min": os.getloadavg()[0],
    }


def child(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Write one data set, or run one tool on it."""
    record = {"step": config["step"], "data": config["data"], "size": config["size"]}
    if config["step"] == "data":
        return [{**record, **_write_data(config)}]
    extra = {"tool": config["method"], "threads": config["n_threads"]}
    return [{**record, **extra, **_run_tool(config)}]


def run_name(item: dict[str, Any]) -> str:
    """The run of a configuration or record, e.g. ``"scnym kang, 1 thread"`` (for ``--add``).

    A configuration names its tool ``method`` and its thread count ``n_threads`` (its
    ``threads`` is the harness's); a record names them ``tool`` and ``threads``.
    """
    if item["step"] == "data":
        return f"{item['data']} data"
    # a record read back from the CSV has a float thread count (the data rows have none)
    threads = int(item["n_threads"] if "method" in item else item["threads"])
    tool = item.get("method", item.get("tool"))
    return f"{tool} {item['data']}, {threads} thread{'s' if threads > 1 else ''}"


def _ratio(value: float, reference: float) -> str:
    return "–" if math.isnan(reference) or reference <= 0 else f"{value / reference:.2f}"


def _cpu_per_wall(record: dict[str, Any]) -> str:
    """CPU over wall time of the child; "–" for a peer whose work ran in its own process."""
    from _tools import TOOLS

    if TOOLS[record["tool"]].env is not None:
        return "–"
    return f"{record['cpu_s'] / record['child_wall_s']:.2f}"


def sections(frame: pd.DataFrame, meta: dict[str, Any]) -> list[str]:
    """One table per data set: every tool's time, memory and accuracy, with ratios to peers."""
    from _tools import DISPLAY

    runs = frame[frame["step"] == "tool"]
    if runs.empty:
        return ["No tool run finished."]
    data = frame[frame["step"] == "data"].set_index("data")
    lines = []
    for name, group in runs.groupby("data", sort=False):
        about = data.loc[name] if name in data.index else None
        lines += [f"## {name}", ""]
        if about is not None:
            lines += [
                f"{about['size']:,.0f} reference + {about['size']:,.0f} query cells, "
                f"{about['n_genes']:,.0f} genes, {about['nnz_per_cell']:.0f} non-zero genes "
                f"per cell, {about['file_mib']:.0f} MiB on disk.",
                "",
            ]
        rows = [
            "| tool | threads | end to end s | train s | per query s | x CellTypist | x scANVI "
            "| peak RSS MiB | epochs (train/align) | accuracy | rejected | CPU/wall |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for threads, block in group.groupby("threads"):
            threads = int(threads)
            peers = block.set_index("tool")["end_to_end_s"]
            celltypist = float(peers.get("celltypist", float("nan")))
            scanvi = float(peers.get("scanvi", float("nan")))
            for r in block.to_dict("records"):
                epochs = "/".join(number(r.get(k), 0) for k in ("train_epochs", "align_epochs"))
                rows.append(
                    f"| {DISPLAY[r['tool']]} | {threads} | {number(r['end_to_end_s'])} "
                    f"| {number(r['train_s'])} | {number(r['predict_s'])} "
                    f"| {_ratio(r['end_to_end_s'], celltypist)} "
                    f"| {_ratio(r['end_to_end_s'], scanvi)} | {number(r['peak_rss_mb'], 0)} "
                    f"| {epochs} | {r['raw_accuracy']:.3f} | {r['rejection_rate']:.3f} "
                    f"| {_cpu_per_wall(r)} |"
                )
        lines += marked(f"endtoend_{name}", "\n".join(rows))
    lines += [
        "*End to end*: reading both files (the CSV's `read_s`), training and everything per "
        "query (*per query*). *x CellTypist*, *x scANVI*: end-to-end time over that peer's at "
        "the same thread count. "
        "*Accuracy*: argmax calls on the query (all of its types are in the reference); "
        "*rejected*: the share the model's default rule left `Unassigned` (the peers reject "
        "nothing). *CPU/wall* near the thread count means the run had its cores to itself.",
        "",
    ]
    return lines


def figures(frame: pd.DataFrame, meta: dict[str, Any], directory: Path) -> list[Path]:
    """End-to-end seconds per tool, one panel per data set (log scale), bars per thread count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from _tools import DISPLAY

    runs = frame[frame["step"] == "tool"]
    datasets = list(dict.fromkeys(runs["data"]))
    if not datasets:
        return []
    tools = [t for t in TOOL_NAMES if t in set(runs["tool"])]
    thread_counts = sorted(set(runs["threads"]))
    fig, axes = plt.subplots(
        1, len(datasets), figsize=(6.6, 0.6 + 0.3 * len(tools)), sharey=True, squeeze=False
    )
    height = 0.8 / len(thread_counts)
    for ax, name in zip(axes[0], datasets, strict=True):
        block = runs[runs["data"] == name]
        for i, threads in enumerate(thread_counts):
            seconds = block[block["threads"] == threads].set_index("tool")["end_to_end_s"]
            values = [float(seconds.get(t, np.nan)) for t in tools]
            ax.barh(
                np.arange(len(tools)) + i * height,
                values,
                height=height,
                label=f"{threads} thread{'s' if threads > 1 else ''}",
            )
        ax.set_xscale("log")
        ax.set_title(
            f"{name}, {int(block['size'].iloc[0]):,} + {int(block['size'].iloc[0]):,}", fontsize=9
        )
        ax.set_xlabel("end to end (s, log)", fontsize=8)
        ax.tick_params(labelsize=8)
    axes[0][0].set_yticks(np.arange(len(tools)) + 0.4 - height / 2)
    axes[0][0].set_yticklabels([DISPLAY[t] for t in tools])
    axes[0][0].invert_yaxis()
    if len(thread_counts) > 1:
        axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"endtoend_{meta['budget']}.png"
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return [path]


EXPERIMENT = Experiment(
    title="Time to a result, next to the peers",
    about=__doc__,
    sections=sections,
    configs=configs,
    child=child,
    figures=figures,
    seeds=(0,),
    sequential=True,
    run_name=run_name,
)
