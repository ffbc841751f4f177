"""Benchmark lt.CellPredX: RNA -> ATAC ablations, RNA -> RNA next to JIND and scNym, novel types.

Experiments (each configuration and seed runs in its own subprocess, so its peak resident
memory, ``VmHWM`` read at the end of the child, is its own):

1. ``ablation``/synthetic: ``lt.data.synthetic_multiome`` (2000 RNA + 2000 ATAC cells,
   unpaired, 500 protein-coding hg38 genes with their real loci, 2000 background peaks, a
   simulation), an RNA reference and an ATAC query through ``CellPredX.setup_mudata``: the
   gene activity is built from the peaks and the RNA ``var['interval']``. The full model
   (preset ``rna_atac_unmatched``) and the ablation of each loss (its weight set to 0):
   ``no_pr``, ``no_cl``, ``no_fa``, ``no_sc``, and ``ce_only``.
2. ``transfer``: RNA -> RNA on Kang et al. PBMC (reference ``batch == "ctrl"``, query
   ``"stim"``) and CellBench (CEL-seq2 -> Drop-seq): CellPredX (preset ``rna_rna``), JIND
   (train, then ``align(query)``) and scNym, each with its defaults.
3. ``novel``: one type held out of the reference: the synthetic ATAC task with one
   ATAC-only type (``n_novel=1``) and Kang without B cells. AUROC of ``1 - confidence`` for
   held-out vs seen cells (``lt.metrics.novel_auroc``) and OSCR (``lt.metrics.oscr``).

Defaults of each model (CellPredX: the preset's iteration budget, early stopping on the sparse
center loss), ``accelerator="cpu"`` and ``scvi.settings.seed = seed``.

Usage::

    python benchmarks/cellpredx.py --threads 1          # seeds 0, 1, 2 -> results/cellpredx.*
    python benchmarks/cellpredx.py --quick --threads 1  # seed 0 -> results/cellpredx_quick.*
    python benchmarks/cellpredx.py --markdown-only      # rewrite the markdown from the CSV
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
KEY = "pred"
TRUE_KEY = "cell_type"
ABLATIONS = {
    "full": {},
    "no_pr": {"pr_weight": 0.0},
    "no_cl": {"cl_weight": 0.0},
    "no_fa": {"fa_weight": 0.0},
    "no_sc": {"sc_weight": 0.0},
    "ce_only": {"pr_weight": 0.0, "cl_weight": 0.0, "fa_weight": 0.0, "sc_weight": 0.0},
}
HELD_OUT_KANG = "B cells"
CPU = {"accelerator": "cpu", "enable_progress_bar": False}


# ============================================================================ child
def _read(name: str):
    import anndata as ad

    adata = ad.read_h5ad(DATA / name)
    adata.obs_names_make_unique()
    return adata


def _synthetic(seed: int, n_novel: int = 0):
    import labeltransfer as lt

    return lt.data.synthetic_multiome(
        n_cells=2000,
        n_genes=500,
        n_background_peaks=2000,
        paired=False,
        n_novel=n_novel,
        seed=seed,
        genome_table=DATA / "hs_genes_hg38.tsv.gz",
    )


def _rna_pair(dataset: str, *, hold_out: str | None = None):
    cells = _read("kang_ifnb_small.h5ad" if dataset == "kang" else "cellbench_3cl.h5ad")
    ref_batch, query_batch = ("ctrl", "stim") if dataset == "kang" else ("CEL-seq2", "Drop-seq")
    ref = cells[cells.obs.batch == ref_batch].copy()
    query = cells[cells.obs.batch == query_batch].copy()
    if hold_out is not None:
        ref = ref[ref.obs[TRUE_KEY] != hold_out].copy()
    return ref, query


def _scores(truth, pred, confidence, rejected, known=None) -> dict[str, Any]:
    import numpy as np

    import labeltransfer as lt

    truth = np.asarray(truth, dtype=str)
    pred = np.asarray(pred, dtype=str)
    record: dict[str, Any] = {}
    if known is None:
        record.update(
            accuracy=lt.metrics.raw_accuracy(truth, pred),
            macro_f1=lt.metrics.macro_f1(truth, pred),
            rejection_rate=lt.metrics.rejection_rate(rejected),
            effective_accuracy=lt.metrics.effective_accuracy(truth, pred, rejected),
        )
        return record
    novel = ~known
    record.update(
        seen_accuracy=float(np.mean(pred[known] == truth[known])),
        novel_auroc=lt.metrics.novel_auroc(novel, confidence),
        oscr=lt.metrics.oscr(novel, pred == truth, confidence),
        median_confidence_novel=float(np.median(confidence[novel])),
        median_confidence_seen=float(np.median(confidence[known])),
        novel_rejected=float(np.mean(rejected[novel])),
        seen_rejected=float(np.mean(rejected[known])),
    )
    return record


def _run_cellpredx_mudata(seed: int, plan_kwargs: dict, n_novel: int, sw) -> dict[str, Any]:
    import mudata as md
    import numpy as np

    import labeltransfer as lt

    with sw("data"):
        rna, atac = _synthetic(seed, n_novel=n_novel)
        mdata = md.MuData({"rna": rna, "atac": atac})
    with sw("setup"):
        lt.CellPredX.setup_mudata(mdata, labels_key=TRUE_KEY)
        model = lt.CellPredX(mdata)
    timer = epoch_timer()
    with sw("train"):
        model.train(callbacks=[timer], plan_kwargs=plan_kwargs, **CPU)
    with sw("annotate"):
        model.annotate(mdata, key_added=KEY)
    obs = mdata["atac"].obs
    truth = atac.obs[TRUE_KEY].astype(str).to_numpy()
    known = None if n_novel == 0 else ~atac.obs["novel"].to_numpy()
    summary = model.training_summary_
    return {
        "dataset": "synthetic RNA->ATAC (unpaired)",
        "model": "CellPredX",
        "n_reference": int(model.mudata_setup_["n_reference"]),
        "n_query": int(model.mudata_setup_["n_query"]),
        "n_genes": len(model.mudata_setup_["genes"]),
        "epochs": len(timer.epochs),
        "s_per_epoch": timer.mean,
        "best_epoch": summary.get("best_epoch"),
        **_scores(
            truth,
            obs[f"{KEY}_prediction"].astype(str).to_numpy(),
            obs[f"{KEY}_confidence"].to_numpy(dtype=float),
            np.asarray(obs[f"{KEY}_rejected"], dtype=bool),
            known,
        ),
    }


def _run_rna(model_name: str, dataset: str, sw, hold_out: str | None = None) -> dict[str, Any]:
    import numpy as np

    import labeltransfer as lt

    with sw("data"):
        ref, query = _rna_pair(dataset, hold_out=hold_out)
    timer = epoch_timer()
    if model_name == "JIND":
        with sw("setup"):
            lt.JIND.setup_anndata(ref, labels_key=TRUE_KEY)
            model = lt.JIND(ref)
        with sw("train"):
            model.train(callbacks=[timer], **CPU)
            model.align(query, **CPU)
        with sw("annotate"):
            model.annotate(query, key_added=KEY)
        out = query
    else:
        cls = lt.CellPredX if model_name == "CellPredX" else lt.SCNYM
        with sw("setup"):
            adata = lt.data.concat_reference_query(ref, query, labels_key=TRUE_KEY)
            cls.setup_anndata(adata, labels_key=TRUE_KEY)
            model = cls(adata)
        with sw("train"):
            model.train(callbacks=[timer], **CPU)
        with sw("annotate"):
            model.annotate(key_added=KEY)
        out = adata[adata.obs["lt_role"] == "query"].copy()
    truth = query.obs[TRUE_KEY].astype(str).to_numpy()
    known = None if hold_out is None else truth != hold_out
    summary = model.training_summary_
    return {
        "dataset": {"kang": "Kang ctrl->stim", "cellbench": "CellBench CEL-seq2->Drop-seq"}[
            dataset
        ],
        "model": model_name,
        "n_reference": int(ref.n_obs),
        "n_query": int(query.n_obs),
        "n_genes": int(ref.n_vars),
        "epochs": len(timer.epochs),
        "s_per_epoch": timer.mean,
        "best_epoch": summary.get("best_epoch"),
        **_scores(
            truth,
            out.obs[f"{KEY}_prediction"].astype(str).to_numpy(),
            out.obs[f"{KEY}_confidence"].to_numpy(dtype=float),
            np.asarray(out.obs[f"{KEY}_rejected"], dtype=bool),
            known,
        ),
    }


def _child(config: dict[str, Any]) -> None:
    warnings.simplefilter("ignore")
    import logging

    for name in ("lightning", "lightning.pytorch", "labeltransfer", "scvi"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import scvi
    import torch

    experiment, variant, seed = config["experiment"], config["variant"], config["seed"]
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    scvi.settings.seed = seed
    record: dict[str, Any] = {**config, "load_1min_start": os.getloadavg()[0]}
    sw = Stopwatch()
    if experiment == "ablation":
        record.update(_run_cellpredx_mudata(seed, ABLATIONS[variant], 0, sw))
    elif experiment == "transfer":
        model_name, dataset = variant.split("/")
        record.update(_run_rna(model_name, dataset, sw))
    elif experiment == "novel":
        if variant == "synthetic":
            record.update(_run_cellpredx_mudata(seed, {}, 1, sw))
        else:
            record.update(_run_rna("CellPredX", "kang", sw, hold_out=HELD_OUT_KANG))
    else:
        raise ValueError(f"unknown experiment {experiment!r}")
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
            {"experiment": "transfer", "variant": f"{m}/{d}", "seed": seed}
            for d in ("kang", "cellbench")
            for m in ("CellPredX", "JIND", "SCNYM")
        ]
        configs += [
            {"experiment": "novel", "variant": v, "seed": seed} for v in ("synthetic", "kang")
        ]
    return configs


def _markdown(frame) -> str:
    first = frame.iloc[0]
    return (
        "\n".join(
            [
                "# lt.CellPredX benchmark",
                "",
                f"Machine: {first['machine']}. Torch threads per run: {first['threads']}.",
                f"Uptime at start: `{first['uptime_start']}`; at end: `{first['uptime_end']}`.",
                f"labeltransfer source SHA-1 at start {first['source_start']}, at end "
                f"{first['source_end']}. Total {first['total_s'] / 60:.1f} min.",
                "Values are mean ± sd over the seeds (sample sd). Written by "
                "`benchmarks/cellpredx.py`. The synthetic multiome data are a simulation "
                "(`lt.data.synthetic_multiome`), not real chromatin data.",
                "",
                "## 1. Synthetic unpaired RNA -> ATAC through setup_mudata: each loss's ablation",
                "",
                "Accuracy is the argmax call on the ATAC cells; rejection is CellPredX's "
                "default (confidence < 0.95).",
                "",
                seed_table(
                    frame[frame.experiment == "ablation"],
                    [
                        "accuracy",
                        "macro_f1",
                        "rejection_rate",
                        "effective_accuracy",
                        "epochs",
                        "best_epoch",
                        "train_s",
                        "peak_rss_mb",
                    ],
                    ["variant"],
                ),
                "",
                "## 2. RNA -> RNA next to JIND and scNym (defaults)",
                "",
                seed_table(
                    frame[frame.experiment == "transfer"],
                    [
                        "accuracy",
                        "macro_f1",
                        "rejection_rate",
                        "effective_accuracy",
                        "epochs",
                        "train_s",
                        "peak_rss_mb",
                    ],
                    ["dataset", "model"],
                ),
                "",
                "## 3. Novel types: one type held out of the reference",
                "",
                f"Synthetic: one ATAC-only type (`n_novel=1`); Kang: {HELD_OUT_KANG} removed "
                "from the ctrl reference.",
                "",
                seed_table(
                    frame[frame.experiment == "novel"],
                    [
                        "novel_auroc",
                        "oscr",
                        "seen_accuracy",
                        "median_confidence_novel",
                        "median_confidence_seen",
                        "novel_rejected",
                        "seen_rejected",
                    ],
                    ["dataset"],
                ),
            ]
        )
        + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="seed 0 only -> cellpredx_quick.*")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the seeds (default 0 1 2)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads in each run")
    parser.add_argument(
        "--experiments",
        nargs="+",
        choices=("ablation", "transfer", "novel"),
        help="run only these experiments -> cellpredx_<experiments>.{csv,md}",
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite the markdown")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(json.loads(args.child))
        return

    import pandas as pd

    name = "cellpredx" + ("_" + "_".join(args.experiments) if args.experiments else "")
    out = RESULTS / (f"{name}_quick.csv" if args.quick else f"{name}.csv")
    if args.markdown_only:
        out.with_suffix(".md").write_text(_markdown(pd.read_csv(out)))
        return
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    configs = [
        {**c, "threads": args.threads}
        for c in _configs(seeds)
        if not args.experiments or c["experiment"] in args.experiments
    ]
    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else None
    frame, failed = run_suite(__file__, configs, source=SOURCE, timeout=args.timeout, env=env)
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, index=False, float_format="%.5g")
    text = _markdown(frame)
    out.with_suffix(".md").write_text(text)
    print(text)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
