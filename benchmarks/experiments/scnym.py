"""scNym: ablations, calibration, a protocol shift, a held-out type, four domains, markers.

1. Kang ctrl -> stim: the full model and its ablations, ``no_mixmatch`` (query cells reach
   only the adversary), ``no_adversary`` (reversed gradient weight 0) and ``supervised``
   (neither: supervised MixUp training); accuracy and calibration (ECE, overconfidence error).
2. CellBench CEL-seq2 -> Drop-seq; also the accuracy on the demuxlet singlets.
3. Kang with B cells held out of the reference (``new_identity_discovery=True``): open-set
   AUROC, held-out cells caught, novel groups.
4. Kang with the two donors' samples as four domains (``batch_key`` = sample).
5. Integrated-gradient markers (``lt.tl.marker_genes``, seed 0, Kang): the rank of known
   markers among the top genes of each true type, in the reference and in the query.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from _tasks import TRUE_KEY
from _tools import DISPLAY
from _writer import seed_table

from experiments import Experiment

if TYPE_CHECKING:
    import pandas as pd
    from _scoring import Calls
    from _tasks import Task
    from _tools import RunContext

ABLATIONS = ("scnym", "scnym_no_mixmatch", "scnym_no_adversary", "scnym_supervised")
KNOWN_MARKERS = {
    "B cells": ["CD79A", "MS4A1"],
    "CD14+ Monocytes": ["CD14", "LYZ"],
    "FCGR3A+ Monocytes": ["FCGR3A"],
    "CD8 T cells": ["CD8A"],
    "CD4 T cells": ["CD4", "IL7R"],
}
MARKER_TOP = 20


def markers(task: Task, calls: Calls, ctx: RunContext) -> dict[str, Any]:
    """Ranks of the known markers among each true type's top genes (full model, Kang, seed 0)."""
    if (ctx.name, task.name, ctx.seed) != ("scnym", "kang", 0):
        return {}
    import labeltransfer as lt

    is_reference = (ctx.adata.obs["lt_role"] == "reference").to_numpy()
    query = ctx.adata[~is_reference].copy()
    query.obs[TRUE_KEY] = task.query.obs[TRUE_KEY].to_numpy()
    record: dict[str, Any] = {}
    for name, cells in (("reference", ctx.adata[is_reference].copy()), ("query", query)):
        table = lt.tl.marker_genes(ctx.model, cells, groupby=TRUE_KEY, n_top=MARKER_TOP)
        for cell_type, genes in KNOWN_MARKERS.items():
            ranked = table.loc[table["group"] == cell_type, "gene"].tolist()
            for gene in genes:
                record[f"{name}_rank_{gene}"] = ranked.index(gene) + 1 if gene in ranked else None
            record[f"{name}_top_{cell_type}"] = " ".join(ranked)
    return record


def _marker_rows(frame: pd.DataFrame) -> list[str]:
    """The marker table of the one run that measured them."""
    import pandas as pd

    column = "reference_top_B cells"
    rows = frame[frame[column].notna()] if column in frame else frame.iloc[:0]
    if rows.empty:
        return ["(not run: the markers come from the full model on Kang, seed 0)"]
    row = rows.iloc[0]

    def rank(gene: str, cells: str) -> str:
        value = row[f"{cells}_rank_{gene}"]
        return f"{gene}: " + (f">{MARKER_TOP}" if pd.isna(value) else str(int(value)))

    lines = ["| cells | type | known marker: rank | top genes |", "|---|---|---|---|"]
    for cells in ("reference", "query"):
        for cell_type, genes in KNOWN_MARKERS.items():
            ranks = ", ".join(rank(gene, cells) for gene in genes)
            lines.append(
                f"| {cells} | {cell_type} | {ranks} | {row[f'{cells}_top_{cell_type}']} |"
            )
    return lines


def sections(frame: pd.DataFrame, meta: dict[str, Any]) -> list[str]:
    """One table per experiment of the module docstring."""
    by = {"tool": DISPLAY}
    task = {name: frame[frame["task"] == name] for name in ("kang", "cellbench_c2d")}
    return [
        "Values are mean ± sd over seeds; `lt.SCNYM` defaults (400 epochs at most, early "
        "stopping).",
        "",
        "## 1. Kang ctrl → stim: the full model and its ablations",
        "",
        seed_table(
            task["kang"],
            {
                "raw_accuracy": "raw acc",
                "macro_f1": "macro-F1",
                "ece": "ECE",
                "overconfidence_error": "OE",
                "rejection_rate": "rejection",
                "train_epochs": "epochs",
                "best_epoch": "best epoch",
                "train_s_per_epoch": "s/epoch",
                "train_s": "train s",
                "peak_rss_mb": "peak MiB",
            },
            by,
        ),
        "",
        "## 2. CellBench CEL-seq2 → Drop-seq",
        "",
        seed_table(
            task["cellbench_c2d"][task["cellbench_c2d"]["tool"] == "scnym"],
            {
                "raw_accuracy": "raw acc",
                "singlet_accuracy": "acc on demuxlet singlets",
                "rejection_rate": "rejection",
                "effective_accuracy": "eff. acc",
                "ece": "ECE",
                "train_s": "train s",
            },
            by,
        ),
        "",
        "## 3. B cells held out of the Kang reference (new identity discovery)",
        "",
        seed_table(
            frame[frame["task"] == "kang_novel_b"],
            {
                "novel_auroc": "open-set AUROC",
                "novel_rejection_rate": "held-out caught",
                "rejection_rate": "seen rejected",
                "median_confidence_novel": "median conf. held-out",
                "median_confidence_seen": "median conf. seen",
                "novel_in_groups": "held-out in novel groups",
                "novel_group_purity": "group purity",
                "raw_accuracy": "seen acc",
            },
            by,
        ),
        "",
        "## 4. Kang, the two donors' samples as four domains",
        "",
        seed_table(
            frame[frame["task"] == "kang_samples"],
            {"raw_accuracy": "raw acc", "ece": "ECE", "rejection_rate": "rejection"},
            by,
        ),
        "",
        f"## 5. Integrated-gradient markers on Kang (top {MARKER_TOP} per true type, seed 0)",
        "",
        *_marker_rows(frame),
        "",
    ]


EXPERIMENT = Experiment(
    title="scNym benchmark",
    about=__doc__,
    sections=sections,
    grid=(
        (ABLATIONS, ("kang",)),
        (("scnym",), ("cellbench_c2d", "kang_novel_b", "kang_samples")),
    ),
    extra=markers,
)
