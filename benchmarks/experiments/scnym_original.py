"""``lt.SCNYM`` next to the original scNym (``scnym`` 0.3.2) on the same splits and machine.

Kang ctrl -> stim and CellBench CEL-seq2 -> Drop-seq (also scored on the demuxlet singlets).
Both run with their defaults and one thread, interleaved seed by seed so that load drift hits
both. The original runs in its own environment, created by the harness (``_envs.py``), through
its documented ``scnym_api`` (``_peers_scnym_original.py``: input log(CPM + 1), query cells
``"Unlabeled"``; on CellBench its batch is 128 because its default of 256 exceeds its labelled
training set). ``lt.SCNYM``: ``concat_reference_query`` + ``setup_anndata`` + ``train()`` +
``annotate()``, raw counts in.

Speed is compared per epoch, per optimiser step and per 1,000 cells fed to the classifier
(``ms/1k cells``: train seconds / (epochs x reference + query cells per epoch)), because an
epoch of the two differs: the original's is one pass over its labelled cells (``drop_last``,
the query loader repeated), ``lt.SCNYM``'s one pass over the longer of the two loaders.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from _tools import DISPLAY
from _writer import seed_table

from experiments import Experiment

if TYPE_CHECKING:
    import pandas as pd

TASKS = ("kang", "cellbench_c2d")
COLUMNS = {
    "raw_accuracy": "raw acc",
    "singlet_accuracy": "SNG acc",
    "macro_f1": "macro-F1",
    "train_epochs": "epochs",
    "train_steps_per_epoch": "steps/epoch",
    "train_cells_per_epoch": "cells/epoch",
    "train_s": "train s",
    "train_s_per_epoch": "s/epoch",
    "ms_per_1k_cells": "ms/1k cells",
    "predict_s": "predict s",
    "peak_rss_mb": "peak MiB",
}


def _with_speed(frame: pd.DataFrame) -> pd.DataFrame:
    cells = frame["train_epochs"] * frame["train_cells_per_epoch"]
    return frame.assign(ms_per_1k_cells=1e6 * frame["train_s"] / cells)


def _ratios(frame: pd.DataFrame) -> list[str]:
    """Per task and seed: accuracy difference and time ratios, ours / original."""
    lines = [
        "| task | seed | raw acc ours − original | s/epoch ours / original "
        "| ms/1k cells ours / original | train s ours / original |",
        "|---|---|---|---|---|---|",
    ]
    for task in TASKS:
        ours = frame[(frame["task"] == task) & (frame["tool"] == "scnym")].set_index("seed")
        orig = frame[(frame["task"] == task) & (frame["tool"] == "scnym_original")]
        orig = orig.set_index("seed")
        for seed in sorted(set(ours.index) & set(orig.index)):
            o, r = ours.loc[seed], orig.loc[seed]
            lines.append(
                f"| {task} | {seed} | {o['raw_accuracy'] - r['raw_accuracy']:+.3f} "
                f"| {o['train_s_per_epoch'] / r['train_s_per_epoch']:.2f} "
                f"| {o['ms_per_1k_cells'] / r['ms_per_1k_cells']:.2f} "
                f"| {o['train_s'] / r['train_s']:.2f} |"
            )
    return lines


def sections(frame: pd.DataFrame, meta: dict[str, Any]) -> list[str]:
    """The two implementations side by side, then per seed."""
    if frame.empty or "train_cells_per_epoch" not in frame:
        return ["No run finished."]
    frame = _with_speed(frame)
    versions = (
        frame.loc[frame["tool"] == "scnym_original", "versions"] if "versions" in frame else []
    )
    return [
        "Values are mean ± sd over seeds. `SNG acc`: accuracy on the query cells demuxlet calls "
        "singlets (CellBench). `train s` includes the set-up (joining, normalisation or "
        "`setup_anndata`); `predict s` annotates the query.",
        "",
        f"Original's environment: {next(iter(versions), 'n/a')}.",
        "",
        "## Results",
        "",
        seed_table(frame, COLUMNS, {"task": None, "tool": DISPLAY}),
        "",
        "## Per seed",
        "",
        *_ratios(frame),
        "",
    ]


EXPERIMENT = Experiment(
    title="scNym: labeltransfer next to the original implementation",
    about=__doc__,
    sections=sections,
    grid=((("scnym", "scnym_original"), TASKS),),
)
