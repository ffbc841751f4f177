"""Checks of the benchmark harness (``benchmarks/``): registries, splits, scoring, one smoke run."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import _tasks  # noqa: E402
from _peers import log1p_normalize, on_genes  # noqa: E402
from _scoring import Calls, score  # noqa: E402
from _tools import QUICK_EPOCHS, TOOLS, RunContext  # noqa: E402
from experiments import SUITES, load_experiment  # noqa: E402


def _load_run():
    """``benchmarks/run.py`` under a unique module name."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_run", BENCHMARKS / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run = _load_run()


# ----------------------------------------------------------------------------- registries
@pytest.mark.parametrize("suite", list(SUITES))
def test_every_suite_names_registered_tools_and_tasks(suite):
    experiment = load_experiment(suite)
    assert bool(experiment.grid) != bool(experiment.configs)
    for tools, tasks in experiment.grid:
        assert set(tools) <= set(TOOLS), set(tools) - set(TOOLS)
        assert set(tasks) <= set(_tasks.TASKS), set(tasks) - set(_tasks.TASKS)
    if experiment.configs is not None:
        assert experiment.child is not None


def test_every_task_has_a_source():
    for name, spec in _tasks.TASKS.items():
        assert spec.source in _tasks.SOURCES, name


def test_issue_13_novel_tasks_are_registered_and_in_the_peer_table():
    held_out = {name: spec.held_out for name, spec in _tasks.TASKS.items() if spec.held_out}
    assert held_out["kang_novel_b"] == ("B cells",)
    assert held_out["kang_novel_fcgr3a"] == ("FCGR3A+ Monocytes",)
    assert held_out["pbmc68k_novel_cd19b"] == ("CD19+ B",)
    assert held_out["atac_novel_b"] == ("17_B",)
    for direction in ("c2d", "d2c"):
        for line in ("H1975", "H2228", "HCC827"):
            assert held_out[f"cellbench_{direction}_novel_{line.lower()}"] == (line,)
    peer_tasks = set(load_experiment("small").grid[0][1])
    assert set(held_out) <= peer_tasks
    assert "kang_noshift" in peer_tasks


# ----------------------------------------------------------------------------- splits
def test_novel_task_holds_the_type_out_of_the_reference_only(shared_data):
    task = _tasks.load_task("cellbench_c2d_novel_h2228", 0, "small")
    assert task.held_out == ("H2228",)
    assert "H2228" not in set(task.reference.obs["cell_type"])
    assert "H2228" in set(task.query.obs["cell_type"])
    assert task.novel_types == ["H2228"]
    assert set(task.reference.obs["batch"]) == {"CEL-seq2"}
    assert set(task.query.obs["batch"]) == {"Drop-seq"}
    assert task.query.obs["singlet"].dtype == bool
    closed = _tasks.load_task("cellbench_c2d", 0, "small")
    assert closed.n_novel == 0
    assert closed.held_out == ()
    assert closed.query.n_obs == task.query.n_obs


def test_budgets_subsample_real_sets_per_seed(shared_data):
    first = _tasks.load_task("kang", 0, "small")
    again = _tasks.load_task("kang", 0, "small")
    other = _tasks.load_task("kang", 1, "small")
    assert first.reference.n_obs == first.query.n_obs == 500
    assert list(first.reference.obs_names) == list(again.reference.obs_names)
    assert list(first.reference.obs_names) != list(other.reference.obs_names)
    quick = _tasks.load_task("kang", 0, "quick")
    assert quick.reference.n_obs == quick.query.n_obs == 150
    full = _tasks.load_task("kang", 0, "full")
    assert (full.reference.n_obs, full.query.n_obs) == (750, 806)


def test_noshift_task_splits_one_batch_70_30(shared_data):
    task = _tasks.load_task("kang_noshift", 0, "full")
    assert (task.reference.n_obs, task.query.n_obs) == (525, 225)
    assert set(task.reference.obs["batch"]) == set(task.query.obs["batch"]) == {"ctrl"}
    assert not set(task.reference.obs_names) & set(task.query.obs_names)
    assert not task.shifted


def test_strongshift_task_shifts_only_the_query_of_the_plain_task(shared_data):
    plain = _tasks.load_task("kang", 0, "small")
    task = _tasks.load_task("kang_strongshift", 0, "small")
    assert "kang_strongshift" in set(load_experiment("small").grid[0][1])
    assert (task.reference.X != plain.reference.X).nnz == 0
    assert list(task.query.obs_names) == list(plain.query.obs_names)
    assert task.query.obs.equals(plain.query.obs)
    assert task.query.uns["strong_shift"]["seed"] == 0
    assert task.query.X.sum() < 0.6 * plain.query.X.sum()
    assert task.shifted


def test_atac_task_reads_the_granja_donors(shared_data):
    task = _tasks.load_task("atac_novel_b", 0, "full")
    assert set(task.reference.obs["batch"]) == {"BMMC_D6T1"}
    assert set(task.query.obs["batch"]) == {"BMMC_D5T1"}
    assert (task.reference.n_obs, task.query.n_obs) == (492 - 45, 108)
    assert task.novel_types == ["17_B"]
    assert task.reference.n_vars == 5000


def test_kang_samples_task_has_four_domains(shared_data):
    task = _tasks.load_task("kang_samples", 0, "full")
    assert task.multi_domain
    assert set(task.reference.obs["batch"]) == {"ctrl101", "ctrl107"}
    assert set(task.query.obs["batch"]) == {"stim101", "stim107"}


def test_scdet_splits_draw_held_out_types_per_seed(shared_data):
    inter = [_tasks.load_task("kang_inter2", seed, "full") for seed in (0, 1, 2)]
    assert all(len(task.held_out) == 2 == task.n_novel for task in inter)
    assert len({task.held_out for task in inter}) > 1
    intra = _tasks.load_task("cellbench_intra", 0, "full")
    assert len(intra.reference_types) == 2
    assert intra.n_novel == 1
    assert not set(intra.reference.obs_names) & set(intra.query.obs_names)
    assert intra.reference.n_obs + intra.query.n_obs == 499


def test_pbmc68k_counts_are_integers_matching_raw():
    import scanpy as sc

    counts = _tasks.pbmc68k_counts()
    values = counts.X.toarray()
    assert np.array_equal(values, np.round(values))
    assert values.min() >= 0
    pbmc = sc.datasets.pbmc68k_reduced()
    assert list(pbmc.obs_names) == list(counts.obs_names)
    raw = pbmc.raw.X.toarray()
    totals = pbmc.obs["n_counts"].to_numpy()
    rebuilt = np.log1p(values / totals[:, None] * 1e4)
    np.testing.assert_allclose(rebuilt, raw, atol=0.02)


def test_load_task_rejects_unknown_names():
    with pytest.raises(ValueError, match="Unknown task 'kang_ctrl'; use one of kang, "):
        _tasks.load_task("kang_ctrl", 0)
    with pytest.raises(ValueError, match="Unknown budget 'medium'; use one of quick, small, full"):
        _tasks.load_task("kang", 0, "medium")


def test_log1p_normalize_and_gene_alignment():
    from anndata import AnnData
    from scipy import sparse

    adata = AnnData(sparse.csr_matrix(np.array([[1.0, 3.0], [0.0, 0.0]], dtype=np.float32)))
    adata.var_names = ["a", "b"]
    out = log1p_normalize(adata, 4.0)
    np.testing.assert_allclose(out.X.toarray(), np.log1p([[1.0, 3.0], [0.0, 0.0]]))
    np.testing.assert_allclose(adata.X.toarray(), [[1.0, 3.0], [0.0, 0.0]])  # input unchanged
    dense = on_genes(out, pd.Index(["b", "missing", "a"]))
    np.testing.assert_allclose(dense[0], np.log1p([3.0, 0.0, 1.0]))


# ----------------------------------------------------------------------------- scoring
def _toy_task() -> _tasks.Task:
    from anndata import AnnData

    truth = np.array(["A", "A", "B", "B", "N", "N"])
    query = AnnData(obs=pd.DataFrame({"cell_type": truth}, index=[f"c{i}" for i in range(6)]))
    return _tasks.Task("toy", AnnData(obs=query.obs.iloc[:4]), query, ("N",), False)


def _toy_probabilities(task) -> pd.DataFrame:
    return pd.DataFrame(
        [[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.5, 0.5], [0.95, 0.05]],
        index=task.query.obs_names,
        columns=["A", "B"],
    )


def test_score_ranks_held_out_cells_by_one_minus_confidence_without_novelty():
    task = _toy_task()
    record = score(task, Calls.from_probabilities(_toy_probabilities(task)))
    assert record["raw_accuracy"] == pytest.approx(0.75)
    assert record["rejection_rate"] == 0.0
    assert record["n_novel"] == 2
    assert record["novelty_score"] == "1 - confidence"
    # held-out confidences 0.5 and 0.95 against seen 0.9, 0.8, 0.7, 0.6: 4 + 0 of 8 pairs
    assert record["novel_auroc"] == pytest.approx(0.5)
    assert record["novel_rejection_rate"] == 0.0
    assert record["seen_in_novel_groups"] == 0.0


def test_score_uses_the_novelty_score_and_counts_novel_groups():
    task = _toy_task()
    calls = Calls.from_probabilities(_toy_probabilities(task))
    calls.novelty = np.array([0.1, 0.2, 0.1, 0.3, 0.8, 0.9])
    calls.final = np.array(["A", "novel_0", "B", "Unassigned", "novel_0", "novel_0"])
    calls.rejected = np.array([False, False, False, True, False, False])
    record = score(task, calls)
    assert record["novelty_score"] == "novelty"
    assert record["novel_auroc"] == pytest.approx(1.0)
    assert record["novel_rejection_rate"] == 1.0
    assert record["rejection_rate"] == pytest.approx(0.5)  # one novel group, one Unassigned
    assert record["novel_in_groups"] == 1.0
    assert record["novel_group_purity"] == pytest.approx(2 / 3)
    assert record["seen_in_novel_groups"] == pytest.approx(0.25)
    assert record["n_novel_groups"] == 1
    assert record["open_world_novel_accuracy"] == 1.0


# ----------------------------------------------------------------------------- harness
def test_budgets_cap_the_epochs_of_each_training_part():
    jind = TOOLS["jind"]
    assert RunContext("jind", jind, 0, "quick").epochs("align") == QUICK_EPOCHS
    assert RunContext("jind", jind, 0, "small").epochs("align") == 30
    assert RunContext("jind", jind, 0, "full").epochs("align") is None
    assert RunContext("jind", jind, 0, "full", max_epochs=3).epochs("train") == 3
    assert RunContext("scanvi", TOOLS["scanvi"], 0, "full").epochs("query") == 100


def test_small_suite_groups_seeds_full_suite_does_not():
    peers = load_experiment("small")
    args = (peers, SUITES["small"], [0, 1, 2], {"jind"}, {"kang"})
    assert [c["seeds"] for c in run.grid_configs(*args)] == [[0, 1, 2]]
    args = (peers, SUITES["full"], [0, 1, 2], {"jind"}, {"kang"})
    assert [c["seeds"] for c in run.grid_configs(*args)] == [[0], [1], [2]]


def test_merge_replaces_the_redone_rows_only():
    old = pd.DataFrame(
        {"tool": ["jind", "celltypist", "celltypist_mv"], "task": ["kang"] * 3, "seed": [0] * 3}
    )
    old["value"] = 1
    new = pd.DataFrame({"tool": ["celltypist", "celltypist_mv"], "task": ["kang"] * 2})
    new["seed"], new["value"] = 0, 2
    config = {"tool": "celltypist", "task": "kang", "seeds": [0]}
    earlier = {"what": ["celltypist kang"], "commit": "old"}
    kept = {"what": ["scanvi kang"], "commit": "older"}
    old_meta = {
        "failures": [{**config, "error": "boom"}],
        "source_start": "sha0",
        "source_end": "sha0",
        "added": [kept, earlier],
    }
    new_meta = {
        "configs": [config],
        "failures": [],
        "skipped": [],
        "commit": "abc",
        "total_s": 1.0,
        "uptime_start": "up",
        "source_start": "sha",
        "source_end": "sha",
    }
    frame, meta = run.merge(old, old_meta, new, new_meta)
    assert sorted(zip(frame["tool"], frame["value"], strict=True)) == [
        ("celltypist", 2),
        ("celltypist_mv", 2),
        ("jind", 1),
    ]
    assert meta["failures"] == []
    # the re-run every row of which this one replaces is dropped; its own source is recorded
    assert [a["commit"] for a in meta["added"]] == ["older", "abc"]
    assert meta["added"][1]["what"] == ["celltypist kang"]
    assert meta["added"][1]["source_start"] == meta["added"][1]["source_end"] == "sha"
    # the original run's source is left as it was: a re-run is not a change during the run
    assert meta["source_start"] == meta["source_end"] == "sha0"


def _added_meta(configs, skipped):
    keys = ("commit", "total_s", "uptime_start", "source_start", "source_end")
    return {"configs": configs, "failures": [], "skipped": skipped, **dict.fromkeys(keys, "x")}


def test_merge_keeps_the_rows_of_a_configuration_the_re_run_did_not_start():
    old = pd.DataFrame({"tool": ["jind", "scanvi"], "task": ["kang"] * 2, "seed": [0, 0]})
    old["value"] = 1
    new = pd.DataFrame({"tool": ["jind"], "task": ["kang"], "seed": [0], "value": [2]})
    configs = [{"tool": t, "task": "kang", "seeds": [0]} for t in ("jind", "scanvi")]
    old_meta = {"failures": [], "skipped": []}
    frame, meta = run.merge(old, old_meta, new, _added_meta(configs, configs[1:]))
    assert sorted(zip(frame["tool"], frame["value"], strict=True)) == [("jind", 2), ("scanvi", 1)]
    assert meta["skipped"] == []  # scanvi's old rows stand
    assert meta["added"][0]["what"] == ["jind kang"]


def test_endtoend_add_replaces_the_data_rows_and_lists_what_is_still_missing(tmp_path):
    from experiments import endtoend

    def row(step, data, tool=None, threads=None, value=1):
        return {"step": step, "data": data, "tool": tool, "threads": threads, "value": value}

    old = pd.DataFrame(
        [row("data", "kang"), row("tool", "kang", "jind", 1.0)]  # as read back from the CSV
    )
    configs = endtoend.configs("full", [0], tmp_path)
    kang = [c for c in configs if c["data"] == "kang"]
    old_meta = {
        "failures": [{**kang[1], "error": "boom"}],  # jind, 1 thread: redone below
        "skipped": [c for c in kang if c.get("n_threads") == 2],
    }
    ran = [c for c in kang if c.get("method") in (None, "scnym")]
    new_configs = ran + [c for c in kang if c.get("method") == "scanvi"]
    new = pd.DataFrame([row("data", "kang", value=2), row("tool", "kang", "scnym", 1, 2)])
    skipped = [c for c in new_configs if c not in ran or c.get("n_threads") == 2]
    name = endtoend.run_name
    frame, meta = run.merge(
        old, old_meta, new, _added_meta(new_configs, skipped), lambda i: {name(i)}, name
    )
    assert sorted(frame.apply(lambda r: (name(r), r["value"]), axis=1)) == [
        ("jind kang, 1 thread", 1),
        ("kang data", 2),
        ("scnym kang, 1 thread", 2),
    ]
    assert [f["method"] for f in meta["failures"]] == ["jind"]  # not redone: it stays
    missing = [name(c) for c in meta["skipped"]]
    assert sorted(missing) == sorted(
        [f"{t} kang, 2 threads" for t in endtoend.TOOL_NAMES] + ["scanvi kang, 1 thread"]
    )
    assert meta["added"][0]["what"] == ["kang data", "scnym kang, 1 thread"]


def test_grid_options_are_refused_for_custom_suites(capsys):
    with pytest.raises(SystemExit, match="--tasks applies to grid suites"):
        run.main(["--suite", "scaling", "--tasks", "kang"])
    with pytest.raises(SystemExit, match="--add applies to grid suites and endtoend; scaling"):
        run.main(["--suite", "scaling", "--add"])
    with pytest.raises(SystemExit, match="--tools applies to suites that run tools; scaling"):
        run.main(["--suite", "scaling", "--tools", "jind"])


def test_tools_option_keeps_the_data_steps_of_a_custom_suite(tmp_path):
    from experiments import endtoend

    configs = run.only_tools(endtoend.configs("small", [0], tmp_path), ["jind", "logreg"], "e")
    assert [c.get("method") for c in configs] == [None, None] + ["jind", "logreg"] * 2


def test_endtoend_suite_writes_each_data_set_before_its_tools_at_each_thread_count(tmp_path):
    from experiments import endtoend

    configs = endtoend.configs("full", [0], tmp_path)
    n_data = len(endtoend.DATASETS)
    assert [c["step"] for c in configs[:n_data]] == ["data"] * n_data
    threads = [c["n_threads"] for c in configs[n_data:]]
    assert threads == sorted(threads)  # every one-thread run before the two-thread runs
    for data in endtoend.DATASETS:
        steps = [c for c in configs if c["data"] == data]
        assert steps[0]["step"] == "data"
        assert {c["dir"] for c in steps} == {str(tmp_path / data)}
        runs = {(c["method"], c["n_threads"]) for c in steps[1:]}
        assert runs == {(t, n) for t in endtoend.TOOL_NAMES for n in (1, 2)}
        assert {c["size"] for c in steps} == {100_000}
    assert set(endtoend.TOOL_NAMES) <= set(TOOLS)
    small = endtoend.configs("small", [0], tmp_path)
    assert {c.get("n_threads") for c in small} == {None, 1}


def test_endtoend_resampling_draws_distinct_thinned_cells():
    from anndata import AnnData
    from experiments.endtoend import THINNING, resample
    from scipy import sparse

    rng = np.random.default_rng(0)
    counts = rng.poisson(20.0, (5, 30)).astype(np.float32)
    cells = AnnData(sparse.csr_matrix(counts), obs=pd.DataFrame(index=[f"c{i}" for i in range(5)]))
    drawn = resample(cells, 200, np.random.default_rng(1))
    assert drawn.shape == (200, 30)
    assert drawn.obs_names.is_unique
    origin = [int(name.split("-")[0][1:]) for name in drawn.obs_names]
    dense = drawn.X.toarray()
    assert (dense <= counts[origin]).all()  # thinned, never more than the source cell
    kept = dense.sum() / counts[origin].sum()
    assert abs(kept - THINNING) < 0.01
    assert len({row.tobytes() for row in dense}) == 200  # no two drawn cells alike
    assert np.array_equal(dense, np.round(dense))  # still counts


def test_stop_after_skips_the_children_whose_turn_comes_late(tmp_path):
    from _writer import skipped

    configs = [{"suite": "small", "tool": "logreg", "task": "kang", "seeds": [0]}] * 3
    records, failures, late = run.run_configs(configs, 1, 1, 60.0, stop_after=-1.0)
    assert (records, failures, late) == ([], [], configs)  # no child was started
    text = "\n".join(skipped({"skipped": late}))
    assert "## Not run (`--stop-after` reached)" in text
    assert text.count('"tool": "logreg"') == 3


@pytest.mark.slow
def test_quick_run_of_one_model_and_one_peer_writes_every_column(shared_data, tmp_path):
    out = tmp_path / "smoke.csv"
    argv = ["--suite", "small", "--quick", "--tools", "jind", "logreg"]
    status = run.main([*argv, "--tasks", "cellbench_c2d_novel_h2228", "--out", str(out)])
    assert status == 0
    frame = pd.read_csv(out)
    assert sorted(frame["tool"]) == ["jind", "logreg"]
    assert set(frame["task"]) == {"cellbench_c2d_novel_h2228"}
    expected = {
        "seed",
        "budget",
        "commit",
        "n_reference",
        "n_query",
        "held_out",
        "raw_accuracy",
        "rejection_rate",
        "effective_accuracy",
        "macro_f1",
        "kappa",
        "ece",
        "novel_auroc",
        "novel_rejection_rate",
        "novel_in_groups",
        "seen_in_novel_groups",
        "novelty_score",
        "singlet_accuracy",
        "train_s",
        "predict_s",
        "peak_rss_mb",
    }
    assert expected <= set(frame.columns), expected - set(frame.columns)
    assert (frame["n_query"] == 150).all()
    assert frame["novel_auroc"].between(0, 1).all()
    jind = frame[frame["tool"] == "jind"].iloc[0]
    assert jind["train_epochs"] == QUICK_EPOCHS
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["budget"] == "quick"
    assert meta["commit"] == frame["commit"].iloc[0]
    assert meta["machine"]["cores"] >= 1
    text = out.with_suffix(".md").read_text()
    assert f"commit `{meta['commit']}`" in text
    assert "<!-- table:novel_auroc -->" in text


def test_score_balanced_accuracy_weighs_each_seen_type_equally():
    from anndata import AnnData

    truth = np.array(["A", "A", "A", "B", "N"])
    query = AnnData(obs=pd.DataFrame({"cell_type": truth}, index=[f"c{i}" for i in range(5)]))
    task = _tasks.Task("toy", AnnData(obs=query.obs.iloc[:4]), query, ("N",), False)
    probabilities = pd.DataFrame(
        [[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4], [0.5, 0.5]],
        index=task.query.obs_names,
        columns=["A", "B"],
    )
    record = score(task, Calls.from_probabilities(probabilities))
    assert record["raw_accuracy"] == pytest.approx(0.75)  # every seen cell called A
    assert record["balanced_accuracy"] == pytest.approx(0.5)  # A 3/3, B 0/1


def test_scaling_records_the_linear_calls_of_the_training_epoch_only():
    import torch
    from experiments.scaling import LinearFlops, _torch_train_bound_s

    network = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    counter = LinearFlops(network)
    network(torch.randn(3, 6))  # not recording: counted as FLOPs, not as a call
    counter.recording = True
    network(torch.randn(5, 6)).sum().backward()
    with torch.no_grad():
        network(torch.randn(5, 6))
    counter.remove()
    network(torch.randn(5, 6))  # hooks removed
    assert counter.calls == {
        (5, 6, 4, True, False): 1,  # the data need no gradient
        (5, 4, 2, True, True): 1,  # a hidden layer's input does
        (5, 6, 4, False, False): 1,
        (5, 4, 2, False, False): 1,
    }
    assert counter.grad == 2 * 3 * 6 * 4 + 2 * 3 * 4 * 2 + 2 * 5 * (6 * 4 + 4 * 2)
    assert _torch_train_bound_s(Counter()) == 0.0
    assert 0.0 < _torch_train_bound_s(counter.calls, repeats=2) < float("inf")


def test_failed_runs_show_the_error_or_the_timeout():
    from _writer import failures

    crashed = {"tool": "jind", "task": "kang", "error": "Traceback\n  ...\nValueError: bad\n"}
    stopped = {"tool": "scnym", "task": "kang", "error": "timed out after 60 s\nEpoch 3/400"}
    lines = failures({"failures": [crashed, stopped]})
    assert lines[2].endswith("`ValueError: bad`")
    assert lines[3].endswith("`timed out after 60 s`")
    assert failures({"failures": []}) == []
