"""Suites of the harness: the peer table and the experiments, one module each.

A suite is an :class:`Experiment` (the ``EXPERIMENT`` of a module here) run with a budget:

- a grid experiment lists ``(tools, tasks)`` blocks of the registries (``_tools.TOOLS``,
  ``_tasks.TASKS``); every tool x task x seed runs in a fresh child through the same runner and
  is scored by ``_scoring.score``; ``extra`` adds the experiment's own measurements;
- a custom experiment (gene activity, backed queries, scaling) gives its own ``configs`` and
  ``child``, and still uses the shared timing helpers (``_common``) and writer (``_writer``).

``sections`` turns the records into the markdown tables of the results file.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

    import pandas as pd
    from _scoring import Calls
    from _tasks import Task
    from _tools import RunContext


@dataclass(frozen=True)
class Experiment:
    """What a suite runs and how its results are shown."""

    title: str
    #: what the suite measures (markdown; the module docstring), written under the header
    about: str
    sections: Callable[[pd.DataFrame, dict[str, Any]], list[str]]
    #: ``(tools, tasks)`` blocks of a grid experiment
    grid: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = ()
    #: extra measurements of a grid run: ``(task, calls, ctx) -> record fields``
    extra: Callable[[Task, Calls, RunContext], dict[str, Any]] | None = None
    #: a custom experiment's configurations ``(budget, seeds, workdir) -> configs``
    configs: Callable[[str, list[int], Path], list[dict[str, Any]]] | None = None
    #: a custom experiment's child: one configuration -> its records
    child: Callable[[dict[str, Any]], list[dict[str, Any]]] | None = None
    #: figures written next to the tables ``(frame, meta, directory) -> paths``
    figures: Callable[[pd.DataFrame, dict[str, Any], Path], list[Path]] | None = None
    seeds: tuple[int, ...] = (0, 1, 2)
    #: run the children one after the other (memory measurements, data written first)
    sequential: bool = False
    #: ``--add`` for a custom experiment: the run a configuration, failure or record belongs
    #: to, by name (a re-run replaces the rows, failures and not-run entries of its runs)
    run_name: Callable[[dict[str, Any]], str] | None = None


@dataclass(frozen=True)
class Suite:
    """An experiment module, the budget it runs with and the stem of its result files."""

    module: str
    budget: str
    output: str
    about: str
    #: run the seeds of a tool x task in one child (saves the interpreter start-up)
    group_seeds: bool = False


#: Every suite by name (``python benchmarks/run.py --suite NAME``).
SUITES: dict[str, Suite] = {
    "small": Suite(
        "peers", "small", "run_small", "peer table, capped epochs, small data", group_seeds=True
    ),
    "full": Suite("peers", "full", "run_full", "peer table, every model's defaults, all cells"),
    "jind": Suite("jind", "full", "jind", "JIND: alignment, JIND+, rejection without shift"),
    "scnym": Suite("scnym", "full", "scnym", "scNym: ablations, domains, new types, markers"),
    "scnym_original": Suite(
        "scnym_original", "full", "scnym_original", "lt.SCNYM next to the original scNym"
    ),
    "scdet": Suite("scdet", "full", "scdet", "scDET: open world, long tail, n_novel estimate"),
    "cellpredx": Suite("cellpredx", "full", "cellpredx", "CellPredX: loss ablations, novel types"),
    "mapping": Suite(
        "mapping", "small", "mapping", "reference mapping (load_query_data) next to retraining"
    ),
    "gene_activity": Suite(
        "gene_activity", "full", "gene_activity", "lt.data.gene_activity: time and memory"
    ),
    "backed": Suite("backed", "full", "backed", "annotating a 1M-cell backed h5ad / zarr query"),
    "scaling": Suite("scaling", "full", "scaling", "each model at 10k, 100k and 1M cells"),
    "endtoend": Suite(
        "endtoend", "full", "endtoend", "time to a result at 100k + 100k cells, next to peers"
    ),
    "endtoend_small": Suite(
        "endtoend", "small", "endtoend_small", "time to a result at 5k + 5k cells, next to peers"
    ),
}


def load_experiment(suite: str) -> Experiment:
    """The experiment of ``suite`` (its module is imported on demand)."""
    return importlib.import_module(f"experiments.{SUITES[suite].module}").EXPERIMENT
