"""Fast checks of the peer benchmark's task construction and scoring (``benchmarks/run.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import _tasks  # noqa: E402
from _peers import Calls, log1p_normalize, on_genes  # noqa: E402


def _load_run():
    """``benchmarks/run.py`` under a unique module name."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_run", BENCHMARKS / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run = _load_run()


def test_every_real_task_has_a_novel_variant():
    assert len(_tasks.TASKS) == 10
    for base, (_, held_out, _) in _tasks.BASE_TASKS.items():
        assert (f"{base}_novel" in _tasks.TASKS) == (held_out is not None)


def test_novel_task_holds_the_type_out_of_the_reference_only(shared_data):
    task = _tasks.load_task("cellbench_c2d_novel", 0, "small")
    assert task.held_out == "H2228"
    assert "H2228" not in set(task.reference.obs["cell_type"])
    assert "H2228" in set(task.query.obs["cell_type"])
    assert task.n_novel == 1
    assert set(task.reference.obs["batch"]) == {"CEL-seq2"}
    assert set(task.query.obs["batch"]) == {"Drop-seq"}
    closed = _tasks.load_task("cellbench_c2d", 0, "small")
    assert closed.n_novel == 0
    assert closed.held_out is None
    assert closed.query.n_obs == task.query.n_obs


def test_small_suite_subsamples_kang_per_seed(shared_data):
    first = _tasks.load_task("kang", 0, "small")
    again = _tasks.load_task("kang", 0, "small")
    other = _tasks.load_task("kang", 1, "small")
    assert first.reference.n_obs == first.query.n_obs == 500
    assert list(first.reference.obs_names) == list(again.reference.obs_names)
    assert list(first.reference.obs_names) != list(other.reference.obs_names)


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
    with pytest.raises(ValueError, match="Unknown task"):
        _tasks.load_task("kang_ctrl", 0)
    with pytest.raises(ValueError, match="Unknown suite"):
        _tasks.load_task("kang", 0, "medium")


def test_log1p_normalize_and_gene_alignment():
    from anndata import AnnData
    from scipy import sparse

    adata = AnnData(sparse.csr_matrix(np.array([[1.0, 3.0], [0.0, 0.0]], dtype=np.float32)))
    adata.var_names = ["a", "b"]
    out = log1p_normalize(adata, 4.0)
    np.testing.assert_allclose(out.X.toarray(), np.log1p([[1.0, 3.0], [0.0, 0.0]]))
    dense = on_genes(out, pd.Index(["b", "missing", "a"]))
    np.testing.assert_allclose(dense[0], np.log1p([3.0, 0.0, 1.0]))


def test_score_uses_the_package_metrics():
    from anndata import AnnData

    truth = np.array(["A", "A", "B", "B", "N"])
    query = AnnData(obs=pd.DataFrame({"cell_type": truth}, index=[f"c{i}" for i in range(5)]))
    task = _tasks.Task("toy", AnnData(obs=query.obs.iloc[:4]), query, "N", False)
    probabilities = pd.DataFrame(
        [[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.5, 0.5]],
        index=query.obs_names,
        columns=["A", "B"],
    )
    record = run.score(task, Calls.from_probabilities(probabilities))
    assert record["raw_accuracy"] == pytest.approx(0.75)
    assert record["rejection_rate"] == 0.0
    assert record["n_novel"] == 1
    # the novel cell has the lowest confidence: perfect open-set AUROC
    assert record["novel_auroc"] == pytest.approx(1.0)


def test_small_suite_groups_seeds_full_suite_does_not():
    small = run._configs("small", [0, 1, 2], ["jind"], ["kang"])
    full = run._configs("full", [0, 1, 2], ["jind"], ["kang"])
    assert [c["seeds"] for c in small] == [[0, 1, 2]]
    assert [c["seeds"] for c in full] == [[0], [1], [2]]
