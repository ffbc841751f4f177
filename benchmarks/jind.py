"""Benchmark lt.JIND: accuracy, rejection, calibration, time and peak memory on CPU.

Experiments (each configuration and seed runs in its own subprocess, so its peak resident
memory, ``VmHWM`` read at the end of the child, is its own):

1. ``shift``/kang: Kang et al. PBMC, reference = ``batch == "ctrl"``, query = ``"stim"``; JIND
   without alignment, with ``model.align(query)``, and JIND+ (``align`` then
   ``self_train``).
2. ``shift``/cellbench: CellBench, reference = CEL-seq2, query = Drop-seq; without and with
   alignment.
3. ``noshift``: a random 30% of the Kang ctrl cells (or of the CellBench CEL-seq2 cells) as
   query, the other 70% as reference; the rejection rate at theta = 0.05 should lie in
   0.02-0.10 since the query comes from the reference's distribution.
4. ``scale``: ``lt.data.synthetic`` with 70,000 reference and 30,000 query cells, 2,000 genes,
   10 types; 5 training epochs (seconds per epoch), annotation of the 30,000 query cells
   (cells per second); once without alignment and once with ``align(max_epochs=2)``. Seed 0.

Everything uses default JIND settings (except the epochs of the scale case),
``accelerator="cpu"`` and ``scvi.settings.seed = seed``; metrics come from
``lt.metrics.annotation_report(query, "cell_type", "jind")``.

Usage::

    python benchmarks/jind.py            # seeds 0, 1, 2 and the 100k case -> results/jind.{csv,md}
    python benchmarks/jind.py --quick    # seed 0, no 100k case -> results/jind_quick.{csv,md}
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
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
    epoch_timer,
    machine_info,
    mean_sd,
    peak_rss_mb,
    rss_mb,
    run_child,
    source_fingerprint,
    uptime,
)

DATA = ROOT.parent / "shared" / "data"
SOURCE = ROOT / "src" / "labeltransfer"
RESULTS = ROOT / "benchmarks" / "results"
KEY = "jind"
TRUE_KEY = "cell_type"
DATASETS = {
    # name: (file, reference batch, query batch)
    "kang": ("kang_ifnb_small.h5ad", "ctrl", "stim"),
    "cellbench": ("cellbench_3cl.h5ad", "CEL-seq2", "Drop-seq"),
}
SCALE = {"n_reference": 70_000, "n_query": 30_000, "n_genes": 2000, "n_types": 10}
SCALE_TRAIN_EPOCHS = 5
SCALE_ALIGN_EPOCHS = 2
NOSHIFT_QUERY_FRACTION = 0.3
THETA = 0.05
CPU = {"accelerator": "cpu", "enable_progress_bar": False}


# ============================================================================ child
def _load(dataset: str, experiment: str, seed: int):
    import anndata as ad
    import numpy as np

    file, ref_batch, query_batch = DATASETS[dataset]
    adata = ad.read_h5ad(DATA / file)
    adata.obs_names_make_unique()
    batch = adata.obs["batch"].astype(str).to_numpy()
    if experiment == "shift":
        return adata[batch == ref_batch].copy(), adata[batch == query_batch].copy()
    # no batch shift: a random 30% of the reference batch is the query
    cells = np.flatnonzero(batch == ref_batch)
    rng = np.random.default_rng(seed)
    is_query = np.zeros(cells.size, dtype=bool)
    is_query[rng.choice(cells.size, round(NOSHIFT_QUERY_FRACTION * cells.size), replace=False)] = (
        True
    )
    return adata[cells[~is_query]].copy(), adata[cells[is_query]].copy()


def _child(config: dict[str, Any]) -> None:
    warnings.simplefilter("ignore")
    import logging

    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    import numpy as np
    import scvi
    import torch

    import labeltransfer as lt
    from labeltransfer.metrics._report import REPORT_SCALARS

    experiment, dataset, mode, seed = (
        config[k] for k in ("experiment", "dataset", "mode", "seed")
    )
    record: dict[str, Any] = dict(config)
    record["rss_after_import_mb"] = rss_mb("VmRSS")
    record["load_1min_start"] = os.getloadavg()[0]
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    scvi.settings.seed = seed
    sw = Stopwatch()

    with sw("data"):
        if experiment == "scale":
            reference, query = lt.data.synthetic(**SCALE, seed=seed)
        else:
            reference, query = _load(dataset, experiment, seed)
    record.update(
        n_reference=int(reference.n_obs),
        n_query=int(query.n_obs),
        n_genes=int(reference.n_vars),
        n_types=int(reference.obs[TRUE_KEY].nunique()),
        torch_threads=torch.get_num_threads(),
    )

    train_kwargs: dict[str, Any] = dict(CPU)
    align_kwargs: dict[str, Any] = dict(CPU)
    if experiment == "scale":
        train_kwargs["max_epochs"] = SCALE_TRAIN_EPOCHS
        align_kwargs["max_epochs"] = SCALE_ALIGN_EPOCHS

    with sw("setup"):
        lt.JIND.setup_anndata(reference, labels_key=TRUE_KEY)
        model = lt.JIND(reference)
    train_timer = epoch_timer()
    with sw("train"):
        model.train(callbacks=[train_timer], **train_kwargs)
    summary = model.training_summary_
    record.update(
        n_features=int(len(model.module.feature_idx)),
        train_epochs=len(train_timer.epochs),
        train_s_per_epoch=train_timer.mean,
        best_epoch=summary.get("best_epoch"),
        best_validation_accuracy=summary.get("best_validation_accuracy"),
        n_validation=summary.get("n_validation"),
        temperature=float(model.calibration_["temperature"]),
    )
    if mode in ("align", "jind+"):
        align_timer = epoch_timer()
        with sw("align"):
            model.align(query, callbacks=[align_timer], **align_kwargs)
        record.update(
            align_epochs=len(align_timer.epochs),
            align_s_per_epoch=align_timer.mean,
        )
    if mode == "jind+":
        with sw("self_train"):
            model.self_train(query, **CPU)
        record["n_confident"] = model.self_training_["n_confident"]
    with sw("annotate"):
        model.annotate(query, key_added=KEY)
    if query.uns[KEY].get("aligned") != (mode in ("align", "jind+")):
        raise RuntimeError(f"uns[{KEY!r}]['aligned'] is {query.uns[KEY].get('aligned')}")

    # diagnostics of the rejection rule: thresholds and saturated (== 1.0) confidences
    thresholds = np.asarray(model.rejection_["thresholds"], dtype=float)
    record.update(
        threshold_min=float(thresholds.min()),
        threshold_max=float(thresholds.max()),
        validation_conf_eq_1=float(np.mean(model.validation_["confidence"] >= 1.0)),
        query_conf_eq_1=float(np.mean(query.obs[f"{KEY}_confidence"].to_numpy() >= 1.0)),
    )
    report = lt.metrics.annotation_report(query, TRUE_KEY, KEY)
    record.update({name: float(report[name]) for name in REPORT_SCALARS})
    record.update({f"{name}_s": value for name, value in sw.seconds.items()})
    record.update({f"{name}_cpu_s": value for name, value in sw.cpu_seconds.items()})
    record["load_1min_end"] = os.getloadavg()[0]
    record["annotate_cells_per_s"] = query.n_obs / sw.seconds["annotate"]
    record["peak_rss_mb"] = peak_rss_mb()
    emit(record)


# ============================================================================ parent
def _configs(seeds: list[int], scale: bool) -> list[dict[str, Any]]:
    configs = []
    for seed in seeds:
        for mode in ("none", "align", "jind+"):
            configs.append({"experiment": "shift", "dataset": "kang", "mode": mode, "seed": seed})
        for mode in ("none", "align"):
            configs.append(
                {"experiment": "shift", "dataset": "cellbench", "mode": mode, "seed": seed}
            )
        for dataset in ("kang", "cellbench"):
            configs.append(
                {"experiment": "noshift", "dataset": dataset, "mode": "none", "seed": seed}
            )
    if scale:
        for mode in ("none", "align"):
            configs.append(
                {"experiment": "scale", "dataset": "synthetic", "mode": mode, "seed": 0}
            )
    return configs


def _label(row: dict[str, Any]) -> str:
    if row["experiment"] == "shift":
        a, b = DATASETS[row["dataset"]][1:]
        return f"{row['dataset']} {a} → {b}"
    if row["experiment"] == "noshift":
        return f"{row['dataset']} {DATASETS[row['dataset']][1]} 70/30"
    return "synthetic 70k + 30k"


MODE_NAMES = {
    "none": "JIND, no alignment",
    "align": "JIND + align",
    "jind+": "JIND+ (align + self-train)",
}


def _groups(frame, experiment: str):
    sub = frame[frame["experiment"] == experiment]
    order = {"none": 0, "align": 1, "jind+": 2}
    keys = sorted(
        {(r["dataset"], r["mode"]) for _, r in sub.iterrows()},
        key=lambda k: (list(DATASETS).index(k[0]) if k[0] in DATASETS else 9, order[k[1]]),
    )
    for dataset, mode in keys:
        yield dataset, mode, sub[(sub["dataset"] == dataset) & (sub["mode"] == mode)]


def _col(group, name: str, digits: int = 3) -> str:
    if name not in group:
        return "n/a"
    return mean_sd(group[name].tolist(), digits)


def _load_avg(group) -> str:
    """1-minute load average when the runs started (min-max over seeds)."""
    if "load_1min_start" not in group:
        return "n/a"
    lo, hi = group["load_1min_start"].min(), group["load_1min_start"].max()
    lo_s, hi_s = f"{lo:.1f}", f"{hi:.1f}"
    return lo_s if lo_s == hi_s else f"{lo_s}-{hi_s}"


def _cpu_use(group) -> str:
    """CPU seconds per wall second of the timed calls (train, align, self-train, annotate)."""
    names = [n for n in ("train", "align", "self_train", "annotate") if f"{n}_cpu_s" in group]
    if not names:
        return "n/a"
    cpu = group[[f"{n}_cpu_s" for n in names]].fillna(0).sum(axis=1)
    wall = group[[f"{n}_s" for n in names]].fillna(0).sum(axis=1)
    ratio = cpu / wall
    lo, hi = ratio.min(), ratio.max()
    lo_s, hi_s = f"{lo:.2f}", f"{hi:.2f}"
    return lo_s if lo_s == hi_s else f"{lo_s}-{hi_s}"


def _spread(frame) -> str:
    """Sentence on the spread of the Kang training time (the same work in every Kang run)."""
    kang = frame[(frame["experiment"] == "shift") & (frame["dataset"] == "kang")]
    if len(kang) < 2:
        return "identical runs can differ several-fold."
    lo, hi = kang["train_s"].min(), kang["train_s"].max()
    return (
        f"in this run the same Kang training (30 epochs, {len(kang)} runs) took {lo:.1f} to "
        f"{hi:.1f} s ({hi / lo:.1f}x)."
    )


def _checks(frame) -> list[str]:
    """Automatic checks: rejection without shift in 0.02-0.10, alignment not hurting."""
    notes = []
    noshift = frame[frame["experiment"] == "noshift"]
    outside = noshift[(noshift["rejection_rate"] < 0.02) | (noshift["rejection_rate"] > 0.10)]
    for _, r in outside.iterrows():
        note = (
            f"- No shift, {r['dataset']} seed {r['seed']}: rejection {r['rejection_rate']:.3f} "
            f"is outside 0.02-0.10 (temperature {r['temperature']:.3f}, thresholds "
            f"{r['threshold_min']:.4f}-{r['threshold_max']:.4f}, "
            f"{r['validation_conf_eq_1']:.0%} of held-out and {r['query_conf_eq_1']:.0%} of query "
            "confidences exactly 1.0"
        )
        if r["threshold_min"] >= 1.0:
            note += (
                "): the confidences saturate at 1.0, so the theta-quantile thresholds are 1.0 "
                "and `confidence < threshold` can only reject the few unsaturated cells."
            )
        else:
            note += ")."
        notes.append(note)
    shift = frame[frame["experiment"] == "shift"]
    for dataset in shift["dataset"].unique():
        d = shift[shift["dataset"] == dataset]
        base = d[d["mode"] == "none"].set_index("seed")["raw_accuracy"]
        aligned = d[d["mode"] == "align"].set_index("seed")["raw_accuracy"]
        worse = [seed for seed in aligned.index if seed in base and aligned[seed] < base[seed]]
        if worse:
            pairs = ", ".join(
                f"seed {seed}: {base[seed]:.3f} → {aligned[seed]:.3f}" for seed in worse
            )
            notes.append(f"- {dataset}: alignment lowered the raw accuracy ({pairs}).")
    if not notes:
        return []
    return ["## Automatic checks", "", *notes, ""]


def _source_line(source: dict[str, Any]) -> str:
    start, end = source.get("source_sha1_start"), source.get("source_sha1_end")
    if not isinstance(start, str):
        return "- labeltransfer source: not recorded."
    line = (
        f"- labeltransfer source (`src/labeltransfer/**/*.py`): sha1 `{start}`, newest file "
        f"modified {source.get('source_newest_mtime_end')}."
    )
    if end != start:
        line += (
            f" **The source changed during the run** (sha1 `{start}` → `{end}`): if the change "
            "touched code JIND uses, the runs mix two versions of it."
        )
    return line


def _markdown(frame, info, meta: dict[str, Any], failures: list[dict[str, Any]]) -> str:
    seeds = sorted(frame["seed"].unique().tolist()) if len(frame) else meta["seeds"]
    threads = (
        ", ".join(map(str, sorted(frame["torch_threads"].unique().tolist())))
        if len(frame)
        else "n/a"
    )
    lines = [
        "# JIND benchmark (CPU)",
        "",
        f"Generated by `python benchmarks/jind.py{' --quick' if meta['quick'] else ''}`; "
        f"per-run values in `{meta['csv']}`.",
        "",
        f"- Machine: {describe_machine(info)}.",
        f"- labeltransfer {info.get('labeltransfer')}, numpy {info.get('numpy')}, "
        f"scipy {info.get('scipy')}, anndata {info.get('anndata')}.",
        f"- torch threads in each run: {threads} "
        f"({'set with `--threads`' if meta.get('threads') else 'torch default'}).",
        f"- Load at start: `{meta['uptime_start']}`",
        f"- Load at end: `{meta['uptime_end']}`",
        f"- Total runtime: {meta['total_s'] / 60:.1f} min for {meta['n_runs']} runs "
        f"({meta['n_failed']} failed).",
        _source_line(meta.get("source") or {}),
        "",
        "**Timings are noisy.** This is a shared 2-core machine on which other engineers run "
        "tests at the same time (see the load averages: a load above 2 means the benchmark "
        f"competed for the cores); {_spread(frame)} With torch's default of 2 intra-op threads "
        "the contention is pathological: on 2026-11-21 the same CellBench 70/30 training "
        "(30 epochs) took 0.9 s on a quiet machine, 22 s with 2 threads next to one busy "
        "process, and 1.3 s with 1 thread next to the same process. Compare accuracies freely, "
        "but quote timings only from a quiet machine or a single-threaded run. ",
        "Each configuration and seed ran in a fresh subprocess; peak RSS is `VmHWM` at the end "
        "of that process (interpreter, torch, data and model included). `load` is the 1-minute "
        "load average when the runs started (min-max over seeds) and `CPU/wall` the process CPU "
        "seconds per wall second over the timed calls (train, align, self-train, annotate): "
        f"close to {threads} (the torch threads) when they had the cores to themselves, lower "
        "when they waited for a CPU (spin-waiting threads also burn CPU, so it is only a hint).",
        "",
        f"Values are mean ± sd over seeds {', '.join(map(str, seeds))} (`scvi.settings.seed`); "
        "default JIND settings (30 epochs, 5,000 HVGs or all genes when fewer, theta 0.05, "
        'calibrated confidences), `accelerator="cpu"`. Accuracies are on the query against '
        "its true `cell_type`: raw accuracy before rejection, rejection rate, effective accuracy "
        "on the cells kept, macro-F1 of the raw prediction, ECE (10 bins) of the confidence.",
        "",
    ]
    if (frame["experiment"] == "shift").any():
        lines += [
            "## 1-2. Batch shift: Kang ctrl → stim, CellBench CEL-seq2 → Drop-seq",
            "",
            "| task | method | ref / query cells | raw acc | rejection | eff. acc | macro-F1 | ECE "
            "| train s | align s (epochs) | self-train s | annotate s | peak RSS MB "
            "| load | CPU/wall |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for _dataset, mode, g in _groups(frame, "shift"):
            r = g.iloc[0]
            align = "–"
            if mode != "none":
                align = f"{_col(g, 'align_s', 1)} ({int(r['align_epochs'])})"
            lines.append(
                f"| {_label(r)} | {MODE_NAMES[mode]} | {int(r['n_reference'])} / "
                f"{int(r['n_query'])} | {_col(g, 'raw_accuracy')} | {_col(g, 'rejection_rate')} "
                f"| {_col(g, 'effective_accuracy')} | {_col(g, 'macro_f1')} | {_col(g, 'ece')} "
                f"| {_col(g, 'train_s', 1)} | {align} | "
                f"{_col(g, 'self_train_s', 1) if mode == 'jind+' else '–'} "
                f"| {_col(g, 'annotate_s', 2)} | {_col(g, 'peak_rss_mb', 0)} "
                f"| {_load_avg(g)} | {_cpu_use(g)} |"
            )
        lines.append("")
    if (frame["experiment"] == "noshift").any():
        lines += [
            "## 3. No batch shift: random 70% reference / 30% query of one batch",
            "",
            f"Rejection at theta = {THETA} should lie in 0.02-0.10 (the thresholds reject about "
            f"{THETA:.0%} of held-out reference cells per type).",
            "",
            "| task | ref / query cells | rejection (per seed) | in 0.02-0.10 | raw acc | eff. acc "
            "| macro-F1 | ECE | temperature | thresholds min-max | query conf. = 1 "
            "| train s | peak RSS MB | load | CPU/wall |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for _dataset, _mode, g in _groups(frame, "noshift"):
            r = g.iloc[0]
            inside = int(((g["rejection_rate"] >= 0.02) & (g["rejection_rate"] <= 0.10)).sum())
            per_seed = ", ".join(f"{v:.3f}" for v in g["rejection_rate"])
            lines.append(
                f"| {_label(r)} | {int(r['n_reference'])} / {int(r['n_query'])} "
                f"| {_col(g, 'rejection_rate')} ({per_seed}) | {inside}/{len(g)} seeds "
                f"| {_col(g, 'raw_accuracy')} | {_col(g, 'effective_accuracy')} "
                f"| {_col(g, 'macro_f1')} | {_col(g, 'ece')} | {_col(g, 'temperature', 2)} "
                f"| {g['threshold_min'].min():.3f}-{g['threshold_max'].max():.3f} "
                f"| {_col(g, 'query_conf_eq_1', 2)} | {_col(g, 'train_s', 1)} "
                f"| {_col(g, 'peak_rss_mb', 0)} | {_load_avg(g)} | {_cpu_use(g)} |"
            )
        lines.append("")
    if (frame["experiment"] == "scale").any():
        lines += [
            "## 4. Scale: synthetic 70,000 reference + 30,000 query cells, 2,000 genes, 10 types",
            "",
            f"Seed 0 only; {SCALE_TRAIN_EPOCHS} training epochs, alignment with "
            f"`max_epochs={SCALE_ALIGN_EPOCHS}`. A training epoch includes its validation pass; "
            "peak RSS includes the simulated reference and query held in memory.",
            "",
            "| method | simulate s | setup s | train s | train s/epoch | align s/epoch "
            "| annotate s | annotate cells/s | raw acc | rejection | peak RSS MB | load "
            "| CPU/wall |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for _dataset, mode, g in _groups(frame, "scale"):
            r = g.iloc[0]
            align = "–" if mode == "none" else f"{r['align_s_per_epoch']:.1f}"
            lines.append(
                f"| {MODE_NAMES[mode]} | {r['data_s']:.1f} | {r['setup_s']:.1f} "
                f"| {r['train_s']:.1f} | {r['train_s_per_epoch']:.1f} | {align} "
                f"| {r['annotate_s']:.2f} | {r['annotate_cells_per_s']:,.0f} "
                f"| {r['raw_accuracy']:.3f} | {r['rejection_rate']:.3f} | {r['peak_rss_mb']:.0f} "
                f"| {_load_avg(g)} | {_cpu_use(g)} |"
            )
        lines.append("")
    lines += _checks(frame)
    if failures:
        lines += ["## Failed runs", ""]
        for f in failures:
            lines += [
                f"- {f['experiment']} / {f['dataset']} / {f['mode']} / seed {f['seed']}:",
                "",
                "```",
                f["error"].strip(),
                "```",
                "",
            ]
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="seed 0 only, no 100k case; writes jind_quick.*"
    )
    parser.add_argument("--seeds", type=int, nargs="+", help="override the seeds (default 0 1 2)")
    parser.add_argument("--out", type=Path, help="CSV path (the markdown goes beside it)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    parser.add_argument(
        "--threads", type=int, help="torch.set_num_threads in each run (default: torch's choice)"
    )
    parser.add_argument(
        "--markdown-only",
        action="store_true",
        help="rewrite the markdown from the existing CSV without running anything",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(json.loads(args.child))
        return

    import pandas as pd

    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    out = args.out or RESULTS / ("jind_quick.csv" if args.quick else "jind.csv")
    if args.markdown_only:
        print(_write_markdown(out))
        return
    configs = _configs(seeds, scale=not args.quick)
    if args.threads:
        configs = [{**c, "threads": args.threads} for c in configs]
    start_uptime = uptime()
    source_start = source_fingerprint(SOURCE)
    print(f"start: {start_uptime}; labeltransfer source {source_start}", flush=True)
    t0 = time.perf_counter()
    rows, failures = [], []
    for i, config in enumerate(configs, 1):
        records, error, wall = run_child(
            [__file__, "--child", json.dumps(config)], timeout=args.timeout
        )
        tag = f"[{i}/{len(configs)}] {config['experiment']} {config['dataset']} {config['mode']} seed {config['seed']}"
        if error:
            print(f"{tag}: FAILED after {wall:.0f} s\n{error}", flush=True)
            failures.append({**config, "error": error})
            continue
        for record in records:
            record["wall_s"] = wall
            rows.append(record)
            print(
                f"{tag}: raw {record['raw_accuracy']:.3f}, rejection {record['rejection_rate']:.3f}, "
                f"eff {record['effective_accuracy']:.3f}, train {record['train_s']:.1f} s, "
                f"align {record.get('align_s', math.nan):.1f} s, peak {record['peak_rss_mb']:.0f} MB "
                f"({wall:.0f} s wall)",
                flush=True,
            )
    total = time.perf_counter() - t0
    end_uptime = uptime()
    source_end = source_fingerprint(SOURCE)
    print(f"end: {end_uptime}; labeltransfer source {source_end}", flush=True)

    info = machine_info()
    frame = pd.DataFrame(rows)
    if failures:
        frame = pd.concat([frame, pd.DataFrame(failures)], ignore_index=True)
    frame["status"] = (
        frame["error"].isna().map({True: "ok", False: "failed"}) if "error" in frame else "ok"
    )
    for name in INFO_FIELDS:
        frame[name] = info.get("torch_threads" if name == "torch_default_threads" else name)
    frame["run_uptime_start"] = start_uptime
    frame["run_uptime_end"] = end_uptime
    frame["run_total_s"] = total
    frame["run_n_runs"] = len(configs)
    frame["run_threads"] = args.threads
    frame["run_quick"] = args.quick
    frame["source_sha1_start"] = source_start["sha1"]
    frame["source_sha1_end"] = source_end["sha1"]
    frame["source_newest_mtime_end"] = source_end["newest_mtime"]
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, index=False, float_format="%.5g")
    text = _write_markdown(out)
    print()
    print(text)
    print(f"written: {out} and {out.with_suffix('.md')}")
    if failures:
        sys.exit(1)


INFO_FIELDS = (
    "cpu",
    "cores",
    "ram_gib",
    "platform",
    "python",
    "torch",
    "torch_default_threads",
    "cuda",
    "scvi",
    "lightning",
    "numpy",
    "scipy",
    "anndata",
    "labeltransfer",
    "date",
)


def _write_markdown(csv: Path) -> str:
    """Write the markdown beside ``csv`` from the CSV alone (rerun with ``--markdown-only``)."""
    import pandas as pd

    frame = pd.read_csv(csv)
    first = frame.iloc[0]
    info = {name: first.get(name) for name in INFO_FIELDS}
    info["torch_threads"] = info.pop("torch_default_threads")
    info["cuda"] = bool(info["cuda"]) if pd.notna(info["cuda"]) else False
    failed = frame[frame["status"] != "ok"]
    ok = frame[frame["status"] == "ok"]
    threads = first.get("run_threads")
    meta = {
        "quick": bool(first["run_quick"]),
        "seeds": sorted(frame["seed"].unique().tolist()),
        "csv": csv.resolve().relative_to(ROOT) if csv.resolve().is_relative_to(ROOT) else csv,
        "uptime_start": first["run_uptime_start"],
        "uptime_end": first["run_uptime_end"],
        "total_s": float(first["run_total_s"]),
        "n_runs": int(first["run_n_runs"]),
        "n_failed": len(failed),
        "threads": None if pd.isna(threads) else int(threads),
        "source": {
            k: first.get(k)
            for k in ("source_sha1_start", "source_sha1_end", "source_newest_mtime_end")
        },
    }
    text = _markdown(ok, info, meta, failed.to_dict("records"))
    csv.with_suffix(".md").write_text(text)
    return text


if __name__ == "__main__":
    main()
