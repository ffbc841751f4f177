"""Tool registry of the benchmark harness: every model variant and peer, in one table.

To add a tool, add one :class:`Tool` to :data:`TOOLS`: a labeltransfer variant is a
:class:`~_models.Recipe` (``_lt(...)``); a peer is a function ``run(task, ctx)`` returning
``{tool: (Calls, info)}`` (see ``_peers.py``), with its own environment in ``_envs.py`` if it
cannot live in the main one. Every tool is scored the same way (``_scoring.score``).

Training budgets: ``small_epochs`` caps each training part (``train``, ``align``, ...) in the
``small`` budget; ``full_epochs`` holds the caps that also apply in the ``full`` budget (else
the tool's defaults); the ``quick`` budget caps every part at :data:`QUICK_EPOCHS`, and
``--max-epochs`` caps every part of every tool.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from _models import (
    Recipe,
    estimated_n_novel,
    new_identity_when_held_out,
    run_labeltransfer,
    true_n_novel,
    true_n_novel_reference_genes,
)
from _peers import run_celltypist, run_scanvi, run_scnym_original, run_sklearn

if TYPE_CHECKING:
    from _scoring import Calls
    from _tasks import Task

#: Epoch cap of every training part in the ``quick`` budget (smoke runs).
QUICK_EPOCHS = 2

Runner = Callable[["Task", "RunContext"], dict[str, tuple["Calls", dict[str, Any]]]]


@dataclass(frozen=True)
class Tool:
    """One benchmarked tool: how to run it and what it costs to train."""

    display: str
    run: Runner
    kind: str  # "model" (labeltransfer) or "peer"
    small_epochs: Mapping[str, int] = field(default_factory=dict)
    full_epochs: Mapping[str, int] = field(default_factory=dict)
    uses_torch: bool = True
    #: in the peer table (suites ``small`` and ``full``)
    peer_table: bool = False
    #: the peer's own environment (``_envs.ENVS``), created by the parent before the runs
    env: str | None = None
    #: further records the run yields, name -> display name (CellTypist: majority voting)
    extra_records: Mapping[str, str] = field(default_factory=dict)


@dataclass
class RunContext:
    """What a tool's runner knows about the run, and what it leaves for the experiment."""

    name: str
    tool: Tool
    seed: int
    budget: str
    max_epochs: int | None = None
    timeout: float | None = None
    #: the trained labeltransfer model and the AnnData it annotated (set by the runner)
    model: Any = None
    adata: Any = None

    def epochs(self, part: str) -> int | None:
        """The epoch cap of training ``part`` under this budget (None: the tool's default)."""
        if self.max_epochs is not None:
            return self.max_epochs
        if self.budget == "quick":
            return QUICK_EPOCHS
        caps = self.tool.small_epochs if self.budget == "small" else self.tool.full_epochs
        return caps.get(part)


def _lt(
    display: str,
    recipe: Recipe,
    small: Mapping[str, int],
    full: Mapping[str, int] | None = None,
    peer_table: bool = False,
) -> Tool:
    """A labeltransfer model variant (``small``, ``full``: its epoch caps)."""

    def run(task: Task, ctx: RunContext):
        return run_labeltransfer(recipe, task, ctx)

    return Tool(display, run, "model", small, full or {}, peer_table=peer_table)


_JIND = {"train": 20, "align": 30, "self_train": 10}
_SCNYM_PLANS = {
    "no_mixmatch": {"mixmatch": False},
    "no_adversary": {"adversary_max_weight": 0.0},
    "supervised": {"mixmatch": False, "adversary_max_weight": 0.0},
}
_CELLPREDX_PLANS = {
    "no_pr": {"pr_weight": 0.0},
    "no_cl": {"cl_weight": 0.0},
    "no_fa": {"fa_weight": 0.0},
    "no_sc": {"sc_weight": 0.0},
    "ce_only": {"pr_weight": 0.0, "cl_weight": 0.0, "fa_weight": 0.0, "sc_weight": 0.0},
}

#: Every tool by name, in table order (models first).
TOOLS: dict[str, Tool] = {
    "jind": _lt("JIND", Recipe("JIND", align=True), _JIND, peer_table=True),
    "jind_noalign": _lt("JIND, no alignment", Recipe("JIND"), _JIND),
    "jind_plus": _lt(
        "JIND+ (align + self-train)", Recipe("JIND", align=True, self_train=True), _JIND
    ),
    "scnym": _lt(
        "scNym", Recipe("SCNYM", init=new_identity_when_held_out), {"train": 25}, peer_table=True
    ),
    **{
        f"scnym_{name}": _lt(f"scNym, {name}", Recipe("SCNYM", plan_kwargs=plan), {"train": 25})
        for name, plan in _SCNYM_PLANS.items()
    },
    "scnym_kmeans": _lt(
        "scNym 0.5 cut + k-means", Recipe("SCNYM", kmeans_novel=True), {"train": 25}
    ),
    "scdet": _lt("scDET", Recipe("SCDET", init=true_n_novel), {"train": 25}, peer_table=True),
    "scdet_auto": _lt(
        "scDET, n_novel estimated",
        Recipe("SCDET", init=estimated_n_novel),
        {"train": 25},
        full={"train": 100},  # only the estimate is compared
    ),
    "scdet_reference_genes": _lt(
        "scDET, genes of the reference",
        Recipe("SCDET", init=true_n_novel_reference_genes),
        {"train": 25},
    ),
    "scdet_nodebias": _lt(
        "scDET without logit adjustment + sampling",
        Recipe("SCDET", init=true_n_novel, plan_kwargs={"gamma": 0.0, "alpha": 0.0, "beta": 0.0}),
        {"train": 25},
    ),
    "cellpredx": _lt("CellPredX", Recipe("CellPredX"), {"train": 40}, peer_table=True),
    **{
        f"cellpredx_{name}": _lt(
            f"CellPredX, {name}", Recipe("CellPredX", plan_kwargs=plan), {"train": 40}
        )
        for name, plan in _CELLPREDX_PLANS.items()
    },
    "scanvi": Tool(
        "scANVI", run_scanvi, "peer", {"scvi": 30, "query": 20}, {"query": 100}, peer_table=True
    ),
    "celltypist": Tool(
        "CellTypist",
        run_celltypist,
        "peer",
        uses_torch=False,
        env="celltypist",
        peer_table=True,
        extra_records={"celltypist_mv": "CellTypist+MV"},
    ),
    "scnym_original": Tool(
        "scNym (original)",
        run_scnym_original,
        "peer",
        {"train": 25},
        env="scnym_original",
        peer_table=True,
    ),
    "logreg": Tool("logreg", run_sklearn, "peer", uses_torch=False, peer_table=True),
    "knn": Tool("kNN", run_sklearn, "peer", uses_torch=False, peer_table=True),
}
#: Display name of every record name, in table order; a tool may yield several records.
DISPLAY: dict[str, str] = {}
#: The tool that yields each record name.
RECORD_TOOL: dict[str, str] = {}
for _name, _tool in TOOLS.items():
    for _record, _display in {_name: _tool.display, **_tool.extra_records}.items():
        DISPLAY[_record], RECORD_TOOL[_record] = _display, _name
