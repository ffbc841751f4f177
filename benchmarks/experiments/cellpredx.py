"""CellPredX: RNA -> ATAC loss ablations, RNA -> RNA next to JIND and scNym, novel types.

1. Synthetic unpaired RNA -> ATAC (``lt.data.synthetic_multiome``, 500 protein-coding hg38
   genes at their real loci, 2000 background peaks; a simulation) through
   ``CellPredX.setup_mudata``: the full model and the ablation of each loss (weight 0):
   ``no_pr``, ``no_cl``, ``no_fa``, ``no_sc``, and ``ce_only``.
2. RNA -> RNA on Kang ctrl -> stim and CellBench CEL-seq2 -> Drop-seq: CellPredX (preset
   ``rna_rna``), JIND (with ``align``) and scNym, each with its defaults.
3. Novel types: the synthetic ATAC task with one ATAC-only type, and Kang without B cells:
   open-set AUROC, OSCR, held-out and seen cells rejected.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from _tools import DISPLAY
from _writer import seed_table

from experiments import Experiment

if TYPE_CHECKING:
    import pandas as pd

ABLATIONS = (
    "cellpredx",
    "cellpredx_no_pr",
    "cellpredx_no_cl",
    "cellpredx_no_fa",
    "cellpredx_no_sc",
    "cellpredx_ce_only",
)
CLOSED = {
    "raw_accuracy": "raw acc",
    "macro_f1": "macro-F1",
    "rejection_rate": "rejection",
    "effective_accuracy": "eff. acc",
    "ece": "ECE",
    "train_epochs": "epochs",
    "best_epoch": "best epoch",
    "train_s": "train s",
    "peak_rss_mb": "peak MiB",
}


def sections(frame: pd.DataFrame, meta: dict[str, Any]) -> list[str]:
    """One table per experiment of the module docstring."""
    by = {"task": None, "tool": DISPLAY}
    return [
        "Values are mean ± sd over seeds; each model's defaults (CellPredX: the preset's "
        "iteration budget, early stopping on the sparse center loss). The multiome data are a "
        "simulation, not real chromatin data.",
        "",
        "## 1. Synthetic unpaired RNA → ATAC through setup_mudata: each loss's ablation",
        "",
        seed_table(frame[frame["task"] == "multiome"], CLOSED, by),
        "",
        "## 2. RNA → RNA next to JIND and scNym",
        "",
        seed_table(frame[frame["task"].isin(("kang", "cellbench_c2d"))], CLOSED, by),
        "",
        "## 3. Novel types: one type held out of the reference",
        "",
        seed_table(
            frame[frame["task"].isin(("multiome_novel", "kang_novel_b"))],
            {
                "novel_auroc": "open-set AUROC",
                "oscr": "OSCR",
                "raw_accuracy": "seen acc",
                "median_confidence_novel": "median conf. held-out",
                "median_confidence_seen": "median conf. seen",
                "novel_rejection_rate": "held-out rejected",
                "rejection_rate": "seen rejected",
            },
            by,
        ),
        "",
    ]


EXPERIMENT = Experiment(
    title="CellPredX benchmark",
    about=__doc__,
    sections=sections,
    grid=(
        (ABLATIONS, ("multiome",)),
        (("cellpredx", "jind", "scnym"), ("kang", "cellbench_c2d")),
        (("cellpredx",), ("multiome_novel", "kang_novel_b")),
    ),
)
