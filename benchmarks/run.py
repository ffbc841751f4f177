"""Peer benchmark: the four labeltransfer models next to scANVI, CellTypist and sklearn baselines.

One entry point for every tool on the same splits (``_tasks.py``): Kang ctrl -> stim,
CellBench CEL-seq2 -> Drop-seq and back, ``pbmc68k_reduced`` random 70/30, each with and
without a held-out novel type, the synthetic RNA -> ATAC task and a 50:1 long-tailed synthetic
task. Tools and recipes:

- ``JIND``: ``lt.JIND`` trained on the reference; on tasks with a batch shift (all but
  ``pbmc68k*`` and ``longtail``) ``model.align(query)`` first, the recipe of its user guide;
  then ``annotate(query)``.
- ``scNym``: ``lt.SCNYM`` on ``concat_reference_query(reference, query)``;
  ``new_identity_discovery=True`` on the tasks with a held-out type (the paper's advice when
  the query may hold new types).
- ``scDET``: ``lt.SCDET(adata, n_novel=<the true number of novel types>)`` (the number of
  types is known, as the paper assumes).
- ``CellPredX``: ``lt.CellPredX`` with ``preset="auto"`` (``rna_rna`` on AnnData); on the
  multiome task through ``setup_mudata`` on the RNA + ATAC-peak MuData (its gene activity is
  built by the model). Every other tool uses the ATAC cells' gene-activity matrix
  (``lt.data.gene_activity``) as its query there.
- ``scANVI``, ``CellTypist`` (best match), ``CellTypist+MV`` (majority voting), ``logreg``,
  ``kNN``: see ``_peers.py``.

Metrics come from ``lt.metrics.annotation_report`` on the query cells (closed-set metrics on
the cells of reference types, open-set AUROC of ``1 - confidence`` where a type is held out).
``train s`` covers everything that needs the reference (gene selection, model set-up,
training; scNym, scDET and CellPredX train on reference and query together), ``predict s``
everything per query (JIND's ``align``, scANVI's query training, the prediction).

Each (tool, task) runs in a fresh subprocess. ``--suite small`` (epochs capped, fewer
synthetic cells) runs the 3 seeds of a (tool, task) in the same child to save the interpreter
start-up and resets the peak-memory counter (``VmHWM``, ``/proc/self/clear_refs``) before each
seed; ``--suite full`` (the models' defaults) starts a fresh child per seed. ``--jobs`` children
run at the same time, each with one torch / BLAS thread.

Usage::

    python benchmarks/run.py --suite small              # -> results/run_small.{csv,md} + plots
    python benchmarks/run.py --suite full               # -> results/run_full.{csv,md} + plots
    python benchmarks/run.py --suite small --markdown-only   # tables and plots from the CSV
    python benchmarks/run.py --suite small --add --tools cellpredx --tasks kang  # redo a child
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    describe_machine,
    emit,
    machine_info,
    mean_sd,
    peak_rss_mb,
    reset_peak_rss,
    run_child,
    source_fingerprint,
    uptime,
)
from _tasks import ROOT, TASKS, TRUE_KEY, describe_tasks, load_task

if TYPE_CHECKING:
    import pandas as pd
    from _peers import Calls
    from _tasks import Task

SOURCE = ROOT / "src" / "labeltransfer"
RESULTS = ROOT / "benchmarks" / "results"
PLOTS = ROOT / "docs" / "_static" / "benchmarks"
KEY = "pred"
SEEDS = (0, 1, 2)
#: Child names; ``celltypist`` yields the ``CellTypist`` and ``CellTypist+MV`` records.
CHILD_TOOLS = ("scdet", "cellpredx", "scanvi", "scnym", "jind", "celltypist", "logreg", "knn")
#: Table order and display name of every tool.
TOOLS = {
    "jind": "JIND",
    "scnym": "scNym",
    "scdet": "scDET",
    "cellpredx": "CellPredX",
    "scanvi": "scANVI",
    "celltypist": "CellTypist",
    "celltypist_mv": "CellTypist+MV",
    "logreg": "logreg",
    "knn": "kNN",
}
#: Epoch caps of the small suite (``None`` in the full suite: each model's default).
SMALL_EPOCHS = {
    "jind": {"train": 20, "align": 30},
    "scnym": 25,
    "scdet": 25,
    "cellpredx": 40,
}
#: (column, title, digits) of the metric tables.
METRICS = (
    ("raw_accuracy", "Raw accuracy", 3),
    ("rejection_rate", "Rejection rate", 3),
    ("effective_accuracy", "Effective accuracy (non-rejected cells)", 3),
    ("macro_f1", "Macro-F1", 3),
    ("kappa", "Cohen's kappa", 3),
    ("ece", "Expected calibration error (10 bins)", 3),
    ("novel_auroc", "Open-set AUROC (held-out type vs the rest, 1 - confidence)", 3),
    ("novel_rejection_rate", "Held-out type: fraction withheld", 3),
    ("train_s", "Train seconds", 1),
    ("predict_s", "Predict seconds (incl. per-query fitting)", 2),
    ("peak_rss_mb", "Peak memory (MiB, VmHWM)", 0),
)
CPU = {"accelerator": "cpu", "enable_progress_bar": False}


# ============================================================================ labeltransfer
def _calls_from(adata) -> Calls:
    """The annotate fields of ``adata`` (written with ``key_added=KEY``) as :class:`Calls`."""
    import numpy as np
    from _peers import Calls

    obs = adata.obs
    return Calls(
        prediction=obs[f"{KEY}_prediction"].astype(str).to_numpy(),
        final=obs[KEY].astype(str).to_numpy(),
        confidence=obs[f"{KEY}_confidence"].to_numpy(dtype=np.float64),
        rejected=np.asarray(obs[f"{KEY}_rejected"], dtype=bool),
        probabilities=adata.obsm[f"{KEY}_probabilities"],
    )


def _epochs(tool: str, suite: str, part: str | None = None) -> dict[str, Any]:
    if suite != "small":
        return {}
    cap = SMALL_EPOCHS[tool]
    return {"max_epochs": cap[part] if isinstance(cap, dict) else cap}


def run_labeltransfer(tool: str, task: Task, suite: str) -> tuple[Calls, dict[str, Any]]:
    """Train and apply one labeltransfer model with its recommended recipe (module docstring)."""
    import labeltransfer as lt

    reference, query = task.reference.copy(), task.query.copy()
    query.obs = query.obs[["batch"]]  # the query's labels never reach a model
    info: dict[str, Any] = {}
    start = time.perf_counter()
    if tool == "jind":
        lt.JIND.setup_anndata(reference, labels_key=TRUE_KEY)
        model = lt.JIND(reference)
        model.train(**_epochs(tool, suite, "train"), **CPU)
        info["train_s"] = time.perf_counter() - start
        start = time.perf_counter()
        if task.shifted:
            model.align(query, **_epochs(tool, suite, "align"), **CPU)
        model.annotate(query, key_added=KEY)
        info["predict_s"] = time.perf_counter() - start
        info["aligned"] = task.shifted
        return _calls_from(query), info
    if tool == "cellpredx" and task.atac is not None:
        import mudata as md

        mdata = md.MuData({"rna": reference, "atac": task.atac.copy()})
        lt.CellPredX.setup_mudata(mdata, labels_key=TRUE_KEY)
        model = lt.CellPredX(mdata)
        model.train(**_epochs(tool, suite), **CPU)
        info["train_s"] = time.perf_counter() - start
        start = time.perf_counter()
        model.annotate(mdata, key_added=KEY)
        info["predict_s"] = time.perf_counter() - start
        atac = mdata["atac"]
        return _calls_from(atac[task.query.obs_names]), info
    adata = lt.data.concat_reference_query(reference, query, labels_key=TRUE_KEY)
    if tool == "scnym":
        lt.SCNYM.setup_anndata(adata, labels_key=TRUE_KEY)
        model = lt.SCNYM(adata, new_identity_discovery=task.held_out is not None)
    elif tool == "scdet":
        lt.SCDET.setup_anndata(adata, labels_key=TRUE_KEY)
        model = lt.SCDET(adata, n_novel=task.n_novel)
    elif tool == "cellpredx":
        lt.CellPredX.setup_anndata(adata, labels_key=TRUE_KEY)
        model = lt.CellPredX(adata)
    else:
        raise ValueError(f"Unknown labeltransfer tool {tool!r}.")
    model.train(**_epochs(tool, suite), **CPU)
    info["train_s"] = time.perf_counter() - start
    start = time.perf_counter()
    model.annotate(key_added=KEY)
    info["predict_s"] = time.perf_counter() - start
    info["epochs"] = model.training_summary_.get("epochs_trained")
    out = adata[(adata.obs["lt_role"] == "query").to_numpy()]
    out.obs_names = task.query.obs_names
    return _calls_from(out), info


# ============================================================================ scoring
def score(task: Task, calls: Calls) -> dict[str, Any]:
    """``lt.metrics.annotation_report`` of ``calls`` against the query's true types."""
    from anndata import AnnData

    import labeltransfer as lt
    from labeltransfer.metrics._report import REPORT_SCALARS

    obs = task.query.obs[[TRUE_KEY]].copy()
    obs[KEY] = calls.final
    obs[f"{KEY}_prediction"] = calls.prediction
    obs[f"{KEY}_confidence"] = calls.confidence
    obs[f"{KEY}_rejected"] = calls.rejected
    adata = AnnData(obs=obs)
    probabilities = calls.probabilities.copy()
    probabilities.index = obs.index
    adata.obsm[f"{KEY}_probabilities"] = probabilities
    report = lt.metrics.annotation_report(adata, TRUE_KEY, KEY)
    record = {name: float(report[name]) for name in REPORT_SCALARS}
    for name in ("novel_auroc", "oscr", "novel_rejection_rate"):
        if name in report:
            record[name] = float(report[name])
    record["n_known"], record["n_novel"] = report["n_known"], report["n_novel"]
    return record


# ============================================================================ child
def _child(config: dict[str, Any]) -> None:
    warnings.simplefilter("ignore")
    import logging

    for name in ("lightning", "lightning.pytorch", "labeltransfer", "scvi", "celltypist"):
        logging.getLogger(name).setLevel(logging.ERROR)
    tool, task_name, suite = config["tool"], config["task"], config["suite"]
    uses_torch = tool in ("jind", "scnym", "scdet", "cellpredx", "scanvi")
    if uses_torch:  # the other children never import torch (labeltransfer imports lazily)
        import torch

        torch.set_num_threads(int(config.get("threads", 1)))
    for position, seed in enumerate(config["seeds"]):
        reset = reset_peak_rss()
        base = {
            "tool": tool,
            "task": task_name,
            "seed": seed,
            "suite": suite,
            "seed_in_child": position,
            "peak_reset": reset,
            "load_1min_start": os.getloadavg()[0],
        }
        if uses_torch:
            import scvi

            scvi.settings.seed = seed
        start = time.perf_counter()
        task = load_task(task_name, seed, suite)
        base.update(
            data_s=time.perf_counter() - start,
            n_reference=int(task.reference.n_obs),
            n_query=int(task.query.n_obs),
            held_out=task.held_out or "",
        )
        if tool in ("jind", "scnym", "scdet", "cellpredx"):
            results = {tool: run_labeltransfer(tool, task, suite)}
        elif tool == "scanvi":
            from _peers import run_scanvi

            results = {tool: run_scanvi(task, seed, suite)}
        elif tool in ("logreg", "knn"):
            from _peers import run_sklearn

            results = {tool: run_sklearn(task, tool, seed)}
        elif tool == "celltypist":
            from _peers import run_celltypist

            results = run_celltypist(task, timeout=config.get("timeout"))
        else:
            raise ValueError(f"Unknown tool {tool!r}; use one of {', '.join(CHILD_TOOLS)}.")
        peak = peak_rss_mb()
        for name, (calls, info) in results.items():
            # CellTypist's info carries the peak of its own (venv) process
            emit({**base, "peak_rss_mb": peak, **info, "tool": name, **score(task, calls)})


# ============================================================================ parent
def _configs(suite: str, seeds: list[int], tools: list[str], tasks: list[str]) -> list[dict]:
    groups = [seeds] if suite == "small" else [[s] for s in seeds]
    return [
        {"tool": tool, "task": task, "seeds": group, "suite": suite, "threads": 1}
        for tool in tools
        for task in tasks
        for group in groups
    ]


def run(configs: list[dict], jobs: int, timeout: float) -> tuple[pd.DataFrame, list[dict]]:
    """Run every config in a fresh child, ``jobs`` at a time; records and failures."""
    import pandas as pd

    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}

    def one(config: dict) -> tuple[list[dict], dict | None]:
        config = {**config, "timeout": timeout}
        records, error, wall = run_child(
            [__file__, "--child", json.dumps(config)], timeout=timeout, env=env
        )
        tag = f"{config['tool']} {config['task']} seeds {config['seeds']}"
        for record in records:
            print(
                f"{tag}: {record['tool']} seed {record['seed']} acc "
                f"{record['raw_accuracy']:.3f} train {record['train_s']:.1f} s",
                flush=True,
            )
        if error:
            print(f"{tag}: FAILED after {wall:.0f} s\n{error}", flush=True)
            return records, {**config, "error": error}
        return records, None

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(one, configs))
    rows = [r for records, _ in results for r in records]
    failures = [f for _, f in results if f is not None]
    return pd.DataFrame(rows), failures


def _pivot(frame: pd.DataFrame, column: str, digits: int, tasks: list[str]) -> str:
    """Markdown table: tools x tasks, ``mean ± sd`` of ``column`` over the seeds."""
    header = "| tool | " + " | ".join(tasks) + " |"
    lines = [header, "|---|" + "---|" * len(tasks)]
    for tool, name in TOOLS.items():
        sub = frame[frame["tool"] == tool]
        if sub.empty:
            continue
        cells = []
        for task in tasks:
            values = sub.loc[sub["task"] == task, column] if column in sub else []
            cells.append(mean_sd(list(values), digits).replace("n/a", "–"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(frame: pd.DataFrame, suite: str, out_dir: Path = PLOTS) -> list[Path]:
    """Grouped bar charts (mean ± sd over seeds) of the accuracy and the cost metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = [t for t in TASKS if t in set(frame["task"])]
    tools = [t for t in TOOLS if t in set(frame["tool"])]
    panels = {
        "accuracy": [
            ("raw_accuracy", "raw accuracy", False),
            ("effective_accuracy", "effective accuracy", False),
            ("macro_f1", "macro-F1", False),
            ("kappa", "Cohen's kappa", False),
            ("rejection_rate", "rejection rate", False),
            ("ece", "ECE", False),
            ("novel_auroc", "open-set AUROC", False),
        ],
        "cost": [
            ("train_s", "train s", True),
            ("predict_s", "predict s", True),
            ("peak_rss_mb", "peak MiB", True),
        ],
    }
    colors = plt.get_cmap("tab10")
    width = 0.8 / len(tools)
    written = []
    for name, metrics in panels.items():
        fig, axes = plt.subplots(len(metrics), 1, figsize=(14, 2.4 * len(metrics)), sharex=True)
        for ax, (column, label, log) in zip(np.atleast_1d(axes), metrics, strict=True):
            for i, tool in enumerate(tools):
                stats = (
                    frame[frame["tool"] == tool]
                    .groupby("task")[column]
                    .agg(["mean", "std"])
                    .reindex(tasks)
                )
                x = np.arange(len(tasks)) + (i - (len(tools) - 1) / 2) * width
                ax.bar(
                    x,
                    stats["mean"],
                    width,
                    yerr=stats["std"].fillna(0),
                    label=TOOLS[tool],
                    color=colors(i),
                    error_kw={"elinewidth": 0.6},
                )
            ax.set_ylabel(label)
            if log:
                ax.set_yscale("log")
            ax.grid(axis="y", alpha=0.3)
        axes[-1].set_xticks(np.arange(len(tasks)), tasks, rotation=30, ha="right")
        axes[0].legend(ncol=len(tools), fontsize=8, loc="lower left", bbox_to_anchor=(0, 1.02))
        fig.tight_layout()
        path = out_dir / f"run_{suite}_{name}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def write_markdown(frame: pd.DataFrame, meta: dict[str, Any], path: Path) -> str:
    """Tables of every metric (tools x tasks) with the run's description."""
    suite = meta["suite"]
    tasks = [t for t in TASKS if t in set(frame["task"])]
    novel_tasks = [t for t in tasks if t.endswith("_novel")]
    lines = [
        f"# Peer benchmark, `{suite}` suite",
        "",
        f"Generated by `python benchmarks/run.py --suite {suite}`; one row per run in "
        f"`{path.with_suffix('.csv').name}`, plots in `docs/_static/benchmarks/run_{suite}_*.png`.",
        "",
        "<!-- tables-start -->",
        "",
        f"- Machine: {meta['machine']}.",
        f"- Wall time of the whole suite: **{meta['total_s'] / 60:.1f} min** "
        f"({meta['n_children']} child processes, {meta['jobs']} at a time, 1 torch/BLAS thread "
        "each; in the small suite the 3 seeds of a tool x task share one child).",
        f"- Load at start: `{meta['uptime_start']}`; at end: `{meta['uptime_end']}`.",
        f"- labeltransfer source SHA-1 `{meta['source_start']}` at start, "
        f"`{meta['source_end']}` at end.",
        *[
            f"- Re-run afterwards with `--add` (merged into the CSV): "
            f"{', '.join(sorted({c['tool'] + ' ' + c['task'] for c in added['configs']}))}, "
            f"{added['total_s'] / 60:.1f} min more (load at start `{added['uptime_start']}`)."
            for added in meta.get("added", [])
        ],
        "",
        "Values are mean ± sd over seeds "
        f"({', '.join(map(str, sorted(frame['seed'].unique())))}). Closed-set metrics are on "
        "the query cells of reference types; tools without a rejection rule (scANVI, "
        "CellTypist, logreg, kNN) reject nothing. Timings come from a shared 2-core machine "
        "and are indicative only: compare them within this table.",
        "",
        "## Tasks (seed 0)",
        "",
        "| task | reference cells | query cells | genes | reference types | held-out type | "
        "batch shift |",
        "|---|---|---|---|---|---|---|",
        *[
            f"| {r['task']} | {r['n_reference']} | {r['n_query']} | {r['n_genes']} | "
            f"{r['n_types']} | {r['held_out'] or '–'} | {'yes' if r['shift'] else 'no'} |"
            for r in meta["tasks"]
            if r["task"] in tasks
        ],
        "",
    ]
    for column, title, digits in METRICS:
        if column not in frame:
            continue
        shown = novel_tasks if column.startswith("novel_") else tasks
        lines += [
            f"## {title}",
            "",
            f"<!-- table:{column} -->",
            _pivot(frame, column, digits, shown),
            f"<!-- /table:{column} -->",
            "",
        ]
    if meta["failures"]:
        lines += ["## Failed runs", ""]
        for failure in meta["failures"]:
            tail = failure["error"].strip().splitlines()[-1] if failure["error"] else ""
            lines.append(
                f"- {failure['tool']} {failure['task']} seeds {failure['seeds']}: `{tail}`"
            )
        lines.append("")
    lines.append("<!-- tables-end -->")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def _merge(old: pd.DataFrame, old_meta: dict, new: pd.DataFrame, new_meta: dict):
    """Replace the rows (and failures) of ``old`` that the ``--add`` run ``new`` redid."""
    import pandas as pd

    redone = {(c["tool"], c["task"], s) for c in new_meta["configs"] for s in c["seeds"]}
    child_of = {"celltypist_mv": "celltypist"}
    keep = [
        (child_of.get(r.tool, r.tool), r.task, r.seed) not in redone
        for r in old[["tool", "task", "seed"]].itertuples()
    ]
    frame = pd.concat([old[keep], new], ignore_index=True)
    failures = [
        f
        for f in old_meta["failures"]
        if not any((f["tool"], f["task"], s) in redone for s in f["seeds"])
    ]
    meta = dict(old_meta)
    meta["failures"] = failures + new_meta["failures"]
    meta["added"] = [
        *old_meta.get("added", []),
        {k: new_meta[k] for k in ("configs", "total_s", "uptime_start", "uptime_end")},
    ]
    meta["source_end"] = new_meta["source_end"]
    return frame, meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=("small", "full"), default="small")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--tools", nargs="+", choices=CHILD_TOOLS, default=list(CHILD_TOOLS))
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--jobs", type=int, default=2, help="children at the same time")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per child")
    parser.add_argument("--out", type=Path, help="CSV path (default results/run_<suite>.csv)")
    parser.add_argument("--markdown-only", action="store_true", help="tables/plots from CSV")
    parser.add_argument(
        "--add",
        action="store_true",
        help="run only --tools x --tasks and merge them into the existing CSV, replacing "
        "their rows (e.g. to redo a failed child)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(json.loads(args.child))
        return

    import pandas as pd

    start = time.perf_counter()
    out = args.out or RESULTS / f"run_{args.suite}.csv"
    meta_path = out.with_suffix(".json")
    if args.markdown_only:
        frame, meta = pd.read_csv(out), json.loads(meta_path.read_text())
    else:
        if "celltypist" in args.tools:
            from _peers import celltypist_python

            print(f"CellTypist environment: {celltypist_python()}", flush=True)
        meta = {
            "suite": args.suite,
            "jobs": args.jobs,
            "uptime_start": uptime(),
            "source_start": source_fingerprint(SOURCE)["sha1"],
        }
        if not args.add:
            meta["tasks"] = describe_tasks(args.suite)
        configs = _configs(args.suite, args.seeds, args.tools, args.tasks)
        print(f"{len(configs)} children, {args.jobs} at a time; {meta['uptime_start']}")
        frame, failures = run(configs, args.jobs, args.timeout)
        meta.update(
            total_s=time.perf_counter() - start,
            n_children=len(configs),
            uptime_end=uptime(),
            source_end=source_fingerprint(SOURCE)["sha1"],
            machine=describe_machine(machine_info()),
            failures=failures,
            configs=configs,
        )
        if args.add:
            frame, meta = _merge(pd.read_csv(out), json.loads(meta_path.read_text()), frame, meta)
        out.parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(out, index=False, float_format="%.5g")
        meta_path.write_text(json.dumps(meta, indent=1, default=str) + "\n")
    text = write_markdown(frame, meta, out.with_suffix(".md"))
    plot(frame, args.suite)
    print(text)
    sys.exit(1 if meta["failures"] else 0)


if __name__ == "__main__":
    main()
