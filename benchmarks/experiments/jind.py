"""JIND: alignment and JIND+ under a batch shift, and the rejection rule without a shift.

1. Kang ctrl -> stim and CellBench CEL-seq2 -> Drop-seq: JIND without alignment, with
   ``model.align(query)`` and JIND+ (``align`` then ``self_train``).
2. No shift: a random 30% of the Kang ctrl (or CellBench CEL-seq2) cells as query, the rest as
   reference; at theta = 0.05 the seen-cell rejection should lie in 0.02-0.10.

Every run records the rejection rule's diagnostics: the temperature, the range of the per-type
thresholds and the share of confidences that saturate at 1.0. JIND at 100,000 and more cells
is measured by the ``scaling`` and ``backed`` suites.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from _scoring import KEY
from _writer import seed_table

from experiments import Experiment

if TYPE_CHECKING:
    import pandas as pd
    from _scoring import Calls
    from _tasks import Task
    from _tools import RunContext

SHIFT_TASKS = ("kang", "cellbench_c2d")
NOSHIFT_TASKS = ("kang_noshift", "cellbench_noshift")
COLUMNS = {
    "raw_accuracy": "raw acc",
    "rejection_rate": "rejection",
    "effective_accuracy": "eff. acc",
    "macro_f1": "macro-F1",
    "ece": "ECE",
    "train_s": "train s",
    "train_epochs": "epochs",
    "align_s_per_epoch": "align s/epoch",
    "predict_s": "predict s (align, self-train, annotate)",
    "peak_rss_mb": "peak MiB",
}


def diagnostics(task: Task, calls: Calls, ctx: RunContext) -> dict[str, Any]:
    """Temperature, threshold range and saturated confidences of the trained JIND."""
    import numpy as np

    model = ctx.model
    thresholds = np.asarray(model.rejection_["thresholds"], dtype=float)
    validation = np.asarray(model.validation_["confidence"], dtype=float)
    return {
        "temperature": float(model.calibration_["temperature"]),
        "threshold_min": float(thresholds.min()),
        "threshold_max": float(thresholds.max()),
        "validation_conf_eq_1": float(np.mean(validation >= 1.0)) if validation.size else np.nan,
        "query_conf_eq_1": float(np.mean(calls.confidence >= 1.0)),
        "aligned_in_uns": bool(ctx.adata.uns[KEY].get("aligned")),
    }


def sections(frame: pd.DataFrame, meta: dict[str, Any]) -> list[str]:
    """Shift table, no-shift table with the 0.02-0.10 check."""
    from _tools import DISPLAY

    shift = frame[frame["task"].isin(SHIFT_TASKS)]
    noshift = frame[frame["task"].isin(NOSHIFT_TASKS)]
    lines = [
        "Values are mean ± sd over seeds; JIND's defaults (30 epochs, 5,000 HVGs or all genes "
        "when fewer, theta 0.05). Accuracies are on the query against its true `cell_type`.",
        "",
        "## 1. Batch shift: Kang ctrl → stim, CellBench CEL-seq2 → Drop-seq",
        "",
        seed_table(shift, COLUMNS, {"task": None, "tool": DISPLAY}),
        "",
        "## 2. No batch shift: random 70% reference / 30% query of one batch",
        "",
        "Seen-cell rejection at theta = 0.05 should lie in 0.02-0.10 (the thresholds reject "
        "about 5% of held-out reference cells per type).",
        "",
        seed_table(
            noshift,
            {
                "rejection_rate": "rejection",
                "raw_accuracy": "raw acc",
                "ece": "ECE",
                "temperature": "temperature",
                "threshold_min": "lowest threshold",
                "threshold_max": "highest threshold",
                "query_conf_eq_1": "query conf. = 1",
            },
            {"task": None, "tool": DISPLAY},
        ),
        "",
    ]
    if "rejection_rate" in noshift:
        outside = noshift[(noshift["rejection_rate"] < 0.02) | (noshift["rejection_rate"] > 0.10)]
        lines += [
            f"- {r.task} seed {r.seed}: rejection {r.rejection_rate:.3f} is outside 0.02-0.10 "
            f"(thresholds {r.threshold_min:.4f}-{r.threshold_max:.4f}, "
            f"{r.query_conf_eq_1:.0%} of query confidences exactly 1.0)."
            for r in outside.itertuples()
        ]
    if "raw_accuracy" in shift:
        for task, group in shift.groupby("task", sort=False):
            base = group[group["tool"] == "jind_noalign"].set_index("seed")["raw_accuracy"]
            aligned = group[group["tool"] == "jind"].set_index("seed")["raw_accuracy"]
            worse = [s for s in aligned.index if s in base and aligned[s] < base[s]]
            lines += [
                f"- {task} seed {s}: alignment lowered the raw accuracy "
                f"({base[s]:.3f} → {aligned[s]:.3f})."
                for s in worse
            ]
    return [*lines, ""]


EXPERIMENT = Experiment(
    title="JIND benchmark",
    about=__doc__,
    sections=sections,
    grid=((("jind_noalign", "jind", "jind_plus"), SHIFT_TASKS), (("jind",), NOSHIFT_TASKS)),
    extra=diagnostics,
)
