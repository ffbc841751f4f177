"""Benchmark lt.SCNYM against the original scNym (the ``scnym`` package, calico/scnym) on CPU.

Both implementations see the same split and run on the same machine in one run:

- Kang et al. PBMC: reference = ``batch == "ctrl"``, query = ``"stim"``;
- CellBench: reference = CEL-seq2, query = Drop-seq (accuracy also on the demuxlet singlets,
  ``obs["demuxlet_cls"] == "SNG"``).

The query labels never reach training: they are removed from the query before it is joined to
the reference and only used to score the predictions.

- **Original** (``scnym`` from PyPI, in its own virtual environment, ``--orig-python``): its
  documented high-level API with its defaults, ``scnym.api.scnym_api(adata, task="train",
  groupby=..., out_path=..., config="no_new_identity")`` then ``task="predict"`` on the joined
  reference + query AnnData; input log(CPM + 1) (``sc.pp.normalize_total(target_sum=1e6)``,
  ``sc.pp.log1p``) and query cells labelled ``"Unlabeled"``. Seeds: ``random.seed``,
  ``np.random.seed`` and ``torch.manual_seed`` (its splits use the global NumPy generator).
  Epochs are the ``val_epoch`` rows of its training log; training steps per epoch are
  ``len(train_idx) // batch_size`` (its labelled loader drops the last partial batch and the
  query loader is repeated).
- **labeltransfer**: ``lt.data.concat_reference_query`` + ``lt.SCNYM.setup_anndata`` +
  ``lt.SCNYM(adata)`` + ``model.train(enable_progress_bar=False)`` with its defaults (plus a
  timing callback, ``_common.epoch_timer``) + ``model.annotate()``; the prediction is
  ``obs["scnym_prediction"]`` (before rejection) of the query cells. Seed:
  ``scvi.settings.seed``. Epochs from ``model.history``; training steps per epoch from
  ``model.trainer.num_training_batches``.

Each configuration (implementation x data set x seed) runs in a fresh subprocess with its own
interpreter; peak RSS is ``VmHWM`` at the end of that child. Every child uses
``torch.set_num_threads(1)``, ``OMP_NUM_THREADS=1`` and ``NUMBA_NUM_THREADS=1`` (the
development machine has 2 shared cores; see ``THREAD_ENV`` for why numba matters). The
configurations are interleaved (ours, original, ours, original, ...) so that load drift
affects both. On CellBench the original fails with its default batch size (see ``_configs``);
that failure is recorded once and the original then runs with ``batch_size=128``.

Compatibility shim (only in the original's child, nothing in site-packages is edited):
``scnym.dataprep`` does ``from torchvision import transforms`` at import, only to build its
augmentation pipelines with ``transforms.Compose``. No torchvision wheel matches the local CPU
build of torch (the PyPI wheel is a CUDA build whose ``_C.so`` needs ``libc10_cuda.so``), so
when ``import torchvision`` fails a stub module providing an equivalent ``Compose`` (apply the
transforms in order) is put in ``sys.modules`` first.

Usage::

    python benchmarks/scnym_original.py                 # seeds 0, 1, 2, both data sets
    python benchmarks/scnym_original.py --quick         # seed 0, Kang only
    python benchmarks/scnym_original.py --markdown-only # re-render the markdown from the csv

Set up the original's environment first (see ``results/scnym_original.md``)::

    python -m venv /tmp/scnym_orig
    /tmp/scnym_orig/bin/pip install torch==2.13.0
    /tmp/scnym_orig/bin/pip install -c <(echo torch==2.13.0) numpy==2.4.6 pandas==2.3.3 \\
        scipy==1.17.1 scikit-learn==1.9.1 scanpy==1.11.5 anndata==0.12.19 h5py==3.16.0 \\
        numba==0.68.1 tqdm==4.70.1 tensorboard==2.21.0 configargparse pyyaml requests
    /tmp/scnym_orig/bin/pip install --no-deps scnym==0.3.2
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
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
    run_child,
    source_fingerprint,
    uptime,
)

DATA = ROOT.parent / "shared" / "data"
SOURCE = ROOT / "src" / "labeltransfer"
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_ORIG_PYTHON = "/tmp/scnym_orig/bin/python"
TRUE_KEY = "cell_type"
ORIG_GROUPBY = "scnym_label"  # the original's label column: reference types + "Unlabeled"
DATASETS = {
    # name: (file, reference batch, query batch)
    "kang": ("kang_ifnb_small.h5ad", "ctrl", "stim"),
    "cellbench": ("cellbench_3cl.h5ad", "CEL-seq2", "Drop-seq"),
}
IMPLEMENTATIONS = ("labeltransfer", "original")
# the original's batch size where its default (256) leaves its labelled loader empty
ORIG_BATCH_OVERRIDE = {"cellbench": 128}
IMPL_NAMES = {"labeltransfer": "labeltransfer `lt.SCNYM`", "original": "original `scnym`"}
# one thread everywhere. NUMBA_NUM_THREADS matters: scanpy's numba kernels (normalize_total)
# run on numba's OpenMP layer with one thread per core (OMP_NUM_THREADS does not limit it), and
# its idle workers keep spinning afterwards; on the 2-core machine that made the next torch
# training 10x slower (the original's Kang training: 200 s instead of 20 s)
THREAD_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "NUMBA_NUM_THREADS": "1",
}
ORIG_VERSIONS = ("scnym", "torch", "numpy", "scipy", "pandas", "scanpy", "anndata", "scikit-learn")
CHILD_TIMEOUT_S = 1800


# ============================================================================ child: common
def _load(dataset: str):
    """Reference, query (its ``cell_type`` removed) and the query's true labels and SNG mask."""
    import anndata as ad
    import numpy as np

    file, ref_batch, query_batch = DATASETS[dataset]
    adata = ad.read_h5ad(DATA / file)
    adata.obs_names_make_unique()
    batch = adata.obs["batch"].astype(str).to_numpy()
    reference = adata[batch == ref_batch].copy()
    query = adata[batch == query_batch].copy()
    truth = query.obs[TRUE_KEY].astype(str).to_numpy()
    singlet = (
        (query.obs["demuxlet_cls"].astype(str) == "SNG").to_numpy()
        if "demuxlet_cls" in query.obs
        else np.zeros(query.n_obs, dtype=bool)
    )
    del query.obs[TRUE_KEY]  # the query labels are only used for scoring
    return reference, query, truth, singlet


def _score(record: dict[str, Any], prediction, truth, singlet) -> None:
    import numpy as np
    from sklearn.metrics import f1_score

    prediction = np.asarray(prediction, dtype=str)
    record["raw_accuracy"] = float(np.mean(prediction == truth))
    record["macro_f1"] = float(
        f1_score(truth, prediction, labels=sorted(set(truth)), average="macro", zero_division=0)
    )
    record["n_errors"] = int(np.sum(prediction != truth))
    record["n_singlets"] = int(singlet.sum())
    record["n_errors_singlets"] = int(np.sum((prediction != truth) & singlet))
    record["singlet_accuracy"] = (
        float(np.mean(prediction[singlet] == truth[singlet])) if singlet.any() else None
    )


def _versions(names) -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _finish(record: dict[str, Any], sw: Stopwatch) -> None:
    record.update({f"{name}_s": value for name, value in sw.seconds.items()})
    record.update({f"{name}_cpu_s": value for name, value in sw.cpu_seconds.items()})
    record["s_per_epoch"] = record["train_s"] / record["epochs"]
    record["s_per_step"] = record["train_s"] / (record["epochs"] * record["steps_per_epoch"])
    record["ms_per_1k_cells"] = (
        1e6 * record["train_s"] / (record["epochs"] * record["cells_per_epoch"])
    )
    record["load_1min_end"] = os.getloadavg()[0]
    record["peak_rss_mb"] = peak_rss_mb()
    emit(record)


# ============================================================================ child: ours
def _cell_counter():
    """A Lightning callback counting the cells of the training minibatches (``.cells``).

    A batch of lt.SCNYM is a ``(reference, query)`` pair of scvi minibatches (dicts with the
    expression under ``"X"``); the reference and the query cells are both counted.
    """
    import lightning.pytorch as pl

    class CellCounter(pl.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.cells = 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            parts = batch if isinstance(batch, tuple | list) else [batch]
            self.cells += sum(int(part["X"].shape[0]) for part in parts if part is not None)

    return CellCounter()


def _child_labeltransfer(config: dict[str, Any]) -> None:
    warnings.simplefilter("ignore")
    import logging

    for name in ("lightning", "lightning.pytorch", "scvi"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import numpy as np
    import scvi
    import torch

    import labeltransfer as lt

    torch.set_num_threads(1)
    record: dict[str, Any] = dict(config)
    record["load_1min_start"] = os.getloadavg()[0]
    record["torch_threads"] = torch.get_num_threads()
    record["versions"] = _versions(("labeltransfer", "scvi-tools", "lightning", *ORIG_VERSIONS))
    sw = Stopwatch()
    with sw("data"):
        reference, query, truth, singlet = _load(config["dataset"])
    scvi.settings.seed = config["seed"]
    with sw("prep"):
        adata = lt.data.concat_reference_query(
            reference, query, labels_key=TRUE_KEY, batch_key="batch"
        )
        lt.SCNYM.setup_anndata(
            adata, labels_key=TRUE_KEY, unlabeled_category="Unknown", batch_key="batch"
        )
        model = lt.SCNYM(adata)
    timer, cells = epoch_timer(), _cell_counter()
    with sw("train"):
        model.train(enable_progress_bar=False, callbacks=[timer, cells])
    with sw("predict"):
        model.annotate()
    history = model.history
    summary = model.training_summary_
    record.update(
        n_reference=int(reference.n_obs),
        n_query=int(query.n_obs),
        n_genes=int(reference.n_vars),
        n_train=int(summary.get("n_train", -1)),
        epochs=len(history["train_loss"]),
        epochs_summary=int(summary["epochs_trained"]),
        epochs_timer=len(timer.epochs),
        timer_s_per_epoch=timer.mean,
        steps_per_epoch=int(model.trainer.num_training_batches),
        cells_per_epoch=cells.cells / max(len(timer.epochs), 1),
        best_epoch=summary.get("best_epoch"),
        max_epochs=summary.get("max_epochs"),
        early_stopped=bool(summary.get("early_stopped")),
    )
    is_query = (adata.obs["lt_role"] == "query").to_numpy()
    if not np.array_equal(adata.obs_names[is_query], query.obs_names):
        raise RuntimeError("query cells are not in their original order after concatenation")
    _score(record, adata.obs["scnym_prediction"].to_numpy()[is_query], truth, singlet)
    _finish(record, sw)


# ============================================================================ child: original
def _torchvision_shim() -> bool:
    """Put a ``torchvision.transforms.Compose`` stub in ``sys.modules`` if torchvision fails.

    ``scnym.dataprep`` imports ``torchvision.transforms`` only for ``Compose`` (its augmentation
    pipelines). Returns True when the stub was installed.
    """
    try:
        import torchvision
    except Exception:  # noqa: BLE001 - missing, or a build that does not match torch
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
    else:
        return False
    import types

    class Compose:
        """``torchvision.transforms.Compose``: apply the transforms in order."""

        def __init__(self, transforms) -> None:
            self.transforms = list(transforms)

        def __call__(self, x):
            for transform in self.transforms:
                x = transform(x)
            return x

    torchvision = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    transforms.Compose = Compose
    torchvision.transforms = transforms
    sys.modules["torchvision"] = torchvision
    sys.modules["torchvision.transforms"] = transforms
    return True


def _child_original(config: dict[str, Any]) -> None:
    warnings.simplefilter("ignore")
    import random
    import tempfile

    import torch

    torch.set_num_threads(1)
    # benchmarks/ is on sys.path (the script's folder) and holds scnym.py, the benchmark of
    # lt.SCNYM, which would shadow the `scnym` package: import the package from site-packages
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != here]
    shimmed = _torchvision_shim()
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scanpy as sc
    from scnym.api import CONFIGS, UNLABELED_TOKEN, scnym_api

    # its documented configuration; only `batch_size` may be changed (CellBench, see below)
    orig_config: str | dict[str, Any] = "no_new_identity"
    settings = CONFIGS["no_new_identity"]
    if config.get("batch_size"):
        settings = copy.deepcopy(settings)
        settings["batch_size"] = int(config["batch_size"])
        orig_config = settings

    record: dict[str, Any] = dict(config)
    record["load_1min_start"] = os.getloadavg()[0]
    record["torch_threads"] = torch.get_num_threads()
    record["versions"] = _versions(ORIG_VERSIONS)
    record["torchvision_shim"] = shimmed
    sw = Stopwatch()
    with sw("data"):
        reference, query, truth, singlet = _load(config["dataset"])
    seed = config["seed"]
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - the original draws its splits from it
    torch.manual_seed(seed)
    log = io.StringIO()  # the original prints per-epoch progress; keep it out of the output
    with tempfile.TemporaryDirectory(prefix="scnym_orig_") as out_path:
        try:
            with sw("prep"):
                labels = np.r_[
                    reference.obs[TRUE_KEY].astype(str).to_numpy(dtype=object),
                    np.full(query.n_obs, UNLABELED_TOKEN, dtype=object),
                ]
                adata = ad.concat([reference, query], join="inner", merge="same")
                adata.obs[ORIG_GROUPBY] = pd.Categorical(labels)
                sc.pp.normalize_total(adata, target_sum=1e6)
                sc.pp.log1p(adata)
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                with sw("train"):
                    scnym_api(
                        adata=adata,
                        task="train",
                        groupby=ORIG_GROUPBY,
                        out_path=out_path,
                        config=orig_config,
                    )
                with sw("predict"):
                    scnym_api(
                        adata=adata,
                        task="predict",
                        trained_model=out_path,
                        out_path=out_path,
                        config=orig_config,
                        key_added="scNym",
                    )
        except Exception:
            sys.stderr.write(log.getvalue()[-3000:])
            raise
        rows = [
            line.rstrip().split(",")
            for line in (Path(out_path) / f"{Path(out_path).name}_log.csv")
            .read_text()
            .splitlines()
        ]
        epochs = sum(1 for r in rows if r[-1] == "val_epoch")
        best = [int(r[0]) for r in rows if r[-1] == "best_model_weights"]
        n_train = len(np.atleast_1d(np.loadtxt(Path(out_path) / "train_idx.csv")))
    record.update(
        n_reference=int(reference.n_obs),
        n_query=int(query.n_obs),
        n_genes=int(reference.n_vars),
        n_train=n_train,
        epochs=epochs,
        steps_per_epoch=n_train // settings["batch_size"],
        # every step: a full labelled batch and a full query batch (repeated, drop_last)
        cells_per_epoch=2 * settings["batch_size"] * (n_train // settings["batch_size"]),
        best_epoch=best[-1] if best else None,
        max_epochs=settings["n_epochs"],
        early_stopped=epochs < settings["n_epochs"],
    )
    is_query = np.r_[np.zeros(reference.n_obs, bool), np.ones(query.n_obs, bool)]
    _score(record, adata.obs["scNym"].astype(str).to_numpy()[is_query], truth, singlet)
    _finish(record, sw)


# ============================================================================ parent
def _configs(seeds: list[int], datasets: list[str]) -> list[dict[str, Any]]:
    """Interleaved: for every seed and data set, ours then the original.

    On CellBench the original's default batch size (256) exceeds its labelled training set
    (81% of 274 reference cells = 221, loaded with ``drop_last=True``), so its first epoch has
    no batch and it fails (``ZeroDivisionError``). That is shown once (first seed); every seed
    then runs it with ``batch_size`` ``ORIG_SMALL_BATCH`` (its only changed setting).
    """
    configs = []
    for i, seed in enumerate(seeds):
        for dataset in datasets:
            configs.append({"impl": "labeltransfer", "dataset": dataset, "seed": seed})
            if dataset in ORIG_BATCH_OVERRIDE:
                if i == 0:
                    configs.append({"impl": "original", "dataset": dataset, "seed": seed})
                configs.append(
                    {
                        "impl": "original",
                        "dataset": dataset,
                        "seed": seed,
                        "batch_size": ORIG_BATCH_OVERRIDE[dataset],
                    }
                )
            else:
                configs.append({"impl": "original", "dataset": dataset, "seed": seed})
    return configs


def _batch(value) -> int | None:
    """The original's batch-size override of a row (None: its default)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return int(value)


def _error_line(error: str) -> str:
    """The last line of a traceback (the exception), for a table cell."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1].replace("|", "/") if lines else "unknown error"


def _impl_name(impl: str, batch_size) -> str:
    batch_size = _batch(batch_size)
    name = IMPL_NAMES[impl]
    if impl == "original":
        name += ", defaults" if batch_size is None else f", `batch_size={batch_size}`"
    return name


def _group_rows(frame):
    """(data set, implementation, batch-size override, rows) in table order."""
    if "batch_size" not in frame:
        frame = frame.assign(batch_size=math.nan)
    # -1 stands for "no override" (NaN in the csv), so that the keys compare and sort
    batch = frame["batch_size"].map(lambda b: _batch(b) or -1).astype(int)
    for dataset in [d for d in DATASETS if d in set(frame["dataset"])]:
        for impl in IMPLEMENTATIONS:
            sub = (frame["dataset"] == dataset) & (frame["impl"] == impl)
            for size in sorted(set(batch[sub].tolist())):
                g = frame[sub & (batch == size)]
                if len(g):
                    yield dataset, impl, None if size == -1 else size, g


def _original_rows(sub):
    """The original's successful runs of one data set: its defaults, else the override."""
    orig = sub[sub["impl"] == "original"]
    if "batch_size" not in orig:
        return orig
    default = orig[orig["batch_size"].map(_batch).isna()]
    return default if len(default) else orig


def _col(group, name: str, digits: int = 3) -> str:
    if name not in group or group[name].isna().all():
        return "–"
    return mean_sd(group[name].tolist(), digits)


def _cpu_use(group) -> str:
    cpu = group["train_cpu_s"] + group["predict_cpu_s"]
    wall = group["train_s"] + group["predict_s"]
    ratio = cpu / wall
    lo, hi = f"{ratio.min():.2f}", f"{ratio.max():.2f}"
    return lo if lo == hi else f"{lo}-{hi}"


def _load_avg(group) -> str:
    lo, hi = f"{group['load_1min_start'].min():.1f}", f"{group['load_1min_start'].max():.1f}"
    return lo if lo == hi else f"{lo}-{hi}"


def _versions_line(frame, impl: str) -> str:
    rows = frame[frame["impl"] == impl]
    if not len(rows) or "versions" not in rows:
        return "n/a"
    versions = rows["versions"].iloc[0]
    if isinstance(versions, str):
        versions = json.loads(versions)
    return ", ".join(f"{k} {v}" for k, v in versions.items() if v)


def _comparison(frame) -> list[str]:
    """Per data set and seed: accuracy difference and per-epoch / per-step time ratios."""
    lines = [
        "| data set | seed | raw acc ours − original | s/epoch ours / original "
        "| s/step ours / original | time per cell ours / original | train s ours / original |",
        "|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for dataset in [d for d in DATASETS if d in set(frame["dataset"])]:
        sub = frame[frame["dataset"] == dataset]
        ours = sub[sub["impl"] == "labeltransfer"].set_index("seed")
        orig = _original_rows(sub).set_index("seed")
        seeds = sorted(set(ours.index) & set(orig.index))
        for seed in seeds:
            o, r = ours.loc[seed], orig.loc[seed]
            lines.append(
                f"| {dataset} | {seed} | {o['raw_accuracy'] - r['raw_accuracy']:+.3f} "
                f"| {o['s_per_epoch'] / r['s_per_epoch']:.2f} "
                f"| {o['s_per_step'] / r['s_per_step']:.2f} "
                f"| {_ratio(o, r, 'ms_per_1k_cells')} "
                f"| {o['train_s'] / r['train_s']:.2f} |"
            )
        if seeds:
            d_acc = ours.loc[seeds, "raw_accuracy"].mean() - orig.loc[seeds, "raw_accuracy"].mean()
            epoch_ratio = (
                ours.loc[seeds, "s_per_epoch"].mean() / orig.loc[seeds, "s_per_epoch"].mean()
            )
            step_ratio = (
                ours.loc[seeds, "s_per_step"].mean() / orig.loc[seeds, "s_per_step"].mean()
            )
            cell_ratio = (
                ours.loc[seeds, "ms_per_1k_cells"].mean()
                / orig.loc[seeds, "ms_per_1k_cells"].mean()
                if "ms_per_1k_cells" in ours and "ms_per_1k_cells" in orig
                else math.nan
            )
            doublets = ""
            if "n_errors_singlets" in sub and (sub["n_singlets"] > 0).any():
                both = sub[sub["status"] == "ok"] if "status" in sub else sub
                if (both["n_errors_singlets"] == 0).all():
                    n_other = int(both["n_query"].iloc[0] - both["n_singlets"].iloc[0])
                    doublets = (
                        f" Every error of both implementations is on one of the {n_other} query "
                        "cells that demuxlet does not call singlets (doublets or ambiguous, whose "
                        "single `cell_type` label is questionable): both are 100% accurate on "
                        "the singlets."
                    )
            verdicts.append(
                f"- **{dataset}** ({len(seeds)} seed{'s' if len(seeds) > 1 else ''}): mean raw "
                f"accuracy labeltransfer {ours.loc[seeds, 'raw_accuracy'].mean():.3f} vs original "
                f"{orig.loc[seeds, 'raw_accuracy'].mean():.3f} ({d_acc:+.3f}, "
                f"{'at least as accurate' if d_acc >= 0 else 'less accurate'}); seconds per "
                f"epoch {ours.loc[seeds, 's_per_epoch'].mean():.3f} vs "
                f"{orig.loc[seeds, 's_per_epoch'].mean():.3f} (ratio {epoch_ratio:.2f}, "
                f"{'faster' if epoch_ratio < 1 else 'slower'} per epoch); seconds per training "
                f"step ratio {step_ratio:.2f}; training time per cell fed to the classifier "
                f"ratio {cell_ratio:.2f} ({'faster' if cell_ratio < 1 else 'slower'} per cell)."
                + doublets
            )
    return [*lines, "", *verdicts]


def _ratio(ours, orig, name: str) -> str:
    try:
        value = float(ours[name]) / float(orig[name])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return "–"
    return "–" if math.isnan(value) else f"{value:.2f}"


def _source_line(meta: dict[str, Any]) -> str:
    start, end = meta.get("source_sha1_start"), meta.get("source_sha1_end")
    if not isinstance(start, str):
        return "- labeltransfer source: not recorded."
    line = (
        f"- labeltransfer source (`src/labeltransfer/**/*.py`): sha1 `{start}`, newest file "
        f"modified {meta.get('source_newest_mtime_end')}."
    )
    if end != start:
        line += (
            f" **The source changed during the run** (sha1 `{start}` → `{end}`): the "
            "labeltransfer runs may mix two versions of the code."
        )
    return line


def _markdown(frame, info: dict[str, Any], meta: dict[str, Any], failures) -> str:
    seeds = sorted(frame["seed"].unique().tolist()) if len(frame) else meta["seeds"]
    flag = " --quick" if meta["quick"] else ""
    lines = [
        "# scNym: labeltransfer vs the original implementation (CPU)",
        "",
        f"Generated by `python benchmarks/scnym_original.py{flag}`; per-run values in "
        f"`{meta['csv']}`.",
        "",
        f"- Machine: {describe_machine(info)}.",
        f"- labeltransfer side (`{meta.get('python_ours')}`): "
        f"{_versions_line(frame, 'labeltransfer')}.",
        f"- Original side (`{meta.get('python_orig')}`): {_versions_line(frame, 'original')}.",
        f"- Load at start: `{meta['uptime_start']}`",
        f"- Load at end: `{meta['uptime_end']}`",
        f"- Total runtime: {meta['total_s'] / 60:.1f} min for {meta['n_runs']} runs "
        f"({meta['n_failed']} failed), interleaved ours / original.",
        _source_line(meta),
        "",
        "## Commands",
        "",
        "```bash",
        f"python benchmarks/scnym_original.py{flag}   # the parent; each run is one child:",
        *meta.get("commands", []),
        "```",
        "",
        "Each child ran with `OMP_NUM_THREADS=1` (also MKL/OpenBLAS), `NUMBA_NUM_THREADS=1` "
        "and `torch.set_num_threads(1)`; peak RSS is `VmHWM` of `/proc/self/status` at the end "
        "of the child (interpreter, torch, data and model included). `NUMBA_NUM_THREADS=1` "
        "is needed for a fair timing: `sc.pp.normalize_total` (the original's input "
        "preparation) runs a numba kernel on numba's OpenMP threading layer, which starts one "
        "thread per core whatever `OMP_NUM_THREADS` says, and its idle worker keeps "
        "spin-waiting; on this 2-core machine that made the following torch training about "
        "10x slower (a first run measured 200 s instead of about 20 s for the original's Kang "
        "training; a probe of `Linear + BatchNorm1d + ReLU` on 512 x 256 went from 1.5 to "
        "60-120 ms per call right after `normalize_total`, and stayed at 1.7 ms with "
        "`NUMBA_NUM_THREADS=1` or `OMP_WAIT_POLICY=PASSIVE`).",
        "",
        "## Setup of the two implementations",
        "",
        "- **Original**: `scnym.api.scnym_api(adata, task='train', groupby='scnym_label', "
        "out_path=tmpdir, config='no_new_identity')`, then `task='predict'` with "
        "`trained_model=tmpdir` on the same AnnData (reference + query joined, "
        "`sc.pp.normalize_total(target_sum=1e6)` + `sc.pp.log1p`, query cells labelled "
        "`'Unlabeled'`). Its defaults: at most 100 epochs, patience 40 on the validation loss "
        "(best weights saved from epoch 5 on), Adadelta lr 1.0, batch 256, MixMatch + domain "
        "adversary; 10% of the reference held out for final evaluation and 10% of the rest "
        "for early stopping, so it trains on 81% of the reference. One epoch is one pass over "
        "the labelled training cells with `drop_last=True` (the query loader is repeated). "
        "Seeds: `random`, `np.random`, `torch.manual_seed`.",
        "- **labeltransfer**: `lt.data.concat_reference_query` → `lt.SCNYM.setup_anndata("
        "labels_key='cell_type', unlabeled_category='Unknown', batch_key='batch')` → "
        "`lt.SCNYM(adata)` → `model.train(enable_progress_bar=False)` → `model.annotate()`; "
        "raw counts in, log(CPM + 1) per minibatch. Its defaults: at most 400 epochs, patience "
        "40 on the validation loss after a 20-epoch warm-up, 90% of the reference for "
        "training. One epoch is one pass over the longer of the reference and query loaders "
        "(the shorter is cycled). Seed: `scvi.settings.seed`.",
        "- Both use all genes, 2 hidden layers of 256, and score the prediction before any "
        "rejection (`obs['scnym_prediction']`, the original's `obs['scNym']`) against the "
        "query's hidden `cell_type`. `s/epoch` = train s / epochs; `steps/epoch` = optimiser "
        "steps per epoch, which differ between the two (see above), hence also `s/step`; "
        "`cells/epoch` = reference + query cells fed to the classifier per epoch (counted "
        "from the minibatches for labeltransfer; 2 x batch size x steps for the original, "
        "whose query loader always yields full batches) and `ms/1k cells` = train s per 1,000 "
        "of them, the like-for-like speed. "
        "`train s` is the wall time of the training call (the original's includes its input "
        "checks, dense conversion, checkpoint writes and final evaluation); `prep s` is the "
        "joining + normalisation (original) or joining + `setup_anndata` + model construction "
        "(labeltransfer); `predict s` annotates all reference + query cells.",
        "- **CellBench and the original's batch size.** The original holds out 10% of the "
        "reference, then 10% of the rest, and loads the remaining labelled cells with "
        "`drop_last=True`: of CellBench's 274 CEL-seq2 cells 221 remain, fewer than its "
        "default batch of 256, so its first epoch has no batch and training stops with "
        "`ZeroDivisionError` in `SemiSupervisedTrainer.train_epoch` (shown once, first seed). "
        "On CellBench it was therefore also run with its configuration changed in that one "
        f"setting, `batch_size={ORIG_BATCH_OVERRIDE['cellbench']}` (1 step per epoch); this is "
        "the run compared with labeltransfer there. labeltransfer keeps its defaults "
        "(256, last partial batch kept).",
        "",
        f"## Results (mean ± sd over seeds {', '.join(map(str, seeds))})",
        "",
        "| data set | implementation | ref / query cells | raw acc | SNG acc | macro-F1 "
        "| epochs | steps/epoch | cells/epoch | train s | s/epoch | s/step | ms/1k cells "
        "| prep s | predict s | peak RSS MB | load | CPU/wall |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for dataset, impl, size, g in _group_rows(frame):
        r = g.iloc[0]
        a, b = DATASETS[dataset][1:]
        for fail in failures:
            c = fail["config"]
            if (c["dataset"], c["impl"]) == (dataset, impl) and _batch(c.get("batch_size")):
                continue
            if (c["dataset"], c["impl"]) == (dataset, impl) and size is not None:
                lines.append(
                    f"| {dataset} {a} → {b} | {_impl_name(impl, None)} (seed {c['seed']}) "
                    f"| {int(r['n_reference'])} / {int(r['n_query'])} | fails: "
                    f"`{_error_line(fail['error'])}` (see Failed runs) "
                    "| | | | | | | | | | | | | | |"
                )
        lines.append(
            f"| {dataset} {a} → {b} | {_impl_name(impl, size)} | {int(r['n_reference'])} / "
            f"{int(r['n_query'])} | {_col(g, 'raw_accuracy')} | {_col(g, 'singlet_accuracy')} "
            f"| {_col(g, 'macro_f1')} | {_col(g, 'epochs', 1)} | {_col(g, 'steps_per_epoch', 1)} "
            f"| {_col(g, 'cells_per_epoch', 0)} "
            f"| {_col(g, 'train_s', 2)} | {_col(g, 's_per_epoch', 3)} | {_col(g, 's_per_step', 4)} "
            f"| {_col(g, 'ms_per_1k_cells', 1)} "
            f"| {_col(g, 'prep_s', 2)} | {_col(g, 'predict_s', 3)} | {_col(g, 'peak_rss_mb', 0)} "
            f"| {_load_avg(g)} | {_cpu_use(g)} |"
        )
    lines += [
        "",
        "`SNG acc`: accuracy on the query cells that demuxlet calls singlets (CellBench "
        "only). `load`: 1-minute load average when the child started (min-max over seeds); "
        "`CPU/wall`: process CPU seconds per wall second over train + predict (near 1 with one "
        "thread that had a core to itself).",
        "",
        "## Per seed",
        "",
        *_comparison(frame),
        "",
        "| data set | implementation | seed | raw acc | SNG acc | epochs (best) | train s "
        "| s/epoch | predict s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for dataset, impl, size, g in _group_rows(frame):
        for _, r in g.sort_values("seed").iterrows():
            sng = (
                "–"
                if r.get("singlet_accuracy") is None
                or (
                    isinstance(r.get("singlet_accuracy"), float)
                    and math.isnan(r["singlet_accuracy"])
                )
                else f"{r['singlet_accuracy']:.3f}"
            )
            best = r.get("best_epoch")
            best_s = (
                "?"
                if best is None or (isinstance(best, float) and math.isnan(best))
                else (f"{int(best)}")
            )
            lines.append(
                f"| {dataset} | {_impl_name(impl, size)} | {int(r['seed'])} "
                f"| {r['raw_accuracy']:.3f} "
                f"| {sng} | {int(r['epochs'])} ({best_s}) | {r['train_s']:.2f} "
                f"| {r['s_per_epoch']:.3f} | {r['predict_s']:.3f} | {r['peak_rss_mb']:.0f} |"
            )
    lines += ["", "## How the original was installed", "", *INSTALL_NOTES, ""]
    if failures:
        lines += ["## Failed runs", ""]
        for fail in failures:
            error = str(fail["error"])
            trace = error[error.rfind("Traceback") :] if "Traceback" in error else error[-1500:]
            lines += [f"- `{json.dumps(fail['config'])}`:", "", "```", trace.strip(), "```", ""]
    return "\n".join(lines)


INSTALL_NOTES = [
    "`scnym` 0.3.2 (the newest on the package index) pins the 2020 stack (`torch==1.4.0`, "
    "`torchvision==0.5.0`, `numpy==1.18.2`, `pandas==1.0.4`, `scanpy==1.6.0`, "
    "`anndata==0.7.4`, `scikit-learn==0.22.2.post1`, ...), none of which installs on Python "
    "3.11, so it was installed with `--no-deps` into its own virtual environment on top of the "
    "local CPU torch 2.13.0 and the same versions of numpy, pandas, scipy, scikit-learn, "
    "scanpy, anndata, h5py, numba, tqdm and tensorboard as the labeltransfer environment, "
    "plus `configargparse`, `pyyaml` and `requests` (imported at module level):",
    "",
    "```bash",
    "python -m venv /tmp/scnym_orig",
    "/tmp/scnym_orig/bin/pip install torch==2.13.0          # the local CPU wheel",
    "echo torch==2.13.0 > /tmp/scnym_constraints.txt         # never let pip swap torch",
    "/tmp/scnym_orig/bin/pip install -c /tmp/scnym_constraints.txt numpy==2.4.6 pandas==2.3.3 \\",
    "    scipy==1.17.1 scikit-learn==1.9.1 scanpy==1.11.5 anndata==0.12.19 h5py==3.16.0 \\",
    "    numba==0.68.1 tqdm==4.70.1 tensorboard==2.21.0 configargparse pyyaml requests",
    "/tmp/scnym_orig/bin/pip install --no-deps scnym==0.3.2",
    "```",
    "",
    "Its other pins (leidenalg, louvain, umap-learn, numpy-groupies, scikit-misc, "
    "tensorboardX, pytest, requests-* ...) are not imported by `scnym.api` training and "
    "prediction and were left out. The only shim: `scnym.dataprep` imports "
    "`torchvision.transforms` at module level, only for `transforms.Compose`. torchvision 0.28.0 "
    "(the release for torch 2.13) installs, but the PyPI wheel is a CUDA build whose `_C.so` "
    "needs `libc10_cuda.so`, so `import torchvision` fails with `operator torchvision::nms "
    "does not exist`; it was uninstalled again, and the benchmark's child puts a stub "
    "`torchvision.transforms` module with an equivalent `Compose` (apply the transforms in "
    "order) into `sys.modules` before importing scnym (`_torchvision_shim`). No other "
    "monkeypatch was needed: with numpy 2.4 / pandas 2.3 / anndata 0.12 / scanpy 1.11 the "
    "original's training and prediction ran unmodified (it only emits a FutureWarning for "
    "`AnnData.obs_keys`). Nothing in site-packages was edited.",
]


INFO_FIELDS = (
    "cpu",
    "cores",
    "ram_gib",
    "platform",
    "python",
    "torch",
    "torch_threads",
    "cuda",
    "scvi",
    "lightning",
    "numpy",
    "scipy",
    "anndata",
    "labeltransfer",
    "date",
)


def _commands(frame, python_ours: str, python_orig: str) -> list[str]:
    env_prefix = " ".join(f"{k}={v}" for k, v in THREAD_ENV.items())
    commands = []
    for _, row in frame.iterrows():
        config = {"impl": row["impl"], "dataset": row["dataset"], "seed": int(row["seed"])}
        if _batch(row.get("batch_size")):
            config["batch_size"] = _batch(row["batch_size"])
        python = python_orig if config["impl"] == "original" else python_ours
        commands.append(
            f"{env_prefix} {python} benchmarks/scnym_original.py --child '{json.dumps(config)}'"
        )
    return commands


def _write_markdown(csv: Path) -> str:
    """Write the markdown beside ``csv`` from the CSV alone (rerun with ``--markdown-only``)."""
    import pandas as pd

    frame = pd.read_csv(csv)
    first = frame.iloc[0]
    info = {name: first.get(f"info_{name}") for name in INFO_FIELDS}
    info["cuda"] = bool(info["cuda"]) if pd.notna(info["cuda"]) else False
    ok = frame[frame["status"] == "ok"]
    failed = frame[frame["status"] != "ok"]
    meta = {
        "quick": bool(first["run_quick"]),
        "seeds": sorted(frame["seed"].unique().tolist()),
        "csv": f"results/{csv.name}",
        "uptime_start": first["run_uptime_start"],
        "uptime_end": first["run_uptime_end"],
        "total_s": float(first["run_total_s"]),
        "n_runs": int(first["run_n_runs"]),
        "n_failed": len(failed),
        "python_ours": first["run_python_ours"],
        "python_orig": first["run_python_orig"],
        "commands": _commands(frame, first["run_python_ours"], first["run_python_orig"]),
        **{
            k: first.get(k)
            for k in ("source_sha1_start", "source_sha1_end", "source_newest_mtime_end")
        },
    }
    failures = [
        {
            "config": {
                "impl": r["impl"],
                "dataset": r["dataset"],
                "seed": int(r["seed"]),
                **(
                    {"batch_size": _batch(r.get("batch_size"))}
                    if _batch(r.get("batch_size"))
                    else {}
                ),
            },
            "error": r["error"],
        }
        for _, r in failed.iterrows()
    ]
    text = _markdown(ok, info, meta, failures)
    csv.with_suffix(".md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="seed 0, Kang only")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--orig-python", default=DEFAULT_ORIG_PYTHON)
    parser.add_argument(
        "--markdown-only",
        action="store_true",
        help="rewrite the markdown from the existing CSV without running anything",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        config = json.loads(args.child)
        if config["impl"] == "original":
            _child_original(config)
        else:
            _child_labeltransfer(config)
        return

    import pandas as pd

    csv_path = RESULTS / ("scnym_original_quick.csv" if args.quick else "scnym_original.csv")
    if args.markdown_only:
        _write_markdown(csv_path)
        print(f"wrote {csv_path.with_suffix('.md')}")
        return
    if not Path(args.orig_python).exists():
        sys.exit(f"{args.orig_python} not found: set up the original's venv (see --help)")
    seeds = [0] if args.quick else args.seeds
    datasets = ["kang"] if args.quick else list(DATASETS)
    start_uptime = uptime()
    source_start = source_fingerprint(SOURCE)
    print(f"start: {start_uptime}; labeltransfer source {source_start}", flush=True)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    configs = _configs(seeds, datasets)
    for i, config in enumerate(configs, 1):
        python = args.orig_python if config["impl"] == "original" else sys.executable
        found, error, wall = run_child(
            [str(Path(__file__).resolve()), "--child", json.dumps(config)],
            timeout=CHILD_TIMEOUT_S,
            env=THREAD_ENV,
            python=python,
        )
        tag = f"[{i}/{len(configs)}] {config['impl']:>13} {config['dataset']:>9} seed {config['seed']}"
        if error:
            print(f"{tag}: FAILED after {wall:.0f} s\n{error[-2000:]}", flush=True)
            rows.append({**config, "status": "failed", "error": error, "child_wall_s": wall})
            continue
        for record in found:
            record.update(status="ok", child_wall_s=wall)
            rows.append(record)
            print(
                f"{tag}: acc {record['raw_accuracy']:.3f}, {record['epochs']} epochs, "
                f"train {record['train_s']:.1f} s ({record['s_per_epoch']:.3f} s/epoch), "
                f"predict {record['predict_s']:.2f} s, peak {record['peak_rss_mb']:.0f} MB, "
                f"load {record['load_1min_start']:.2f}",
                flush=True,
            )
    total = time.perf_counter() - t0
    end_uptime = uptime()
    source_end = source_fingerprint(SOURCE)
    print(f"end: {end_uptime}; labeltransfer source {source_end}", flush=True)

    info = machine_info()
    frame = pd.DataFrame(rows)
    if "versions" in frame:
        frame["versions"] = frame["versions"].map(
            lambda v: json.dumps(v) if isinstance(v, dict) else v
        )
    for name in INFO_FIELDS:
        frame[f"info_{name}"] = info.get(name)
    frame["run_uptime_start"] = start_uptime
    frame["run_uptime_end"] = end_uptime
    frame["run_total_s"] = total
    frame["run_n_runs"] = len(configs)
    frame["run_quick"] = args.quick
    frame["run_python_ours"] = sys.executable
    frame["run_python_orig"] = args.orig_python
    frame["source_sha1_start"] = source_start["sha1"]
    frame["source_sha1_end"] = source_end["sha1"]
    frame["source_newest_mtime_end"] = source_end["newest_mtime"]
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(csv_path, index=False, float_format="%.5g")
    text = _write_markdown(csv_path)
    print()
    print(text)
    print(f"written: {csv_path} and {csv_path.with_suffix('.md')}")
    unexpected = [
        r
        for r in rows
        if r["status"] != "ok"
        and not (
            r["impl"] == "original"
            and r["dataset"] in ORIG_BATCH_OVERRIDE
            and not r.get("batch_size")
            and "ZeroDivisionError" in r["error"]
        )
    ]
    if unexpected:
        sys.exit(1)


if __name__ == "__main__":
    main()
