"""JIND.align's stopping rule: skip a query as close as held-out reference cells, align a shifted one."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import scvi

import labeltransfer as lt
from labeltransfer.jind._shift import alignment_failure, domain_gap, null_sd

FAST = {"enable_progress_bar": False, "accelerator": "cpu"}


@pytest.fixture(scope="module")
def data():
    """A reference, a random 30% of it held back as a no-shift query, and a shifted query."""
    reference, shifted = lt.data.synthetic(
        n_reference=800, n_query=300, n_genes=200, n_types=4, batch_shift=1.5, seed=11
    )
    is_query = np.random.default_rng(0).random(reference.n_obs) < 0.3
    return reference[~is_query].copy(), reference[is_query].copy(), shifted


@pytest.fixture(scope="module")
def model(data):
    scvi.settings.seed = 0
    reference = data[0].copy()
    lt.JIND.setup_anndata(reference, labels_key="cell_type")
    jind = lt.JIND(reference)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        jind.train(max_epochs=15, **FAST)
    return jind


def test_domain_gap_tells_shifted_codes_from_the_same_distribution():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(300, 8))
    assert abs(domain_gap(reference, rng.normal(size=(300, 8))) - 0.5) < 3 * null_sd(300)
    assert domain_gap(reference, rng.normal(loc=1.0, size=(300, 8))) > 0.95


def test_no_shift_query_skips_the_alignment(model, data):
    query = data[1].copy()
    model.align(query, name="noshift", max_epochs=60, **FAST)
    decision = model.alignments_["noshift"]["decision"]
    assert decision["rule"] == "gap"
    assert decision["shifted"] is False
    assert decision["aligned"] is False
    assert decision["epochs"] == 0
    assert decision["reason"] == "skipped: as close as the held-out reference"
    assert decision["query_gap"] <= decision["target"]
    assert list(model.history["align_domain_gap"].index) == [0]
    model.annotate(query, key_added="j")
    assert query.uns["j"]["aligned"] is False
    assert query.uns["j"]["alignment"] == "noshift"
    assert query.uns["j"]["alignment_decision"]["shifted"] is False
    unaligned = model.predict(query, soft=True, alignment=None)
    np.testing.assert_array_equal(model.predict(query, soft=True).to_numpy(), unaligned.to_numpy())


def test_shifted_query_is_aligned_and_moves_closer(model, data):
    query = data[2].copy()
    scvi.settings.seed = 0
    model.align(query, name="shifted", max_epochs=60, **FAST)
    decision = model.alignments_["shifted"]["decision"]
    assert decision["shifted"] is True
    assert decision["aligned"] is True
    assert decision["undone"] is False
    assert 0.8 <= decision["agreement"] <= 1.0
    # the classifier's gap can stay saturated at 1.0 on this strong a shift (it read 1.0
    # before and after with the packages PyPI served on 2026-12-05), so "closer" is also
    # read on the codes: the query's mean code moved 25 -> 6 from the reference's
    assert decision["final_gap"] <= decision["query_gap"]
    centre = model.get_latent_representation(data[0]).mean(axis=0)
    before = model.get_latent_representation(query, alignment=None).mean(axis=0) - centre
    after = model.get_latent_representation(query, alignment="shifted").mean(axis=0) - centre
    assert np.linalg.norm(after) < 0.5 * np.linalg.norm(before)
    gaps = model.history["align_domain_gap"]
    assert gaps.index[0] == 0
    assert gaps.index[-1] == decision["epochs"]
    model.annotate(query, key_added="j")
    assert query.uns["j"]["aligned"] is True
    assert query.uns["j"]["alignment_decision"]["epochs"] == decision["epochs"]
    # the outputs page names every key written, the decision's included
    outputs = (Path(__file__).parents[2] / "docs" / "outputs.md").read_text()
    for key in [*query.uns["j"], *query.uns["j"]["alignment_decision"]]:
        assert f"`{key}`" in outputs, key


def test_early_stopping_false_runs_every_epoch(model, data):
    query = data[1].copy()
    model.align(query, name="forced", max_epochs=3, early_stopping=False, **FAST)
    assert model.alignments_["forced"]["decision"] is None
    assert len(model.history["align_discriminator_loss"]) == 3
    model.annotate(query, key_added="j")
    assert query.uns["j"]["aligned"] is True
    assert "alignment_decision" not in query.uns["j"]


def test_alignment_failure_reads_the_changed_calls_and_the_gap():
    # the gap closed and most calls stayed: kept (Kang ctrl -> stim: 0.99 -> 0.73, 77% kept)
    assert alignment_failure(0.99, 0.73, agreement=0.77) is None
    # the gap closed by moving a whole population (Granja scATAC, 62% of the calls kept)
    assert alignment_failure(0.79, 0.71, agreement=0.62) == "it changed the calls"
    # the gap did not close but the calls stayed (CellBench Drop-seq -> CEL-seq2)
    assert alignment_failure(0.94, 1.00, agreement=0.98) is None
    # neither: a strongly shifted query (CellBench, gap 1.00 -> 1.00, 68% of calls unchanged)
    open_gap = "it changed the calls and did not close the gap"
    assert alignment_failure(1.00, 1.00, agreement=0.68) == open_gap
    assert alignment_failure(1.00, 0.96, agreement=0.79) == open_gap
    assert alignment_failure(1.00, 0.95, agreement=0.79) is None


def test_an_alignment_that_fails_is_undone_with_a_warning(model, data):
    """Another platform: the generator cannot close the gap and rewrites the calls."""
    query = lt.data.strong_shift(data[1], gene_factor_sd=2, seed=0)
    truth = query.obs["cell_type"].astype(str).to_numpy()
    scvi.settings.seed = 0
    model.align(query, name="forced", max_epochs=60, early_stopping=False, **FAST)
    forced = model.predict(query)
    scvi.settings.seed = 0
    with pytest.warns(UserWarning, match="changed the call of .* so it was undone"):
        model.align(query, name="undone", max_epochs=60, **FAST)
    decision = model.alignments_["undone"]["decision"]
    assert decision["shifted"] is True
    assert decision["undone"] is True
    assert decision["aligned"] is False
    assert decision["reason"] == "undone: it changed the calls and did not close the gap"
    assert decision["final_gap"] > decision["query_gap"] - 0.05
    assert decision["agreement"] < 0.8
    # the stored generator is the identity: the calls are the unaligned model's
    calls = model.predict(query, alignment="undone")
    np.testing.assert_array_equal(calls, model.predict(query, alignment=None))
    assert (calls == truth).mean() > (forced == truth).mean() + 0.1
    model.annotate(query, key_added="j", alignment="undone")
    assert query.uns["j"]["aligned"] is False
    assert query.uns["j"]["alignment_decision"]["undone"] is True


def test_a_query_of_mostly_one_type_is_not_moved_onto_the_reference_proportions(model, data):
    """Distribution matching under label shift: 80% of the query is one type."""
    shifted = data[2]
    types = shifted.obs["cell_type"].astype(str).to_numpy()
    rng = np.random.default_rng(0)
    major = np.flatnonzero(types == "type_0")
    others = rng.choice(np.flatnonzero(types != "type_0"), len(major) // 4, replace=False)
    query = shifted[np.sort(np.r_[major, others])].copy()
    truth = query.obs["cell_type"].astype(str).to_numpy()
    scvi.settings.seed = 0
    model.align(query, name="forced_mostly", max_epochs=60, early_stopping=False, **FAST)
    forced = (model.predict(query) == truth).mean()
    scvi.settings.seed = 0
    with pytest.warns(UserWarning, match="so it was undone"):
        model.align(query, name="mostly", max_epochs=60, **FAST)
    assert model.alignments_["mostly"]["decision"]["undone"] is True
    kept = (model.predict(query, alignment="mostly") == truth).mean()
    assert kept > 0.9
    assert kept > forced + 0.2
