"""scDET: open-world accuracy (seen / novel / overall), the long tail, the n_novel estimate.

1. Intra-data (scDET's protocol) on Kang and CellBench: half of the types (drawn per seed)
   novel, a random half of the seen cells as reference, every other cell the target.
2. Inter-data: Kang ctrl -> stim with two types (drawn per seed) held out of the reference.
3. Long tail: seen types of 1500 / 600 / 240 / 30 cells (50:1), the rarest a subtype of the
   largest, two novel types; scDET with and without its debiasing (``gamma = alpha = beta =
   0``: no logit adjustment, every pseudo-label sampled); the accuracy of the rarest seen and
   the rarest novel type.
4. ``n_novel=None`` on synthetic tasks with 0-3 novel types, the long tail and the intra-data
   splits: the estimated number of novel types against the truth (main training capped at 100
   epochs: only the estimate is compared).

scDET is told the true number of novel types (as the paper assumes) except in 4. The baseline
``scnym_kmeans`` is scDET's two-step comparison: ``lt.SCNYM`` with its default 0.5 confidence
cut, then k-means with the true number of novel types on the embedding of the rejected target
cells. Accuracies come from ``lt.metrics.open_world_report`` (seen types by name, novel groups
Hungarian-matched to the novel types).
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

OPEN_WORLD = {
    "open_world_seen_accuracy": "seen acc",
    "open_world_novel_accuracy": "novel acc",
    "open_world_overall_accuracy": "overall acc",
    "open_world_n_novel_clusters": "novel groups",
    "train_epochs": "epochs",
    "train_s": "train s",
}
ESTIMATE_TASKS = (
    "synthetic_novel0",
    "synthetic_novel1",
    "synthetic_novel2",
    "synthetic_novel3",
    "subtype_longtail",
    "kang_intra",
    "cellbench_intra",
)


def open_world(task: Task, calls: Calls, ctx: RunContext) -> dict[str, Any]:
    """Accuracy of the rarest seen and novel types; scDET's ``n_novel`` estimate."""
    import numpy as np

    import labeltransfer as lt

    truth = task.query.obs[TRUE_KEY].to_numpy(dtype=str)
    seen = task.reference_types
    report = lt.metrics.open_world_report(truth, calls.final, seen)
    target_of = {**{s: s for s in seen}, **report["mapping"]}
    hit = np.array([target_of.get(p, "") == t for p, t in zip(calls.final, truth, strict=True)])
    sizes = {t: int((truth == t).sum()) for t in set(truth)}
    record: dict[str, Any] = {"n_novel_true": task.n_novel}
    for kind, types in (("seen", seen), ("novel", task.novel_types)):
        present = [t for t in types if sizes.get(t)]
        if present:
            rarest = min(present, key=lambda t: (sizes[t], t))
            record[f"rarest_{kind}_type"] = rarest
            record[f"rarest_{kind}_accuracy"] = float(hit[truth == rarest].mean())
    estimate = getattr(ctx.model, "n_novel_estimate_", None)
    if estimate:
        record["n_novel_estimated"] = int(estimate["n_novel"])
        for key in ("n_unexplained", "n_grouped", "n_seen_part"):
            record[key] = int(estimate.get(key, 0))
    return record


def _estimates(frame: pd.DataFrame) -> list[str]:
    rows = frame[frame["tool"] == "scdet_auto"]
    if rows.empty or "n_novel_estimated" not in rows:
        return []
    error = (rows["n_novel_estimated"] - rows["n_novel_true"]).abs()
    lines = [
        f"**Exact in {int((error == 0).sum())} of {len(rows)} runs, within ±1 in "
        f"{int((error <= 1).sum())} of {len(rows)}.** *Unexplained*: target cells no seen type "
        "explains; *grouped*: those clustered; *seen part*: grouped cells dropped as an "
        "outlying part of a seen type.",
        "",
        "| task | seed | true n_novel | estimated | unexplained | grouped | seen part "
        "| seen acc | novel acc |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows.itertuples():
        lines.append(
            f"| {r.task} | {r.seed} | {r.n_novel_true} | {r.n_novel_estimated:.0f} "
            f"| {r.n_unexplained:.0f} | {r.n_grouped:.0f} | {r.n_seen_part:.0f} "
            f"| {getattr(r, 'open_world_seen_accuracy', float('nan')):.3f} "
            f"| {getattr(r, 'open_world_novel_accuracy', float('nan')):.3f} |"
        )
    return lines


def sections(frame: pd.DataFrame, meta: dict[str, Any]) -> list[str]:
    """One table per experiment of the module docstring."""
    by = {"task": None, "tool": DISPLAY}
    given = frame[frame["tool"] != "scdet_auto"]
    return [
        "Values are mean ± sd over seeds. Accuracies are on the target cells "
        "(`lt.metrics.open_world_report`); *overall* counts every target cell.",
        "",
        "## 1. Intra-data (half of the types novel) and 2. inter-data (Kang, two types held out)",
        "",
        seed_table(
            given[given["task"].isin(("kang_intra", "cellbench_intra", "kang_inter2"))],
            OPEN_WORLD,
            by,
        ),
        "",
        "## 3. Long tail: 50:1 among the seen types, the rarest a subtype of the largest",
        "",
        seed_table(
            given[given["task"] == "subtype_longtail"],
            {
                **dict(list(OPEN_WORLD.items())[:3]),
                "rarest_seen_accuracy": "rarest seen type acc",
                "rarest_novel_accuracy": "rarest novel type acc",
                "train_epochs": "epochs",
            },
            by,
        ),
        "",
        "## 4. Estimated number of novel types (`n_novel=None`)",
        "",
        *_estimates(frame),
        "",
    ]


EXPERIMENT = Experiment(
    title="scDET benchmark",
    about=__doc__,
    sections=sections,
    grid=(
        (("scdet", "scnym_kmeans"), ("kang_intra", "cellbench_intra", "kang_inter2")),
        (("scdet", "scdet_nodebias"), ("subtype_longtail",)),
        (("scdet_auto",), ESTIMATE_TASKS),
    ),
    extra=open_world,
)
