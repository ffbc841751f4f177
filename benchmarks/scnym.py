"""Benchmark lt.SCNYM: ablations, calibration, new types, markers, multi-domain training.

Experiments (each configuration and seed runs in its own subprocess, so its peak resident
memory, ``VmHWM`` read at the end of the child, is its own):

1. ``ablation``/kang: Kang et al. PBMC, reference = ``batch == "ctrl"``, query = ``"stim"``,
   one domain per batch. The full model and its ablations: ``no_mixmatch`` (query cells reach
   only the adversary), ``no_adversary`` (reversed gradient weight 0) and ``neither``
   (supervised MixUp training). Accuracy and calibration (ECE, overconfidence error).
2. ``transfer``/cellbench: CellBench CEL-seq2 -> Drop-seq, full model; also the accuracy on
   the demuxlet singlets (``demuxlet_cls == "SNG"``).
3. ``novel``/kang: B cells removed from the reference, ``new_identity_discovery=True``; the
   median confidence of the held-out type and of the seen types, the AUROC of
   ``1 - confidence`` for held-out vs seen cells, and ``lt.tl.discover_novel`` (defaults): the
   share of held-out cells put in ``novel_<i>`` groups (recall) and the share of held-out
   cells among the cells of those groups (precision).
4. ``markers``/kang: ``lt.tl.marker_genes`` (300 cells, 100 integration steps) on the
   reference and on the query, grouped by true type; the rank of known markers of each type.
5. ``multidomain``/kang: ``batch_key="sample"``: the two donors' control samples are two
   reference domains and their stimulated samples two query domains (four domains).

Defaults of ``lt.SCNYM`` everywhere (400 epochs at most, early stopping), ``accelerator="cpu"``
and ``scvi.settings.seed = seed``.

Usage::

    python benchmarks/scnym.py --threads 1          # seeds 0, 1, 2 -> results/scnym.{csv,md}
    python benchmarks/scnym.py --quick --threads 1  # seed 0 -> results/scnym_quick.{csv,md}
    python benchmarks/scnym.py --markdown-only      # rewrite the markdown from the CSV
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    Stopwatch,
    emit,
    epoch_timer,
    peak_rss_mb,
    run_suite,
    seed_table,
)

DATA = ROOT.parent / "shared" / "data"
SOURCE = ROOT / "src" / "labeltransfer"
RESULTS = ROOT / "benchmarks" / "results"
KEY = "scnym"
TRUE_KEY = "cell_type"
ABLATIONS = {
    "full": {},
    "no_mixmatch": {"mixmatch": False},
    "no_adversary": {"adversary_max_weight": 0.0},
    "neither": {"mixmatch": False, "adversary_max_weight": 0.0},
}
HELD_OUT = "B cells"
KNOWN_MARKERS = {
    "B cells": ["CD79A", "MS4A1"],
    "CD14+ Monocytes": ["CD14", "LYZ"],
    "FCGR3A+ Monocytes": ["FCGR3A"],
    "CD8 T cells": ["CD8A"],
    "CD4 T cells": ["CD4", "IL7R"],
}
MARKER_TOP = 20
CPU = {"accelerator": "cpu", "enable_progress_bar": False}


# ============================================================================ child
def _read(name: str):
    import anndata as ad

    adata = ad.read_h5ad(DATA / name)
    adata.obs_names_make_unique()
    return adata


def _data(experiment: str, batch_key: str):
    """Reference + query of one experiment, concatenated (DESIGN workflow)."""
    import labeltransfer as lt

    if experiment == "transfer":
        cells = _read("cellbench_3cl.h5ad")
        ref, query = cells[cells.obs.batch == "CEL-seq2"], cells[cells.obs.batch == "Drop-seq"]
    else:
        cells = _read("kang_ifnb_small.h5ad")
        ref, query = cells[cells.obs.batch == "ctrl"], cells[cells.obs.batch == "stim"]
        if experiment == "novel":
            ref = ref[ref.obs[TRUE_KEY] != HELD_OUT]
    return lt.data.concat_reference_query(
        ref.copy(), query.copy(), labels_key=TRUE_KEY, batch_key=batch_key
    )


def _novel_metrics(query, truth) -> dict[str, Any]:
    import numpy as np
    from sklearn.metrics import roc_auc_score

    import labeltransfer as lt

    novel = truth == HELD_OUT
    conf = query.obs[f"{KEY}_confidence"].to_numpy()
    groups = lt.tl.discover_novel(query, key=KEY)
    call = query.obs[KEY].astype(str).to_numpy()
    grouped = np.char.startswith(call.astype(str), "novel_")
    return {
        "median_confidence_novel": float(np.median(conf[novel])),
        "median_confidence_seen": float(np.median(conf[~novel])),
        "novel_auroc": float(roc_auc_score(novel, 1 - conf)),
        "novel_below_0.5": float(np.mean(conf[novel] < 0.5)),
        "seen_below_0.5": float(np.mean(conf[~novel] < 0.5)),
        "n_novel_groups": len(groups),
        "novel_recall": float(grouped[novel].mean()),
        "novel_precision": float(novel[grouped].mean()) if grouped.any() else float("nan"),
        "seen_accuracy": float(
            np.mean(query.obs[f"{KEY}_prediction"].astype(str).to_numpy()[~novel] == truth[~novel])
        ),
    }


def _marker_metrics(model, cells: dict[str, Any]) -> dict[str, Any]:
    """Ranks of the known markers among the top genes of each type, per set of cells."""
    import labeltransfer as lt

    record: dict[str, Any] = {}
    for name, adata in cells.items():
        table = lt.tl.marker_genes(model, adata, groupby=TRUE_KEY, n_top=MARKER_TOP)
        for cell_type, genes in KNOWN_MARKERS.items():
            ranked = table.loc[table["group"] == cell_type, "gene"].tolist()
            for gene in genes:
                rank = ranked.index(gene) + 1 if gene in ranked else None
                record[f"{name}_rank_{gene}"] = rank
            record[f"{name}_top_{cell_type}"] = " ".join(ranked)
    return record


def _child(config: dict[str, Any]) -> None:
    warnings.simplefilter("ignore")
    import logging

    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("labeltransfer").setLevel(logging.ERROR)
    import numpy as np
    import scvi
    import torch

    import labeltransfer as lt
    from labeltransfer.metrics._report import REPORT_SCALARS

    experiment, variant, seed = config["experiment"], config["variant"], config["seed"]
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    scvi.settings.seed = seed
    record: dict[str, Any] = {**config, "load_1min_start": os.getloadavg()[0]}
    sw = Stopwatch()
    batch_key = "sample" if experiment == "multidomain" else "batch"
    with sw("data"):
        adata = _data(experiment, batch_key)
    with sw("setup"):
        lt.SCNYM.setup_anndata(
            adata, labels_key=TRUE_KEY, unlabeled_category="Unknown", batch_key=batch_key
        )
        model = lt.SCNYM(adata, new_identity_discovery=experiment == "novel")
    timer = epoch_timer()
    with sw("train"):
        model.train(callbacks=[timer], plan_kwargs=ABLATIONS[variant], **CPU)
    with sw("annotate"):
        model.annotate(key_added=KEY)
    query = adata[adata.obs["lt_role"] == "query"].copy()
    query.obs[TRUE_KEY] = query.obs[f"{TRUE_KEY}_original"].astype(str)
    truth = query.obs[TRUE_KEY].to_numpy()
    summary = model.training_summary_
    record.update(
        n_reference=int((adata.obs["lt_role"] == "reference").sum()),
        n_query=int(query.n_obs),
        n_genes=int(adata.n_vars),
        domains=" ".join(model.domains_),
        epochs=len(timer.epochs),
        s_per_epoch=timer.mean,
        best_epoch=summary.get("best_epoch"),
    )
    if experiment == "novel":
        record.update(_novel_metrics(query, truth))
    else:
        report = lt.metrics.annotation_report(query, TRUE_KEY, KEY)
        record.update({name: float(report[name]) for name in REPORT_SCALARS})
    if experiment == "transfer":
        singlet = (query.obs["demuxlet_cls"] == "SNG").to_numpy()
        pred = query.obs[f"{KEY}_prediction"].astype(str).to_numpy()
        record["singlet_accuracy"] = float(np.mean(pred[singlet] == truth[singlet]))
        record["n_doublets"] = int((~singlet).sum())
        record["doublet_errors"] = int(np.sum(pred[~singlet] != truth[~singlet]))
    if experiment == "markers":
        with sw("markers"):
            reference = adata[adata.obs["lt_role"] == "reference"].copy()
            record.update(_marker_metrics(model, {"reference": reference, "query": query}))
    record.update({f"{name}_s": value for name, value in sw.seconds.items()})
    record["load_1min_end"] = os.getloadavg()[0]
    record["peak_rss_mb"] = peak_rss_mb()
    emit(record)


# ============================================================================ parent
def _configs(seeds: list[int]) -> list[dict[str, Any]]:
    configs = []
    for seed in seeds:
        configs += [{"experiment": "ablation", "variant": v, "seed": seed} for v in ABLATIONS]
        configs += [
            {"experiment": e, "variant": "full", "seed": seed}
            for e in ("transfer", "novel", "multidomain")
        ]
    configs.append({"experiment": "markers", "variant": "full", "seed": seeds[0]})
    return configs


def _rank(value) -> str:
    return f">{MARKER_TOP}" if value != value or value is None else str(int(value))


def _markdown(frame) -> str:
    first = frame.iloc[0]
    out = [
        "# lt.SCNYM benchmark",
        "",
        f"Machine: {first['machine']}. Torch threads per run: {first['threads']}.",
        f"Uptime at start: `{first['uptime_start']}`; at end: `{first['uptime_end']}`.",
        f"labeltransfer source SHA-1 at start {first['source_start']}, at end "
        f"{first['source_end']}. Total {first['total_s'] / 60:.1f} min.",
        "Values are mean ± sd over the seeds (sample sd). Written by `benchmarks/scnym.py`.",
        "",
        "## 1. Kang ctrl -> stim: the full model and its ablations",
        "",
        seed_table(
            frame[frame.experiment == "ablation"],
            [
                "raw_accuracy",
                "macro_f1",
                "ece",
                "overconfidence_error",
                "rejection_rate",
                "epochs",
                "best_epoch",
                "s_per_epoch",
                "train_s",
                "peak_rss_mb",
            ],
            ["variant"],
        ),
        "",
        "## 2. CellBench CEL-seq2 -> Drop-seq",
        "",
        seed_table(
            frame[frame.experiment == "transfer"],
            [
                "raw_accuracy",
                "singlet_accuracy",
                "doublet_errors",
                "n_doublets",
                "rejection_rate",
                "effective_accuracy",
                "train_s",
                "peak_rss_mb",
            ],
            ["experiment"],
        ),
        "",
        f"## 3. New type: {HELD_OUT} held out of the Kang reference (new identity discovery)",
        "",
        seed_table(
            frame[frame.experiment == "novel"],
            [
                "median_confidence_novel",
                "median_confidence_seen",
                "novel_auroc",
                "novel_below_0.5",
                "seen_below_0.5",
                "n_novel_groups",
                "novel_recall",
                "novel_precision",
                "seen_accuracy",
            ],
            ["experiment"],
        ),
        "",
        "## 4. Multi-domain: the two Kang donors as separate domains",
        "",
        seed_table(
            frame[frame.experiment == "multidomain"],
            ["raw_accuracy", "ece", "rejection_rate", "epochs", "train_s"],
            ["domains"],
        ),
        "",
        f"## 5. Integrated-gradient markers on Kang (top {MARKER_TOP} per true type)",
        "",
        "| cells | type | known marker: rank | top genes |",
        "|---|---|---|---|",
    ]
    markers = frame[frame.experiment == "markers"]
    for name in ("reference", "query") if len(markers) else ():
        row = markers.iloc[0]
        for cell_type, genes in KNOWN_MARKERS.items():
            ranks = ", ".join(f"{g}: {_rank(row[f'{name}_rank_{g}'])}" for g in genes)
            out.append(f"| {name} | {cell_type} | {ranks} | {row[f'{name}_top_{cell_type}']} |")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="seed 0 only -> scnym_quick.*")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the seeds (default 0 1 2)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads in each run")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite the markdown")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(json.loads(args.child))
        return

    import pandas as pd

    out = RESULTS / ("scnym_quick.csv" if args.quick else "scnym.csv")
    if args.markdown_only:
        out.with_suffix(".md").write_text(_markdown(pd.read_csv(out)))
        return
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    configs = [{**c, "threads": args.threads} for c in _configs(seeds)]
    frame, failed = run_suite(
        __file__, configs, source=SOURCE, timeout=args.timeout, hidden="_top_"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, index=False, float_format="%.5g")
    text = _markdown(frame)
    out.with_suffix(".md").write_text(text)
    print(text)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
