"""The benchmark harness: one entry point for the peer table and every experiment.

Every run of a suite executes each configuration (a tool on a task for some seeds, or an
experiment's own step) in a fresh child process (``--jobs`` at a time, one torch / BLAS thread
each), collects its ``RESULT`` records and writes ``<output>.{csv,json,md}`` with the source
commit and the machine (``_writer.py``). Registries: tasks in ``_tasks.py``, tools in
``_tools.py``, suites in ``experiments/__init__.py``. See ``benchmarks/README.md``.

Usage::

    python benchmarks/run.py --list                        # suites, tasks and tools
    python benchmarks/run.py --suite small                 # -> results/run_small.* + plots
    python benchmarks/run.py --suite full                  # -> results/run_full.* + plots
    python benchmarks/run.py --suite jind                  # an experiment -> results/jind.*
    python benchmarks/run.py --suite scdet --quick         # smoke run -> .benchmarks/quick/
    python benchmarks/run.py --suite small --markdown-only # tables and plots from the CSV
    python benchmarks/run.py --suite small --add --tools cellpredx --tasks kang  # redo a child
    python benchmarks/run.py --suite endtoend --add --tools scnym  # add a tool's runs
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    ROOT,
    emit,
    machine_info,
    peak_rss_mb,
    quiet_child,
    reset_peak_rss,
    run_child,
    source_commit,
    source_fingerprint,
    uptime,
)
from _tasks import TASKS, describe_tasks, load_task
from _tools import RECORD_TOOL, TOOLS, RunContext
from experiments import SUITES, load_experiment

if TYPE_CHECKING:
    from collections.abc import Iterator

    import pandas as pd
    from experiments import Experiment, Suite

RESULTS = ROOT / "benchmarks" / "results"
FIGURES = ROOT / "docs" / "_static" / "benchmarks"
#: Where ``--quick`` (smoke) runs write (git-ignored): never over the published results.
QUICK_RESULTS = ROOT / ".benchmarks" / "quick"


# ============================================================================ child
def grid_child(config: dict[str, Any], experiment: Experiment) -> Iterator[dict[str, Any]]:
    """Run one tool on one task for each seed of ``config``; yield the scored records."""
    from _scoring import score

    tool = TOOLS[config["tool"]]
    if tool.uses_torch:  # the other children never import torch (labeltransfer imports lazily)
        import torch

        torch.set_num_threads(config["threads"])
    for seed in config["seeds"]:
        base = {
            "tool": config["tool"],
            "task": config["task"],
            "seed": seed,
            "budget": config["budget"],
            "peak_reset": reset_peak_rss(),
            "load_1min_start": os.getloadavg()[0],
        }
        if tool.uses_torch:
            import scvi

            scvi.settings.seed = seed
        start = time.perf_counter()
        task = load_task(config["task"], seed, config["budget"])
        base.update(
            data_s=time.perf_counter() - start,
            n_reference=int(task.reference.n_obs),
            n_query=int(task.query.n_obs),
            held_out="; ".join(task.held_out),
        )
        ctx = RunContext(
            config["tool"], tool, seed, config["budget"], config["max_epochs"], config["timeout"]
        )
        results = tool.run(task, ctx)
        peak = peak_rss_mb()
        for name, (calls, info) in results.items():
            # a peer run in its own environment reports the peak of that process in ``info``
            record = {**base, "peak_rss_mb": peak, **info, "tool": name, **score(task, calls)}
            if experiment.extra is not None:
                record.update(experiment.extra(task, calls, ctx))
            yield record


def child(config: dict[str, Any]) -> None:
    """Run one configuration and print its records."""
    quiet_child()
    experiment = load_experiment(config["suite"])
    if "tool" in config:
        records = grid_child(config, experiment)
    else:
        records = experiment.child(config)
    for record in records:
        emit(record)


# ============================================================================ parent
def grid_configs(
    experiment: Experiment, suite: Suite, seeds: list[int], tools: set[str], tasks: set[str]
) -> list[dict[str, Any]]:
    """Tool x task configurations of a grid experiment, seed by seed (interleaved)."""
    groups = [seeds] if suite.group_seeds else [[seed] for seed in seeds]
    return [
        {"tool": tool, "task": task, "seeds": group}
        for group in groups
        for block_tools, block_tasks in experiment.grid
        for task in block_tasks
        if task in tasks
        for tool in block_tools
        if tool in tools
    ]


def only_tools(
    configs: list[dict[str, Any]], tools: list[str], suite: str
) -> list[dict[str, Any]]:
    """A custom suite's steps that run one of ``tools`` (named ``"method"``) or no tool.

    Raises
    ------
    SystemExit
        No step of ``suite`` runs a tool.
    """
    if not any("method" in c for c in configs):
        sys.exit(f"--tools applies to suites that run tools; {suite} does not.")
    return [c for c in configs if "method" not in c or c["method"] in tools]


def run_configs(
    configs: list[dict[str, Any]],
    jobs: int,
    threads: int,
    timeout: float,
    stop_after: float | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Run every config in a fresh child, ``jobs`` at a time; records, failures, skipped.

    A config whose turn comes more than ``stop_after`` seconds after the start is skipped
    (not started), so that a long suite fits the time there is and keeps what finished.
    """
    start = time.perf_counter()

    def one(position: int) -> tuple[list[dict[str, Any]], dict[str, Any] | None, bool]:
        config = configs[position]
        if stop_after is not None and time.perf_counter() - start > stop_after:
            return [], None, True
        # an experiment may set a child's thread count (``n_threads``), e.g. to compare 1 and 2
        count = str(config.get("n_threads", threads))
        threading = dict.fromkeys(
            ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"), count
        )
        records, error, wall = run_child(
            [__file__, "--child", json.dumps(config)], timeout=timeout, env=threading
        )
        shown = {k: v for k, v in config.items() if k not in ("suite", "budget", "timeout")}
        tag = f"[{position + 1}/{len(configs)}] {json.dumps(shown)}"
        print(f"{tag}: {len(records)} records in {wall:.0f} s", flush=True)
        if error:
            print(f"{tag}: FAILED\n{error}", flush=True)
            return records, {**config, "error": error}, False
        return records, None, False

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(one, range(len(configs))))
    records = [r for found, _, _ in results for r in found]
    failures = [failure for _, failure, _ in results if failure is not None]
    skipped = [config for config, (_, _, late) in zip(configs, results, strict=True) if late]
    return records, failures, skipped


def grid_runs(item: dict[str, Any]) -> set[tuple]:
    """The (tool, task, seed) runs of a grid configuration, failure or record."""
    if "seeds" in item:
        return {(item["tool"], item["task"], seed) for seed in item["seeds"]}
    return {(RECORD_TOOL[item["tool"]], item["task"], item["seed"])}


def merge(
    old: pd.DataFrame,
    old_meta: dict,
    new: pd.DataFrame,
    new_meta: dict,
    runs_of: Callable[[dict[str, Any]], set] = grid_runs,
    label: Callable[[dict[str, Any]], str] = lambda c: f"{c['tool']} {c['task']}",
):
    """Replace the rows, failures and not-run entries of ``old`` that the ``--add`` run redid.

    ``runs_of`` gives the runs (hashable) a configuration, failure or record belongs to;
    ``label`` names a configuration in the "re-run" line of the results.
    """
    import pandas as pd

    def runs(items) -> set:
        return set().union(*(runs_of(item) for item in items))

    # a configuration the re-run did not start (``--stop-after``) replaces nothing
    redone = runs(new_meta["configs"]) - runs(new_meta["skipped"])
    records = old.to_dict("records")
    keep = [not runs_of(r) & redone for r in records]
    meta = dict(old_meta)
    meta["failures"] = [f for f in old_meta["failures"] if not runs_of(f) & redone] + new_meta[
        "failures"
    ]
    skipped = [s for s in old_meta.get("skipped", []) if not runs_of(s) & redone]
    listed = runs(r for r, kept in zip(records, keep, strict=True) if kept) | runs(skipped)
    meta["skipped"] = skipped + [s for s in new_meta["skipped"] if not runs_of(s) <= listed]
    what = sorted({label(c) for c in new_meta["configs"] if runs_of(c) & redone})
    keys = ("commit", "total_s", "uptime_start", "source_start", "source_end")
    added = {k: new_meta[k] for k in keys}
    if "command" in new_meta:
        added["command"] = new_meta["command"]
    # an earlier re-run whose rows this one all replaces no longer describes any row
    earlier = [a for a in old_meta.get("added", []) if not set(a["what"]) <= set(what)]
    meta["added"] = [*earlier, {**added, "what": what}]
    return pd.concat([old[keep], new], ignore_index=True), meta


def list_registries() -> str:
    """The suites, tasks and tools, one per line."""
    lines = ["Suites (--suite):"]
    lines += [f"  {name:<16} {suite.about}" for name, suite in SUITES.items()]
    lines += ["Tasks (--tasks):"]
    lines += [f"  {name:<28} {spec.about}" for name, spec in TASKS.items()]
    lines += ["Tools (--tools):"]
    lines += [f"  {name:<20} {tool.display} ({tool.kind})" for name, tool in TOOLS.items()]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=list(SUITES), default="small")
    parser.add_argument("--list", action="store_true", help="list suites, tasks and tools")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: seed 0, at most 150 cells per side, 2 epochs per training part; "
        "writes to .benchmarks/quick/",
    )
    parser.add_argument(
        "--budget",
        choices=["small", "full"],
        help="the suite's budget otherwise (e.g. `--suite scaling --budget small`: 10,000 and "
        "100,000 cells only)",
    )
    parser.add_argument("--max-epochs", type=int, help="cap every training part of every tool")
    parser.add_argument("--seeds", type=int, nargs="+", help="default: the suite's (0 1 2)")
    parser.add_argument(
        "--tools", nargs="+", choices=list(TOOLS), help="only these (grid suites, endtoend)"
    )
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), help="grid suites: only these")
    parser.add_argument("--jobs", type=int, default=2, help="children at the same time")
    parser.add_argument("--threads", type=int, default=1, help="torch / BLAS threads per child")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per child")
    parser.add_argument(
        "--stop-after",
        type=float,
        help="start no child after this many seconds; what finished is written, the rest "
        "listed as not run",
    )
    parser.add_argument("--out", type=Path, help="CSV path (default: results/<suite output>.csv)")
    parser.add_argument("--markdown-only", action="store_true", help="tables from the CSV")
    parser.add_argument(
        "--add",
        action="store_true",
        help="grid suites and endtoend: run only --tools (x --tasks) and merge them into the "
        "existing CSV, replacing their rows (e.g. to redo a failed child, or add a tool)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run a suite (or one child); return the exit status (1 when a run failed)."""
    args = parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    if args.list:
        print(list_registries())
        return 0
    import pandas as pd
    from _envs import env_python
    from _writer import read, write

    suite, experiment = SUITES[args.suite], load_experiment(args.suite)
    budget = "quick" if args.quick else args.budget or suite.budget
    out = args.out or (QUICK_RESULTS if args.quick else RESULTS) / f"{suite.output}.csv"
    if args.tasks and not experiment.grid:
        sys.exit(f"--tasks applies to grid suites; {args.suite} is not one.")
    if args.add and not (experiment.grid or experiment.run_name):
        sys.exit(f"--add applies to grid suites and endtoend; {args.suite} is neither.")
    if args.markdown_only:
        frame, meta = read(out)
    else:
        seeds = args.seeds or ([0] if args.quick else list(experiment.seeds))
        start, workdir = time.perf_counter(), tempfile.TemporaryDirectory(prefix="lt_bench_")
        if experiment.grid:
            tools = set(args.tools or TOOLS)
            tasks = set(args.tasks or TASKS)
            configs = grid_configs(experiment, suite, seeds, tools, tasks)
        else:
            configs = experiment.configs(budget, seeds, Path(workdir.name))
            if args.tools:
                configs = only_tools(configs, args.tools, args.suite)
        if not configs:
            sys.exit(f"Nothing to run: no tool of --tools runs a task of --tasks in {args.suite}.")
        # every peer environment is made before any child runs (a custom suite names its
        # tools "method"), so that no timed run pays for creating one
        names = {c.get("tool", c.get("method")) for c in configs} - {None}
        for env in sorted({TOOLS[name].env for name in names} - {None}):
            print(f"{env} environment: {env_python(env)}", flush=True)
        shared = {
            "suite": args.suite,
            "budget": budget,
            "max_epochs": args.max_epochs,
            "threads": args.threads,
            "timeout": args.timeout,
        }
        configs = [{**config, **shared} for config in configs]
        meta: dict[str, Any] = {
            "suite": args.suite,
            "budget": budget,
            "command": shlex.join(["python", "benchmarks/run.py", *(argv or sys.argv[1:])]),
            "commit": source_commit(),
            "source_start": source_fingerprint(),
            "machine": machine_info(),
            "uptime_start": uptime(),
            "jobs": 1 if experiment.sequential else args.jobs,
        }
        print(f"{len(configs)} children, {meta['jobs']} at a time; {meta['uptime_start']}")
        with workdir:
            records, failures, skipped = run_configs(
                configs, meta["jobs"], args.threads, args.timeout, args.stop_after
            )
        meta.update(
            total_s=time.perf_counter() - start,
            n_children=len(configs),
            uptime_end=uptime(),
            source_end=source_fingerprint(),
            failures=failures,
            skipped=skipped,
            configs=configs,
        )
        frame = pd.DataFrame(records)
        frame["commit"] = meta["commit"]
        if args.add:
            name = experiment.run_name
            custom = {"runs_of": lambda item: {name(item)}, "label": name} if name else {}
            frame, meta = merge(*read(out), frame, meta, **custom)
        if experiment.grid:
            ran = set(frame["task"]) if "task" in frame else set()
            meta["tasks"] = describe_tasks([t for t in TASKS if t in ran], budget)
    text = write(frame, meta, out, experiment)
    if experiment.figures is not None and not frame.empty:
        figures = out.parent if args.quick or args.out else FIGURES
        experiment.figures(frame, meta, figures)
    print(text)
    print(f"written: {out.with_suffix('.{csv,json,md}')}")
    if meta.get("skipped"):
        print(f"{len(meta['skipped'])} configurations not run (--stop-after reached).")
    return 1 if meta["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
