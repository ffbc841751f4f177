"""One-call evaluation of an annotated AnnData against known labels."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, overload

import numpy as np
import pandas as pd

from labeltransfer._constants import NOVEL_PREFIX, OUTPUT_KEYS, UNASSIGNED

from ._calibration import ece_noise_floor, expected_calibration_error, overconfidence_error
from ._classification import (
    _as_bool,
    _as_float,
    _as_labels,
    _isin,
    cohen_kappa,
    effective_accuracy,
    macro_f1,
    per_type_table,
    raw_accuracy,
    rejection_rate,
)
from ._openset import novel_auroc, open_world_report, oscr

if TYPE_CHECKING:
    from anndata import AnnData
    from numpy.typing import NDArray

__all__ = ["annotation_report", "format_report"]

#: Scalar entries of :func:`annotation_report` computed on the reference-type cells.
REPORT_SCALARS = (
    "raw_accuracy",
    "rejection_rate",
    "effective_accuracy",
    "macro_f1",
    "kappa",
    "ece",
    "ece_floor",
    "overconfidence_error",
)


def _obs_column(adata: AnnData, column: str, *, what: str) -> pd.Series:
    if column not in adata.obs.columns:
        available = ", ".join(map(repr, adata.obs.columns[:30]))
        more = " ..." if adata.obs.shape[1] > 30 else ""
        raise KeyError(
            f"Unknown key {column!r} in adata.obs ({what}); available columns: "
            f"[{available}{more}]. Pass the right key, or run `model.annotate(adata, "
            "key_added=...)` first."
        )
    return adata.obs[column]


@dataclass(frozen=True)
class _AnnotationFields:
    """The fields written by ``annotate(adata, key_added=key)``, as plain arrays."""

    truth: NDArray[np.str_]
    final: NDArray[np.str_]
    prediction: NDArray[np.str_]
    confidence: NDArray[np.float64]
    rejected: NDArray[np.bool_]
    reference_types: list[str]

    @property
    def is_novel(self) -> NDArray[np.bool_]:
        """Cells whose true type is not a reference type."""
        return ~_isin(self.truth, self.reference_types)

    @property
    def withheld(self) -> NDArray[np.bool_]:
        """Cells flagged rejected, or whose final call is not a reference type."""
        return self.rejected | ~_isin(self.final, self.reference_types)


def _reference_types(adata: AnnData, key: str, prediction: pd.Series) -> list[str]:
    """Return the reference types: the columns of ``obsm[f"{key}_probabilities"]``.

    A model's own novel classes (scDET's ``novel_<i>`` columns) are not reference types (no
    reference type may be named so): a cell called one is withheld, like a novel group.
    """
    prob_key = f"{key}{OUTPUT_KEYS.PROBABILITIES}"
    if prob_key in adata.obsm:
        prob = adata.obsm[prob_key]
        if isinstance(prob, pd.DataFrame):
            return _without_novel(prob.columns)
    else:
        warnings.warn(
            f"adata.obsm has no {prob_key!r}; taking the reference types from the categories of "
            f"obs[{prediction.name!r}], which misses reference types never predicted.",
            UserWarning,
            stacklevel=3,
        )
    if isinstance(prediction.dtype, pd.CategoricalDtype):
        return _without_novel(prediction.cat.categories)
    return sorted(_without_novel(set(prediction.dropna())))


def _without_novel(names: Any) -> list[str]:
    return [str(name) for name in names if not str(name).startswith(NOVEL_PREFIX)]


def _annotation_fields(adata: AnnData, true_key: str, key: str) -> _AnnotationFields:
    """Read and check the annotated fields of ``adata``."""
    truth = _obs_column(adata, true_key, what="true labels")
    final = _obs_column(adata, key, what="final calls written by annotate")
    pred = _obs_column(
        adata, f"{key}{OUTPUT_KEYS.PREDICTION}", what="argmax prediction written by annotate"
    )
    conf = _obs_column(
        adata, f"{key}{OUTPUT_KEYS.CONFIDENCE}", what="confidence written by annotate"
    )
    rej = _obs_column(adata, f"{key}{OUTPUT_KEYS.REJECTED}", what="rejection flag")
    if adata.n_obs == 0:
        raise ValueError("Empty input: `adata` has no cells; evaluate a non-empty query.")
    return _AnnotationFields(
        truth=_as_labels(truth, name=f"obs[{true_key!r}]"),
        final=_as_labels(final, name=f"obs[{key!r}]"),
        prediction=_as_labels(pred, name=f"obs[{pred.name!r}]"),
        confidence=_as_float(conf, name=f"obs[{conf.name!r}]"),
        rejected=_as_bool(rej.to_numpy(), name=f"obs[{rej.name!r}]"),
        reference_types=_reference_types(adata, key, pred),
    )


@overload
def annotation_report(
    adata: AnnData, true_key: str, key: str, *, as_frame: Literal[False] = ...
) -> dict[str, Any]: ...
@overload
def annotation_report(
    adata: AnnData, true_key: str, key: str, *, as_frame: Literal[True]
) -> pd.DataFrame: ...
def annotation_report(
    adata: AnnData, true_key: str, key: str, *, as_frame: bool = False
) -> dict[str, Any] | pd.DataFrame:
    """Evaluate the annotation written by ``annotate(adata, key_added=key)`` against truth.

    Parameters
    ----------
    adata
        Annotated query with the fields ``obs[key]``, ``obs[f"{key}_prediction"]``,
        ``obs[f"{key}_confidence"]``, ``obs[f"{key}_rejected"]`` and
        ``obsm[f"{key}_probabilities"]`` (whose columns are the reference types).
    true_key
        Column of ``adata.obs`` with the true cell types (no missing values).
    key
        The ``key_added`` used when annotating.
    as_frame
        Return the scalar entries as a one-row DataFrame indexed by ``key`` (handy to
        ``pd.concat`` the reports of several models); the per-type table is then in
        ``df.attrs["per_type"]`` and the open-world entries are flattened to
        ``open_world_<name>`` columns.

    Returns
    -------
    Dict with

    ``key``, ``true_key``
        the keys evaluated;
    ``n_cells``, ``n_known``, ``n_novel``
        all cells, cells of a reference type, cells of a type absent from the reference;
    ``raw_accuracy``
        accuracy of ``obs[f"{key}_prediction"]`` (before rejection), known cells;
    ``rejection_rate``
        fraction of known cells withheld (rejected, i.e. flagged in ``obs[f"{key}_rejected"]``
        or with a final call that is not a reference type);
    ``effective_accuracy``
        accuracy on the known cells that were not withheld (``nan`` if none);
    ``macro_f1``, ``kappa``
        macro F1 and Cohen's kappa of the raw prediction, known cells;
    ``ece``, ``overconfidence_error``
        calibration of ``obs[f"{key}_confidence"]`` against correctness of the raw prediction,
        known cells, 10 bins;
    ``ece_floor``
        the ECE a perfectly calibrated classifier would score on average with the same
        confidences (:func:`~labeltransfer.metrics.ece_noise_floor`): on a few hundred cells
        it is several hundredths, so an ECE near it is within sampling noise;
    ``per_type``
        :func:`~labeltransfer.metrics.per_type_table` over all cells (novel types included:
        their ``rejection_rate`` is how often they were withheld);

    and, when novel cells exist: ``novel_rejection_rate`` (fraction of novel cells withheld),
    ``novel_auroc`` and ``oscr`` (when known cells exist too), and ``open_world``, the
    :func:`~labeltransfer.metrics.open_world_report` of the final calls (also given whenever the
    final calls contain novel groups).

    Notes
    -----
    The accuracy triple is JIND's (Goyal et al. 2022): raw accuracy before rejection, rejection
    rate, and effective accuracy after it; ECE and OE are scNym's (Kimmel & Kelley 2021).
    Closed-set metrics are computed on the known cells because a cell of a novel type can never
    be right under a closed-set prediction; novel cells are scored by the open-set metrics
    instead (CellPredX's AUROC and OSCR, scDET's seen/novel/overall accuracy).
    """
    f = _annotation_fields(adata, true_key, key)
    novel = f.is_novel
    known = ~novel
    withheld = f.withheld
    n_known = int(known.sum())
    n_novel = int(novel.sum())
    nan = float("nan")

    report: dict[str, Any] = {
        "key": key,
        "true_key": true_key,
        "n_cells": int(adata.n_obs),
        "n_known": n_known,
        "n_novel": n_novel,
    }
    if n_known:
        t, p, c = f.truth[known], f.prediction[known], f.confidence[known]
        correct = t == p
        report |= {
            "raw_accuracy": raw_accuracy(t, p),
            "rejection_rate": rejection_rate(withheld[known]),
            "effective_accuracy": effective_accuracy(t, p, withheld[known]),
            "macro_f1": macro_f1(t, p),
            "kappa": cohen_kappa(t, p),
            "ece": expected_calibration_error(c, correct),
            "ece_floor": ece_noise_floor(c),
            "overconfidence_error": overconfidence_error(c, correct),
        }
    else:
        report |= dict.fromkeys(
            REPORT_SCALARS,
            nan,
        )
    report["per_type"] = per_type_table(f.truth, f.prediction, withheld)

    has_groups = bool(np.any(~_isin(f.final, f.reference_types) & (f.final != UNASSIGNED)))
    if n_novel:
        report["novel_rejection_rate"] = float(withheld[novel].mean())
        if n_known:
            correct_all = f.truth == f.prediction
            report["novel_auroc"] = novel_auroc(novel, f.confidence)
            report["oscr"] = oscr(novel, correct_all, f.confidence)
    if n_novel or has_groups:
        report["open_world"] = open_world_report(f.truth, f.final, f.reference_types)

    if not as_frame:
        return report
    row: dict[str, Any] = {}
    for name, value in report.items():
        if name in ("per_type", "key"):
            continue
        if name == "open_world":
            row |= {f"open_world_{k}": v for k, v in value.items() if k != "mapping"}
        else:
            row[name] = value
    frame = pd.DataFrame([row], index=pd.Index([key], name="key"))
    frame.attrs["per_type"] = report["per_type"]
    return frame


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def format_report(report: dict[str, Any] | pd.DataFrame, *, per_type: bool = True) -> str:
    """Render an :func:`annotation_report` as a short plain-text summary.

    Parameters
    ----------
    report
        The dict returned by :func:`annotation_report` (or its ``as_frame=True`` DataFrame; then
        only its first row is rendered).
    per_type
        Append the per-type table.

    Returns
    -------
    A multi-line string (no trailing newline), e.g. for the command line.
    """
    if isinstance(report, pd.DataFrame):
        if report.empty:
            raise ValueError("`report` is an empty DataFrame; pass annotation_report's output.")
        table = report.attrs.get("per_type")
        rep = {"key": report.index[0], **report.iloc[0].to_dict()}
        ow = {k[len("open_world_") :]: v for k, v in rep.items() if k.startswith("open_world_")}
        if ow:
            rep["open_world"] = ow
        if table is not None:
            rep["per_type"] = table
    else:
        rep = dict(report)
    required = {"n_cells", "raw_accuracy", "rejection_rate", "effective_accuracy"}
    if missing := sorted(required - rep.keys()):
        raise KeyError(
            f"`report` lacks {missing}; pass the output of "
            "`annotation_report(adata, true_key, key)`."
        )

    title = "Annotation report"
    if "key" in rep:
        title += f": {rep['key']!r}"
        if "true_key" in rep:
            title += f" vs truth {rep['true_key']!r}"
    n_cells = int(rep["n_cells"])
    n_novel = int(rep.get("n_novel", 0) or 0)
    n_known = int(rep.get("n_known", n_cells - n_novel))
    lines = [
        title,
        f"  cells                 {n_cells:,} ({n_known:,} of reference types, {n_novel:,} novel)",
        f"  raw accuracy          {_fmt(rep['raw_accuracy'])}",
        f"  rejection rate        {_fmt(rep['rejection_rate'])}",
        f"  effective accuracy    {_fmt(rep['effective_accuracy'])}",
    ]
    for name, label in (
        ("macro_f1", "macro F1"),
        ("kappa", "Cohen's kappa"),
        ("ece", "ECE"),
        ("overconfidence_error", "overconfidence error"),
    ):
        if name in rep:
            value = _fmt(rep[name])
            if name == "ece" and "ece_floor" in rep:
                value += f" (noise floor {_fmt(rep['ece_floor'])})"
            lines.append(f"  {label:<22}{value}")
    if n_novel:
        parts = [f"withheld {_fmt(rep.get('novel_rejection_rate'))}"]
        if "novel_auroc" in rep:
            parts.append(f"AUROC {_fmt(rep['novel_auroc'])}")
        if "oscr" in rep:
            parts.append(f"OSCR {_fmt(rep['oscr'])}")
        lines.append(f"  novel cells           {', '.join(parts)}")
    ow = rep.get("open_world")
    if isinstance(ow, dict) and ow:
        lines.append(
            f"  open world            seen {_fmt(ow.get('seen_accuracy'))}, "
            f"novel {_fmt(ow.get('novel_accuracy'))}, overall {_fmt(ow.get('overall_accuracy'))} "
            f"({_fmt(ow.get('n_novel_clusters'))} novel group(s) for "
            f"{_fmt(ow.get('n_novel_types'))} novel type(s))"
        )
    table = rep.get("per_type")
    if per_type and isinstance(table, pd.DataFrame) and not table.empty:
        lines.append("Per type:")
        body = table.to_string(float_format=lambda x: f"{x:.3f}", na_rep="n/a")
        lines.extend(f"  {line}" for line in body.splitlines())
    return "\n".join(lines)
