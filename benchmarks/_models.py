"""The four labeltransfer models as benchmark tools: one runner, one :class:`Recipe` per variant.

Every recipe follows the model's user guide:

- ``JIND``: trained on the reference; on a task with a batch shift ``model.align(query)``
  first (``align=True``), JIND+ then ``model.self_train(query)``; ``annotate(query)``.
- ``SCNYM``, ``SCDET``, ``CellPredX``: trained on ``concat_reference_query(reference, query)``
  (with ``batch_key="batch"`` where a side holds several domains), then ``annotate()``.
  CellPredX on the multiome task goes through ``setup_mudata`` on the RNA + ATAC-peak MuData
  (its gene activity is built by the model); every other tool uses the ATAC cells' gene
  activity as the query there.

The query's labels never reach a model. ``train_s`` covers everything that needs the
reference (set-up, gene selection, training; the joint models train on the query too),
``predict_s`` everything per query (JIND's ``align`` and ``self_train``, the annotation).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from _common import Stopwatch, training_meter
from _scoring import KEY, Calls
from _tasks import TRUE_KEY

if TYPE_CHECKING:
    from _tasks import Task
    from _tools import RunContext

CPU = {"accelerator": "cpu", "enable_progress_bar": False}


@dataclass(frozen=True)
class Recipe:
    """How one variant of a labeltransfer model is set up, trained and applied."""

    model: str
    #: constructor keyword arguments from the task (e.g. scDET's true number of novel types)
    init: Callable[[Task], dict[str, Any]] | None = None
    plan_kwargs: Mapping[str, Any] = field(default_factory=dict)
    #: JIND: align the query on shifted tasks; self-train on the query afterwards (JIND+)
    align: bool = False
    self_train: bool = False
    #: scDET's two-step baseline: k-means (true number of novel types) on the embedding of the
    #: rejected query cells, whose final calls become ``novel_<i>``
    kmeans_novel: bool = False


def _init(recipe: Recipe, task: Task) -> dict[str, Any]:
    return recipe.init(task) if recipe.init else {}


def _epochs(ctx: RunContext, part: str) -> dict[str, int]:
    cap = ctx.epochs(part)
    return {} if cap is None else {"max_epochs": cap}


def _train_kwargs(recipe: Recipe, ctx: RunContext, meter) -> dict[str, Any]:
    kwargs: dict[str, Any] = {**_epochs(ctx, "train"), **CPU, "callbacks": [meter]}
    if recipe.plan_kwargs:
        kwargs["plan_kwargs"] = dict(recipe.plan_kwargs)
    warmup = ctx.epochs("warmup")
    if recipe.model == "SCDET" and warmup is not None:  # the n_novel estimate's warm-up
        kwargs["warmup_epochs"] = warmup
    return kwargs


def _jind(recipe: Recipe, task: Task, query, ctx: RunContext, sw: Stopwatch) -> tuple[Any, dict]:
    import labeltransfer as lt

    reference = task.reference.copy()
    meter, info = training_meter(), {}
    with sw("train"):
        lt.JIND.setup_anndata(reference, labels_key=TRUE_KEY)
        model = lt.JIND(reference, **_init(recipe, task))
        model.train(**_train_kwargs(recipe, ctx, meter))
    info.update(meter.summary("train"))
    with sw("predict"):
        if recipe.align and task.shifted:
            align_meter = training_meter()
            model.align(query, callbacks=[align_meter], **_epochs(ctx, "align"), **CPU)
            info.update(align_meter.summary("align"))
        if recipe.self_train:
            model.self_train(query, **_epochs(ctx, "self_train"), **CPU)
        model.annotate(query, key_added=KEY)
    info["aligned"] = bool(recipe.align and task.shifted)
    return model, info


def _cellpredx_mudata(recipe: Recipe, task: Task, ctx: RunContext, sw: Stopwatch):
    import mudata as md

    import labeltransfer as lt

    mdata = md.MuData({"rna": task.reference.copy(), "atac": task.atac.copy()})
    meter = training_meter()
    with sw("train"):
        lt.CellPredX.setup_mudata(mdata, labels_key=TRUE_KEY)
        model = lt.CellPredX(mdata)
        model.train(**_train_kwargs(recipe, ctx, meter))
    with sw("predict"):
        model.annotate(mdata, key_added=KEY)
    return model, mdata, meter.summary("train")


def _kmeans_novel(calls: Calls, embedding, n_novel: int, seed: int) -> None:
    """Give the rejected cells ``novel_<i>`` calls by k-means on their embedding."""
    import numpy as np
    from sklearn.cluster import KMeans

    rejected = np.flatnonzero(calls.rejected)
    if n_novel == 0 or rejected.size < n_novel:
        return
    groups = KMeans(n_novel, n_init=10, random_state=seed).fit_predict(embedding[rejected])
    calls.final = calls.final.astype(object)
    calls.final[rejected] = [f"novel_{g}" for g in groups]
    calls.final = calls.final.astype(str)


def run_labeltransfer(recipe: Recipe, task: Task, ctx: RunContext) -> dict[str, tuple]:
    """Train and apply one labeltransfer model with ``recipe``; ``{tool: (Calls, info)}``.

    The trained model and the AnnData it annotated are left in ``ctx.model`` and
    ``ctx.adata`` for an experiment's extra measurements.
    """
    import labeltransfer as lt

    query = task.query.copy()
    query.obs = query.obs[["batch"]]  # the query's labels never reach a model
    sw = Stopwatch()
    if recipe.model == "JIND":
        model, info = _jind(recipe, task, query, ctx, sw)
        annotated = out = query
    elif recipe.model == "CellPredX" and task.atac is not None:
        model, annotated, info = _cellpredx_mudata(recipe, task, ctx, sw)
        out = annotated["atac"][task.query.obs_names]
    else:
        cls = getattr(lt, recipe.model)
        batch_key = "batch" if task.multi_domain else None
        meter = training_meter()
        with sw("train"):
            annotated = lt.data.concat_reference_query(
                task.reference.copy(), query, labels_key=TRUE_KEY, batch_key=batch_key
            )
            cls.setup_anndata(annotated, labels_key=TRUE_KEY, batch_key=batch_key)
            model = cls(annotated, **_init(recipe, task))
            model.train(**_train_kwargs(recipe, ctx, meter))
        with sw("predict"):
            model.annotate(key_added=KEY)
        info = meter.summary("train")
        out = annotated[(annotated.obs["lt_role"] == "query").to_numpy()]
        out.obs_names = task.query.obs_names
    calls = Calls.from_annotated(out)
    if recipe.kmeans_novel:
        _kmeans_novel(calls, out.obsm[f"X_{KEY}"], task.n_novel, ctx.seed)
    info.update(sw.record())
    info["best_epoch"] = model.training_summary_.get("best_epoch")
    check = model.training_summary_.get("novel_class_check")
    if check is not None:  # scDET: its novel classes against the reference's coverage
        seen, novel = check["partnered_seen"], check["partnered_novel"]
        info["novel_check_gap"] = None if seen is None or novel is None else seen - novel
        info["novel_check_refit"] = bool(check.get("refitted", False))
    ctx.model, ctx.adata = model, annotated
    return {ctx.name: (calls, info)}


# ----------------------------------------------------------------------------- init helpers
def new_identity_when_held_out(task: Task) -> dict[str, Any]:
    """scNym: ``new_identity_discovery=True`` when a type is held out (the paper's advice)."""
    return {"new_identity_discovery": bool(task.held_out)}


def true_n_novel(task: Task) -> dict[str, Any]:
    """scDET: the true number of novel types (known, as the paper assumes)."""
    return {"n_novel": task.n_novel}


def true_n_novel_reference_genes(task: Task) -> dict[str, Any]:
    """scDET: the true number of novel types, genes selected on the reference cells only."""
    return {**true_n_novel(task), "feature_cells": "reference"}


def estimated_n_novel(task: Task) -> dict[str, Any]:
    """scDET: ``n_novel=None``, estimated after a warm-up."""
    return {"n_novel": None}
