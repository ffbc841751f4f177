"""What every tool returns (:class:`Calls`) and how every tool is scored (:func:`score`).

The same metrics for models and peers, from ``lt.metrics``:

- closed-set, on the query cells of reference types (``lt.metrics.annotation_report``): raw
  accuracy, seen-cell rejection rate (``rejection_rate``: rejected, or called a type that is not
  a reference type), effective accuracy, macro-F1, kappa, ECE and overconfidence error;
- ``balanced_accuracy``: the argmax call's mean recall over the query's seen types (a
  query whose composition differs from the reference's weighs each type equally);
- open-set, where the query holds types absent from the reference: ``novel_auroc``, the AUROC
  of the tool's novelty score (``obs[K + "_novelty"]`` when the tool writes one, else
  ``1 - confidence``; ``lt.metrics.novel_auroc``), OSCR, ``novel_rejection_rate`` (held-out
  cells rejected or put in a novel group, ``Unassigned`` or ``novel_*``) and the median
  confidence of held-out and seen cells;
- novel groups (final calls ``novel_*``): the share of held-out cells in them, their purity
  (share of held-out cells among their cells) and the share of seen cells in them;
- ``open_world_*``: ``lt.metrics.open_world_report`` (seen / novel / overall accuracy with
  novel groups Hungarian-matched to the novel types) where the query holds novel cells or
  the tool formed novel groups;
- ``singlet_accuracy``: raw accuracy on the seen cells that demuxlet calls singlets (CellBench).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from _tasks import TRUE_KEY

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    from _tasks import Task

#: ``key_added`` of every labeltransfer model in the harness.
KEY = "pred"


@dataclass
class Calls:
    """Per-query-cell output of one tool, in the fields of ``annotate``."""

    prediction: np.ndarray
    final: np.ndarray
    confidence: np.ndarray
    rejected: np.ndarray
    probabilities: pd.DataFrame
    novelty: np.ndarray | None = None

    @classmethod
    def from_probabilities(cls, probabilities: pd.DataFrame) -> Calls:
        """Argmax calls and max-probability confidences, nothing rejected."""
        import numpy as np

        values = probabilities.to_numpy(dtype=np.float64)
        prediction = np.asarray(probabilities.columns, dtype=str)[values.argmax(axis=1)]
        return cls(
            prediction=prediction,
            final=prediction.copy(),
            confidence=values.max(axis=1),
            rejected=np.zeros(len(values), dtype=bool),
            probabilities=probabilities,
        )

    @classmethod
    def from_annotated(cls, adata: Any, key: str = KEY) -> Calls:
        """The fields that ``annotate(adata, key_added=key)`` wrote."""
        import numpy as np

        obs = adata.obs
        novelty = obs.get(f"{key}_novelty")
        return cls(
            prediction=obs[f"{key}_prediction"].astype(str).to_numpy(),
            final=obs[key].astype(str).to_numpy(),
            confidence=obs[f"{key}_confidence"].to_numpy(dtype=np.float64),
            rejected=np.asarray(obs[f"{key}_rejected"], dtype=bool),
            probabilities=adata.obsm[f"{key}_probabilities"],
            novelty=None if novelty is None else novelty.to_numpy(dtype=np.float64),
        )


def score(task: Task, calls: Calls) -> dict[str, Any]:
    """Every metric of ``calls`` against the query's true types (see the module docstring)."""
    import numpy as np
    from anndata import AnnData

    import labeltransfer as lt
    from labeltransfer._constants import NOVEL_PREFIX
    from labeltransfer.metrics._report import REPORT_SCALARS

    obs = task.query.obs[[TRUE_KEY]].copy()
    obs[KEY] = calls.final
    obs[f"{KEY}_prediction"] = calls.prediction
    obs[f"{KEY}_confidence"] = calls.confidence
    obs[f"{KEY}_rejected"] = calls.rejected
    adata = AnnData(obs=obs)
    probabilities = calls.probabilities.copy()
    probabilities.index = obs.index
    adata.obsm[f"{KEY}_probabilities"] = probabilities
    report = lt.metrics.annotation_report(adata, TRUE_KEY, KEY)
    record: dict[str, Any] = {name: float(report[name]) for name in REPORT_SCALARS}
    record.update(n_known=report["n_known"], n_novel=report["n_novel"])
    record["novelty_score"] = "1 - confidence" if calls.novelty is None else "novelty"

    truth = obs[TRUE_KEY].to_numpy(dtype=str)
    predicted = np.asarray(calls.prediction, dtype=str)
    novel = ~np.isin(truth, task.reference_types)
    known = ~novel
    if known.any():  # the argmax call's mean recall over the query's seen types
        hit = predicted[known] == truth[known]
        recalls = [hit[truth[known] == t].mean() for t in np.unique(truth[known])]
        record["balanced_accuracy"] = float(np.mean(recalls))
    if novel.any():
        record["novel_rejection_rate"] = float(report["novel_rejection_rate"])
        record["median_confidence_novel"] = float(np.median(calls.confidence[novel]))
    if novel.any() and known.any():
        # novel_auroc ranks 1 - its second argument: pass 1 - novelty to rank by the novelty
        novelty = 1.0 - calls.confidence if calls.novelty is None else calls.novelty
        record["novel_auroc"] = lt.metrics.novel_auroc(novel, 1.0 - novelty)
        record["oscr"] = float(report["oscr"])
        record["median_confidence_seen"] = float(np.median(calls.confidence[known]))

    grouped = np.char.startswith(np.asarray(calls.final, dtype=str), NOVEL_PREFIX)
    record["n_novel_groups"] = len(set(np.asarray(calls.final)[grouped]))
    if known.any():
        record["seen_in_novel_groups"] = float(grouped[known].mean())
    if novel.any():
        record["novel_in_groups"] = float(grouped[novel].mean())
        record["novel_group_purity"] = float(novel[grouped].mean()) if grouped.any() else np.nan
    for name, value in report.get("open_world", {}).items():
        if name != "mapping":
            record[f"open_world_{name}"] = value

    if "singlet" in task.query.obs:
        singlet = task.query.obs["singlet"].to_numpy(dtype=bool) & known
        if singlet.any():
            record["singlet_accuracy"] = lt.metrics.raw_accuracy(
                truth[singlet], predicted[singlet]
            )
    return record
