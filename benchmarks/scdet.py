"""Benchmark lt.SCDET: open-world accuracy (seen / novel / overall) on CPU.

Experiments (each configuration and seed runs in its own subprocess, so its peak resident
memory, ``VmHWM`` read at the end of the child, is its own):

1. ``intra`` (scDET's intra-data protocol) on Kang et al. PBMC and CellBench: the cell types
   are split at random (per seed) into seen (``ceil(n / 2)``) and novel types; a random 50% of
   the cells of seen types is the reference, the other cells (rest of the seen types and all
   novel cells) the target.
2. ``inter``: Kang ctrl -> stim, two randomly chosen types (per seed) removed from the
   reference.
3. ``longtail``: simulated counts (:func:`_longtail`) with 4 seen types of 1500 / 600 / 240 /
   30 cells (50:1), the rarest a subtype of the largest (its markers plus 8 of its own), and
   2 novel types of 250 and 150 cells; half of each seen type is the reference. scDET with
   and without its debiasing (``gamma = alpha = beta = 0``: no logit adjustment, every
   pseudo-label sampled). The minority accuracy is that of the target cells of the rarest
   seen type (``type_3``) and of the rarest novel type.
4. ``estimate``: ``n_novel=None`` on synthetic tasks with 1, 2 and 3 novel types and on the
   long-tail task: the estimated number of novel types against the truth.

Methods: ``scdet`` (``lt.SCDET(adata, n_novel=<true>)``, paper defaults: 500 epochs with the
label-stability early stopping, Adam 1e-4, batch 256), and the baseline ``scnym+kmeans``
(scDET's two-step comparison): ``lt.SCNYM`` with its default 0.5 confidence cut, then
scikit-learn ``KMeans`` with the true number of novel types on the embedding of the rejected
target cells. Metrics: ``lt.metrics.open_world_report`` on the target cells (seen types
must be named right, novel groups are Hungarian-matched to the novel types).

Usage::

    python benchmarks/scdet.py --threads 1            # seeds 0, 1, 2 -> results/scdet.{csv,md}
    python benchmarks/scdet.py --threads 1 --quick    # seed 0 -> results/scdet_quick.{csv,md}
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    Stopwatch,
    describe_machine,
    emit,
    machine_info,
    mean_sd,
    peak_rss_mb,
    run_child,
    source_fingerprint,
    uptime,
)

DATA = ROOT.parent / "shared" / "data"
SOURCE = ROOT / "src" / "labeltransfer"
RESULTS = ROOT / "benchmarks" / "results"
TRUE_KEY = "cell_type"
DATASETS = {"kang": "kang_ifnb_small.h5ad", "cellbench": "cellbench_3cl.h5ad"}
#: Long-tail task: seen types 1500 / 600 / 240 / 30 cells (50:1), the rarest a subtype of the
#: largest (its markers plus ``n_own`` genes of its own, ``own_fold``); novel types 250 / 150.
LONGTAIL = {
    "sizes": (1500, 600, 240, 30, 250, 150),
    "n_genes": 300,
    "n_markers": 20,
    "n_own": 8,
    "own_fold": (4.0, 6.0),
}
#: Epochs of the main training in the n_novel-estimation runs (only the estimate is compared).
ESTIMATE_EPOCHS = 100
#: Tasks of the ``n_novel`` estimate: synthetic ones with 0-3 novel types, the long tail, and
#: the intra-data splits of the real sets (half of the types novel).
ESTIMATE_TASKS = (
    "synthetic_novel0",
    "synthetic_novel1",
    "synthetic_novel2",
    "synthetic_novel3",
    "longtail",
    "kang",
    "cellbench",
)


# ============================================================================ data
def _split_intra(adata, seed: int):
    import numpy as np

    types = sorted(adata.obs[TRUE_KEY].astype(str).unique())
    rng = np.random.default_rng(seed)
    n_seen = math.ceil(len(types) / 2)
    seen = sorted(rng.permutation(types)[:n_seen].tolist())
    labels = adata.obs[TRUE_KEY].astype(str).to_numpy()
    is_seen = np.isin(labels, seen)
    to_ref = is_seen & (rng.random(adata.n_obs) < 0.5)
    return adata[to_ref].copy(), adata[~to_ref].copy(), seen


def _split_inter(adata, seed: int):
    import numpy as np

    batch = adata.obs["batch"].astype(str).to_numpy()
    labels = adata.obs[TRUE_KEY].astype(str).to_numpy()
    types = sorted(set(labels))
    removed = np.random.default_rng(seed).choice(types, 2, replace=False)
    seen = sorted(t for t in types if t not in removed)
    ref = (batch == "ctrl") & np.isin(labels, seen)
    return adata[ref].copy(), adata[batch == "stim"].copy(), seen


def _longtail(seed: int):
    """Reference and target of the long-tail task (see ``LONGTAIL``).

    Gamma-Poisson counts (inverse dispersion 10, log-normal library sizes around 2,000) on a
    log-normal base profile of ``n_genes`` genes. ``type_0``, ``type_1``, ``type_2`` and the
    two novel types raise 20 marker genes each by a fold change drawn in [4, 8]; the minority
    seen type ``type_3`` has the markers of ``type_0`` plus ``n_own`` of its own raised
    [4, 6]-fold, so it is a rare subtype of the majority type: easy to absorb into it. Seen
    types: 1500 / 600 / 240 / 30 cells (50:1), half of each in the reference; novel types
    250 and 150 cells, in the target.
    """
    import numpy as np
    import pandas as pd
    from anndata import AnnData
    from scipy import sparse

    rng = np.random.default_rng(seed)
    names = ["type_0", "type_1", "type_2", "type_3", "novel_a", "novel_b"]
    n_genes, n_markers, n_own = LONGTAIL["n_genes"], LONGTAIL["n_markers"], LONGTAIL["n_own"]
    base = rng.normal(0.0, 1.5, n_genes)
    # markers among the more expressed two thirds of the genes
    pool = rng.permutation(np.argsort(base)[n_genes // 3 :])
    markers = {t: pool[i * n_markers : (i + 1) * n_markers] for i, t in enumerate(names[:3])}
    for i, t in enumerate(names[4:], start=3):
        markers[t] = pool[i * n_markers : (i + 1) * n_markers]
    own = pool[5 * n_markers : 5 * n_markers + n_own]
    blocks, labels = [], []
    for t, size in zip(names, LONGTAIL["sizes"], strict=True):
        log_mean = base.copy()
        up = markers["type_0"] if t == "type_3" else markers[t]
        log_mean[up] += np.log(rng.uniform(4.0, 8.0, up.size))
        if t == "type_3":
            log_mean[own] += np.log(rng.uniform(*LONGTAIL["own_fold"], n_own))
        profile = np.exp(log_mean) / np.exp(log_mean).sum()
        library = 2000.0 * np.exp(rng.normal(0.0, 0.3, size))
        mean = library[:, None] * profile[None, :]
        blocks.append(rng.poisson(rng.gamma(10.0, mean / 10.0)))
        labels += [t] * size
    labels = np.asarray(labels)
    adata = AnnData(
        sparse.csr_matrix(np.vstack(blocks).astype(np.float32)),
        obs=pd.DataFrame({TRUE_KEY: labels}, index=[f"cell_{i}" for i in range(labels.size)]),
    )
    adata.var_names = [f"gene_{i}" for i in range(n_genes)]
    seen = names[:4]
    to_ref = np.zeros(labels.size, dtype=bool)
    for t in seen:
        members = np.flatnonzero(labels == t)
        to_ref[rng.choice(members, members.size // 2, replace=False)] = True
    target = adata[~to_ref]
    return adata[to_ref].copy(), target[rng.permutation(target.n_obs)].copy(), seen


def _balanced(seed: int, n_novel: int):
    import labeltransfer as lt

    ref, query = lt.data.synthetic(
        n_reference=800,
        n_query=800,
        n_genes=500,
        n_types=4,
        n_novel=n_novel,
        batch_shift=0.3,
        seed=seed,
    )
    return ref, query, [f"type_{i}" for i in range(4)]


def _load(config: dict[str, Any]):
    import anndata as ad

    experiment, dataset, seed = config["experiment"], config["dataset"], config["seed"]
    if dataset == "longtail":
        return _longtail(seed)
    if dataset.startswith("synthetic_novel"):
        return _balanced(seed, int(dataset.removeprefix("synthetic_novel")))
    adata = ad.read_h5ad(DATA / DATASETS[dataset])
    adata.obs_names_make_unique()
    if experiment == "inter":
        return _split_inter(adata, seed)
    return _split_intra(adata, seed)


# ============================================================================ child
def _child(config: dict[str, Any]) -> None:
    warnings.simplefilter("ignore")
    import logging

    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    import numpy as np
    import scvi
    import torch

    import labeltransfer as lt

    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    seed, method = config["seed"], config["method"]
    scvi.settings.seed = seed
    record: dict[str, Any] = dict(config)
    record["load_1min_start"] = os.getloadavg()[0]
    sw = Stopwatch()
    with sw("data"):
        ref, target, seen = _load(config)
        ref.obs[TRUE_KEY] = ref.obs[TRUE_KEY].astype(str)
        target.obs[TRUE_KEY] = target.obs[TRUE_KEY].astype(str)
        adata = lt.data.concat_reference_query(ref, target, labels_key=TRUE_KEY)
    truth = target.obs[TRUE_KEY].to_numpy()
    novel_types = sorted(set(truth) - set(seen))
    record.update(
        n_reference=int(ref.n_obs),
        n_target=int(target.n_obs),
        n_genes=int(adata.n_vars),
        seen_types=";".join(seen),
        novel_types=";".join(novel_types),
        n_novel_true=len(novel_types),
        torch_threads=torch.get_num_threads(),
    )
    common = {"accelerator": "cpu", "enable_progress_bar": False}
    is_target = (adata.obs["lt_role"] == "query").to_numpy()
    with sw("train"):
        if method == "scnym+kmeans":
            lt.SCNYM.setup_anndata(adata, labels_key=TRUE_KEY)
            model = lt.SCNYM(adata)
            model.train(**common)
        else:
            lt.SCDET.setup_anndata(adata, labels_key=TRUE_KEY)
            n_novel = None if method == "scdet_auto" else len(novel_types)
            model = lt.SCDET(adata, n_novel=n_novel)
            kwargs: dict[str, Any] = dict(common)
            if method == "scdet_nodebias":
                kwargs["plan_kwargs"] = {"gamma": 0.0, "alpha": 0.0, "beta": 0.0}
            if method == "scdet_auto":
                kwargs["max_epochs"] = ESTIMATE_EPOCHS
            model.train(**kwargs)
    with sw("annotate"):
        out = model.annotate(copy=True)
    pred = out.obs[model._default_key].astype(str).to_numpy()[is_target]
    if method == "scnym+kmeans":
        from sklearn.cluster import KMeans

        rejected = np.flatnonzero(pred == "Unassigned")
        record["n_rejected"] = int(rejected.size)
        if rejected.size >= len(novel_types) > 0:
            z = out.obsm[f"X_{model._default_key}"][is_target][rejected]
            groups = KMeans(len(novel_types), n_init=10, random_state=seed).fit_predict(z)
            pred[rejected] = [f"novel_{g}" for g in groups]
    report = lt.metrics.open_world_report(truth, pred, seen)
    record.update({k: report[k] for k in ("seen_accuracy", "novel_accuracy", "overall_accuracy")})
    record["n_novel_clusters"] = report["n_novel_clusters"]
    # per-type accuracy with the report's matching (seen by name, novel groups Hungarian)
    target_of = {**{s: s for s in seen}, **report["mapping"]}
    hit = np.array([target_of.get(p, "") == t for p, t in zip(pred, truth, strict=True)])
    sizes = {t: int((truth == t).sum()) for t in set(truth)}
    rare_seen = min(seen, key=lambda t: (sizes.get(t, 0), t))
    record["rarest_seen_type"] = rare_seen
    record["rarest_seen_accuracy"] = float(hit[truth == rare_seen].mean())
    if novel_types:
        rare_novel = min(novel_types, key=lambda t: (sizes[t], t))
        record["rarest_novel_type"] = rare_novel
        record["rarest_novel_accuracy"] = float(hit[truth == rare_novel].mean())
    if method.startswith("scdet"):
        summary = model.training_summary_
        record.update(
            n_novel_model=int(model.module.n_novel),
            epochs_trained=summary.get("epochs_trained"),
            early_stopped=summary.get("early_stopped"),
        )
        if model.n_novel_estimate_ is not None:
            record["n_novel_estimated"] = int(model.n_novel_estimate_["n_novel"])
            for key in ("n_unexplained", "n_grouped", "n_seen_part"):
                record[key] = int(model.n_novel_estimate_.get(key, 0))
    record.update(
        train_s=sw.seconds["train"],
        annotate_s=sw.seconds["annotate"],
        train_cpu_s=sw.cpu_seconds["train"],
        peak_rss_mb=peak_rss_mb(),
    )
    emit(record)


# ============================================================================ parent
def _configs(seeds: list[int]) -> list[dict[str, Any]]:
    configs = []
    for seed in seeds:
        for experiment, dataset in (("intra", "kang"), ("intra", "cellbench"), ("inter", "kang")):
            for method in ("scdet", "scnym+kmeans"):
                configs.append(
                    {"experiment": experiment, "dataset": dataset, "method": method, "seed": seed}
                )
        for method in ("scdet", "scdet_nodebias"):
            configs.append(
                {"experiment": "longtail", "dataset": "longtail", "method": method, "seed": seed}
            )
        for dataset in ESTIMATE_TASKS:
            configs.append(
                {
                    "experiment": "estimate",
                    "dataset": dataset,
                    "method": "scdet_auto",
                    "seed": seed,
                }
            )
    return configs


METHOD_NAMES = {
    "scdet": "scDET (n_novel given)",
    "scnym+kmeans": "scNym 0.5 cut + k-means",
    "scdet_nodebias": "scDET without logit adjustment + sampling",
    "scdet_auto": "scDET, n_novel estimated",
}


def _table(frame, experiment: str, columns: list[tuple[str, str]]) -> list[str]:
    sub = frame[(frame["experiment"] == experiment) & (frame["status"] == "ok")]
    header = "| task | method | seeds | " + " | ".join(c[1] for c in columns) + " |"
    lines = [header, "|" + "---|" * (3 + len(columns))]
    for (dataset, method), g in sub.groupby(["dataset", "method"], sort=False):
        cells = [mean_sd(g[c].tolist(), 3) if c in g else "n/a" for c, _ in columns]
        lines.append(
            f"| {dataset} | {METHOD_NAMES.get(method, method)} | {len(g)} | "
            + " | ".join(cells)
            + " |"
        )
    return [*lines, ""]


def _write_markdown(csv: Path) -> str:
    import pandas as pd

    frame = pd.read_csv(csv)
    if "status" not in frame:
        frame["status"] = "ok"
    first = frame.iloc[0]
    accuracy = [
        ("seen_accuracy", "seen acc"),
        ("novel_accuracy", "novel acc"),
        ("overall_accuracy", "overall acc"),
        ("n_novel_clusters", "novel groups"),
        ("epochs_trained", "epochs"),
        ("train_s", "train s"),
    ]
    lines = [
        "# scDET benchmark (CPU)",
        "",
        f"Generated by `python benchmarks/scdet.py{' --quick' if first.get('run_quick') else ''}"
        f"{' --threads ' + str(int(first['run_threads'])) if pd.notna(first.get('run_threads')) else ''}`; "
        f"per-run values in `{csv.name}`.",
        "",
        f"- Machine: {first.get('machine', 'n/a')}.",
        f"- Load at start: `{first.get('run_uptime_start')}`; at end: `{first.get('run_uptime_end')}`.",
        f"- Total runtime {float(first.get('run_total_s', float('nan'))) / 60:.1f} min; "
        f"labeltransfer source sha1 `{first.get('source_sha1_start')}` → "
        f"`{first.get('source_sha1_end')}`.",
        "",
        "Values are mean ± sd over seeds (one value: a single seed). Accuracies are on the "
        "target cells with `lt.metrics.open_world_report`: seen types must be named right, "
        "novel groups are Hungarian-matched to the novel types; *overall* counts every target "
        "cell. Timings come from a shared 2-core machine and are indicative only.",
        "",
        "## 1. Intra-data (half of the types novel, 50% of the seen cells as reference)",
        "",
        *_table(frame, "intra", accuracy),
        "## 2. Inter-data: Kang ctrl → stim, two types removed from the reference",
        "",
        *_table(frame, "inter", accuracy),
        "## 3. Long tail: 50:1 among the seen types, the rarest a subtype of the largest",
        "",
        *_table(
            frame,
            "longtail",
            [
                *accuracy[:3],
                ("rarest_seen_accuracy", "rarest seen type acc"),
                ("rarest_novel_accuracy", "rarest novel type acc"),
                ("epochs_trained", "epochs"),
            ],
        ),
        "## 4. Estimated number of novel types (`n_novel=None`)",
        "",
        f"Main training shortened to {ESTIMATE_EPOCHS} epochs: only the estimate is compared.",
        "",
        "*Unexplained*: target cells no seen type explains in the warm-up embedding; "
        "*grouped*: those clustered (most of their nearest target cells unexplained); "
        "*seen part*: grouped cells dropped as an outlying part of a seen type.",
        "",
    ]
    est = frame[(frame["experiment"] == "estimate") & (frame["status"] == "ok")]
    for synthetic in (True, False):
        rows = est[est["dataset"].str.startswith(("synthetic", "longtail")) == synthetic]
        if rows.empty:
            continue
        error = (rows["n_novel_estimated"] - rows["n_novel_true"]).abs()
        lines += [
            f"**{'Synthetic' if synthetic else 'Real (intra-data split)'} tasks: exact in "
            f"{int((error == 0).sum())} of {len(rows)} runs, within ±1 in "
            f"{int((error <= 1).sum())} of {len(rows)}.**",
            "",
            "| task | seed | true n_novel | estimated | unexplained | grouped | seen part "
            "| seen acc | novel acc |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for _, r in rows.iterrows():
            lines.append(
                f"| {r['dataset']} | {int(r['seed'])} | {int(r['n_novel_true'])} | "
                f"{int(r['n_novel_estimated'])} | {int(r['n_unexplained'])} | "
                f"{int(r.get('n_grouped', 0))} | {int(r.get('n_seen_part', 0))} | "
                f"{r['seen_accuracy']:.3f} | {r['novel_accuracy']:.3f} |"
            )
        lines.append("")
    failed = frame[frame["status"] != "ok"]
    if len(failed):
        lines += ["", "## Failed runs", ""]
        for _, r in failed.iterrows():
            lines.append(f"- {r['experiment']} {r['dataset']} {r['method']} seed {r['seed']}")
    text = "\n".join(lines) + "\n"
    csv.with_suffix(".md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="seed 0 only; writes scdet_quick.*")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the seeds (default 0 1 2)")
    parser.add_argument("--out", type=Path, help="CSV path (the markdown goes beside it)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads in each run")
    parser.add_argument("--jobs", type=int, default=1, help="runs at the same time")
    parser.add_argument(
        "--only", nargs="+", help="experiments to run (intra, inter, longtail, estimate)"
    )
    parser.add_argument("--methods", nargs="+", help="methods to run (default: all)")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite the markdown")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(json.loads(args.child))
        return

    import pandas as pd

    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    out = args.out or RESULTS / ("scdet_quick.csv" if args.quick else "scdet.csv")
    if args.markdown_only:
        print(_write_markdown(out))
        return
    configs = _configs(seeds)
    if args.only:
        configs = [c for c in configs if c["experiment"] in args.only]
    if args.methods:
        configs = [c for c in configs if c["method"] in args.methods]
    if args.threads:
        configs = [{**c, "threads": args.threads} for c in configs]
    start_uptime, source_start = uptime(), source_fingerprint(SOURCE)
    print(f"start: {start_uptime}; labeltransfer source {source_start}", flush=True)
    t0 = time.perf_counter()
    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else None

    def run(config):
        records, error, wall = run_child(
            [__file__, "--child", json.dumps(config)], timeout=args.timeout, env=env
        )
        tag = (
            f"{config['experiment']} {config['dataset']} {config['method']} seed {config['seed']}"
        )
        if error:
            print(f"{tag}: FAILED after {wall:.0f} s\n{error}", flush=True)
            return [{**config, "error": error, "status": "failed"}]
        for record in records:
            record["wall_s"] = wall
            record["status"] = "ok"
            scores = ", ".join(
                f"{name} {float('nan') if record[f'{name}_accuracy'] is None else record[f'{name}_accuracy']:.3f}"
                for name in ("seen", "novel", "overall")
            )
            print(f"{tag}: {scores} ({wall:.0f} s)", flush=True)
        return records

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = [r for records in pool.map(run, configs) for r in records]
    total = time.perf_counter() - t0
    frame = pd.DataFrame(rows)
    info = machine_info()
    frame["machine"] = describe_machine(info)
    frame["run_uptime_start"] = start_uptime
    frame["run_uptime_end"] = uptime()
    frame["run_total_s"] = total
    frame["run_threads"] = args.threads
    frame["run_quick"] = args.quick
    frame["source_sha1_start"] = source_start["sha1"]
    frame["source_sha1_end"] = source_fingerprint(SOURCE)["sha1"]
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, index=False, float_format="%.5g")
    print(_write_markdown(out))
    print(f"written: {out} and {out.with_suffix('.md')}")
    if (frame["status"] != "ok").any():
        sys.exit(1)


if __name__ == "__main__":
    main()
