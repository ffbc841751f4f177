"""The peer table (suites ``small`` and ``full``): every model next to every peer on every task.

Tasks: Kang ctrl -> stim, CellBench both ways, ``pbmc68k_reduced`` random 70/30, the Granja
scATAC donors, each with held-out types (issue 13's novel tasks: Kang B cells and FCGR3A+
monocytes, each CellBench line in both directions, pbmc68k CD19+ B, scATAC 17_B), Kang and
CellBench CEL-seq2 -> Drop-seq with the query strongly shifted (issue 14,
``lt.data.strong_shift``), a no-shift split of Kang, the synthetic RNA -> ATAC task and a
50:1 long-tailed synthetic task.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from _tasks import TASKS
from _tools import DISPLAY
from _tools import TOOLS as TOOL_REGISTRY
from _writer import marked, pivot

from experiments import Experiment

if TYPE_CHECKING:
    from pathlib import Path

    import pandas as pd

#: The tools and tasks flagged ``peer_table`` in the registries.
TOOLS = tuple(name for name, tool in TOOL_REGISTRY.items() if tool.peer_table)
PEER_TASKS = tuple(name for name, spec in TASKS.items() if spec.peer_table)
#: (column, title, digits, which tasks: "all", "closed" or "novel")
METRICS = (
    ("raw_accuracy", "Raw accuracy (seen cells)", 3, "all"),
    ("balanced_accuracy", "Balanced accuracy (mean recall over the seen types)", 3, "all"),
    ("rejection_rate", "Seen-cell rejection rate (rejected or called a novel group)", 3, "all"),
    ("effective_accuracy", "Effective accuracy (seen cells not rejected)", 3, "all"),
    ("macro_f1", "Macro-F1", 3, "all"),
    ("kappa", "Cohen's kappa", 3, "all"),
    ("singlet_accuracy", "Raw accuracy on demuxlet singlets (CellBench)", 3, "all"),
    ("ece", "Expected calibration error (10 bins), closed-set tasks", 3, "closed"),
    (
        "ece_floor",
        "ECE a perfectly calibrated tool would score with the same confidences (noise floor)",
        3,
        "closed",
    ),
    ("novel_auroc", "Open-set AUROC (held-out vs seen cells; novelty score)", 3, "novel"),
    (
        "novel_rejection_rate",
        "Held-out cells rejected or put in a novel group (`Unassigned` or `novel_*`)",
        3,
        "novel",
    ),
    ("novel_in_groups", "Held-out cells in novel groups (`novel_*`)", 3, "novel"),
    ("novel_group_purity", "Purity of the novel groups (share of held-out cells)", 3, "novel"),
    ("seen_in_novel_groups", "Seen cells in novel groups", 3, "all"),
    ("train_s", "Train seconds", 1, "all"),
    ("predict_s", "Predict seconds (incl. per-query fitting)", 2, "all"),
    ("peak_rss_mb", "Peak memory (MiB, VmHWM)", 0, "all"),
)


def _kinds(meta: dict[str, Any]) -> dict[str, list[str]]:
    """Task names by kind: all, closed-set, novel (held-out types), no-shift, real closed-set."""
    rows = meta["tasks"]
    closed = [r["task"] for r in rows if not r["novel"]]
    real = {"kang", "cellbench", "pbmc68k", "granja"}
    return {
        "all": [r["task"] for r in rows],
        "closed": closed,
        "novel": [r["task"] for r in rows if r["novel"]],
        "noshift": [t for t in closed if TASKS[t].query is None],
        "real_closed": [t for t in closed if TASKS[t].source in real],
        "shifted_closed": [t for t in closed if TASKS[t].shifted and TASKS[t].source in real],
        "novel_rna": [
            r["task"] for r in rows if r["novel"] and TASKS[r["task"]].source != "granja"
        ],
        "novel_kang": [
            r["task"] for r in rows if r["novel"] and TASKS[r["task"]].source == "kang"
        ],
    }


def _open_set_summary(frame: pd.DataFrame, kinds: dict[str, list[str]]) -> str:
    """One row per tool: the figures of issue 13's acceptance over the tasks of each kind."""
    import numpy as np

    def per_task(sub: pd.DataFrame, column: str, tasks: list[str]) -> np.ndarray:
        rows = sub[sub["task"].isin(tasks)]
        if column not in rows or rows.empty:
            return np.array([])
        return rows.groupby("task")[column].mean().dropna().to_numpy()

    def fmt(values: np.ndarray, how) -> str:
        return f"{how(values):.3f}" if values.size else "–"

    def all_and_rna(column: str, how) -> str:
        every, rna = (per_task(sub, column, kinds[kind]) for kind in ("novel", "novel_rna"))
        if rna.size and rna.size < every.size:
            return f"{fmt(every, how)} ({fmt(rna, how)})"
        return fmt(every, how)

    def worst_ece(sub: pd.DataFrame) -> str:
        rows = sub[sub["task"].isin(kinds["real_closed"])]
        if "ece" not in rows or rows["ece"].isna().all():
            return "–"
        columns = [c for c in ("ece", "ece_floor") if c in rows]
        means = rows.groupby("task")[columns].mean()
        worst = means.loc[means["ece"].idxmax()]
        text = f"{worst['ece']:.3f}"
        floor = worst.get("ece_floor", np.nan)
        return text if np.isnan(floor) else f"{text} ({floor:.3f})"

    kang = kinds["novel_kang"]
    lines = [
        "| tool | mean AUROC, novel tasks (RNA only) | worst-task AUROC (RNA only) "
        "| held-out caught (RNA only) | worst-task caught | seen rejected (novel tasks) "
        "| seen rejected (no shift) | worst ECE, real closed-set (its noise floor) "
        "| eff. > raw acc (closed-set tasks) | seen cells in novel groups (shifted closed-set) "
        + "".join(f"| {t}: held-out in novel groups, purity " for t in kang)
        + "|",
        "|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(kang),
    ]
    for tool, name in DISPLAY.items():
        sub = frame[frame["tool"] == tool]
        if sub.empty:
            continue
        closed = sub[sub["task"].isin(kinds["closed"])]
        if {"effective_accuracy", "raw_accuracy"} <= set(closed):
            means = closed.groupby("task")[["effective_accuracy", "raw_accuracy"]].mean()
            better = f"{int((means.iloc[:, 0] > means.iloc[:, 1]).sum())} of {len(means)}"
        else:
            better = "–"
        noshift = per_task(sub, "rejection_rate", kinds["noshift"])
        groups = [
            f"{fmt(per_task(sub, 'novel_in_groups', [t]), np.mean)}, "
            f"{fmt(per_task(sub, 'novel_group_purity', [t]), np.mean)}"
            for t in kang
        ]
        lines.append(
            f"| {name} | {all_and_rna('novel_auroc', np.mean)} "
            f"| {all_and_rna('novel_auroc', np.min)} "
            f"| {all_and_rna('novel_rejection_rate', np.mean)} "
            f"| {fmt(per_task(sub, 'novel_rejection_rate', kinds['novel']), np.min)} "
            f"| {fmt(per_task(sub, 'rejection_rate', kinds['novel']), np.mean)} "
            f"| {', '.join(f'{v:.3f}' for v in noshift) or '–'} "
            f"| {worst_ece(sub)} | {better} "
            f"| {fmt(per_task(sub, 'seen_in_novel_groups', kinds['shifted_closed']), np.max)} "
            + "".join(f"| {g} " for g in groups)
            + "|"
        )
    return "\n".join(lines)


def sections(frame: pd.DataFrame, meta: dict[str, Any]) -> list[str]:
    """Tasks, the open-set summary, then one tools x tasks table per metric."""
    kinds = _kinds(meta)
    seeds = ", ".join(map(str, sorted(frame["seed"].unique()))) if len(frame) else "–"
    lines = [
        f"Values are mean ± sd over seeds ({seeds}). Closed-set metrics are on the query cells "
        "of reference types; open-set metrics score the held-out types with each tool's "
        "novelty score (`obs[K + '_novelty']` where the tool writes one, else "
        "`1 - confidence`). Tools without a rejection rule reject nothing. Timings come from "
        "the machine above and are indicative only: compare them within this table.",
        "",
        "## Tasks (seed 0)",
        "",
        "| task | what | reference cells | query cells | features | reference types "
        "| novel types in the query | batch shift |",
        "|---|---|---|---|---|---|---|---|",
        *[
            f"| {r['task']} | {r['about']} | {r['n_reference']} | {r['n_query']} "
            f"| {r['n_features']} | {r['n_types']} | {r['novel'] or '–'} "
            f"| {'yes' if r['shift'] else 'no'} |"
            for r in meta["tasks"]
        ],
        "",
        "## Open-set summary",
        "",
        "Means over the tasks of each kind (each task: mean over seeds). *No shift*: the "
        "rejection of seen cells on each no-shift task (target 0.02-0.10 at theta = 0.05).",
        "",
        *marked("open_set_summary", _open_set_summary(frame, kinds)),
    ]
    for column, title, digits, which in METRICS:
        if column not in frame or frame[column].isna().all():
            continue
        tasks = [t for t in kinds[which] if t in set(frame.loc[frame[column].notna(), "task"])]
        lines += [f"## {title}", "", *marked(column, pivot(frame, column, DISPLAY, tasks, digits))]
    return lines


#: The figures of the peer table: one file each, two heatmaps side by side
#: (column, label, colour scale: "up" higher is better, "down" lower is better, "log" seconds/MiB).
PANELS = {
    "accuracy": (
        ("raw_accuracy", "raw accuracy", "up"),
        ("balanced_accuracy", "balanced accuracy", "up"),
    ),
    "trust": (("rejection_rate", "seen rejection", "down"), ("ece", "ECE", "down")),
    "novelty": (
        ("novel_auroc", "open-set AUROC", "up"),
        ("novel_rejection_rate", "held-out caught", "up"),
    ),
    "cost": (("train_s", "train seconds", "log"), ("peak_rss_mb", "peak MiB", "log")),
}


def _cell_text(value: float, scale: str) -> str:
    """A heatmap cell's text in at most 4 characters: ``.88``, ``1.00``, ``3.2``, ``672``, ``1.1k``."""
    if scale == "log" and value >= 1000:
        return f"{value / 1000:.1f}k"
    if scale == "log" and value >= 10:
        return f"{value:.0f}"
    if scale == "log" and value >= 1:
        return f"{value:.1f}"
    return f"{value:.2f}".removeprefix("0")


def figures(frame: pd.DataFrame, meta: dict[str, Any], directory: Path) -> list[Path]:
    """Heatmaps (tasks x tools, the mean over seeds written in each cell) of the main metrics.

    Each figure is drawn at the documentation's column width (6.6 in at 150 dpi), so it is
    shown at its own scale: the tables beside it carry the spreads over seeds.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm, Normalize

    directory.mkdir(parents=True, exist_ok=True)
    order = [r["task"] for r in meta["tasks"]]
    tools = [t for t in DISPLAY if t in set(frame["tool"])]
    written = []
    for name, candidates in PANELS.items():
        panels = [p for p in candidates if p[0] in frame and frame[p[0]].notna().any()]
        if not panels:
            continue
        means = [
            frame.pivot_table(index="task", columns="tool", values=column, aggfunc="mean")
            for column, _, _ in panels
        ]
        tasks = [t for t in order if any(t in m.index for m in means)]
        fig, axes = plt.subplots(
            1,
            len(panels),
            figsize=(6.6, 1.1 + 0.2 * len(tasks)),
            sharey=True,
            squeeze=False,
        )
        for ax, (_, label, scale), mean in zip(axes[0], panels, means, strict=True):
            values = mean.reindex(index=tasks, columns=tools).to_numpy(dtype=float)
            finite = values[np.isfinite(values)]
            if scale == "log":
                norm = LogNorm(max(finite.min(), 1e-3), max(finite.max(), 1e-2))
            else:
                norm = Normalize(0, max(1e-3, finite.max()) if scale == "down" else 1)
            cmap = plt.get_cmap("viridis_r" if scale != "up" else "viridis")
            ax.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=norm, aspect="auto")
            for (row, col), value in np.ndenumerate(values):
                if np.isfinite(value):
                    shade = norm(value) if scale == "up" else 1 - norm(value)
                    ax.text(
                        col,
                        row,
                        _cell_text(value, scale),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="black" if shade > 0.55 else "white",
                    )
            ax.set_title(label, fontsize=9)
            ax.set_xticks(
                range(len(tools)), [DISPLAY[t] for t in tools], rotation=90, fontsize=7.5
            )
            ax.set_yticks(range(len(tasks)), tasks, fontsize=7.5)
            ax.tick_params(length=0)
            ax.set_facecolor("#eeeeee")
        fig.tight_layout(w_pad=0.4)
        path = directory / f"run_{meta['suite']}_{name}.png"
        fig.savefig(path, dpi=150)
        plt.close(fig)
        written.append(path)
    return written


EXPERIMENT = Experiment(
    title="Peer benchmark",
    about=__doc__,
    sections=sections,
    grid=((TOOLS, PEER_TASKS),),
    figures=figures,
)
