"""Domain-specific batch normalisation (base/_domain_stats.py): each domain its own statistics."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import labeltransfer as lt
from labeltransfer.base import _domain_stats, _inference
from labeltransfer.base._domain_stats import (
    STATISTICS_CELLS,
    fit_statistics,
    norm_states,
    statistics_rows,
    using_statistics,
)

FAST = {"accelerator": "cpu", "enable_progress_bar": False}


class _Tiny(nn.Module):
    """The module contract the helpers use: ``_get_inference_input`` and ``inference``."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 4)
        self.norm = nn.BatchNorm1d(4)
        self.drop = nn.Dropout(0.5)

    def _get_inference_input(self, tensors):
        return {"x": tensors["X"]}

    def inference(self, x):
        return {"z": self.drop(self.norm(self.linear(x)))}


def test_fit_statistics_gives_the_batches_moments_without_dropout():
    torch.manual_seed(0)
    module = _Tiny()
    batches = [{"X": torch.randn(50, 3) * 3 + 1} for _ in range(4)]
    fit_statistics(module, batches)
    with torch.no_grad():
        hidden = [module.linear(b["X"]) for b in batches]
    expected_mean = torch.stack([h.mean(0) for h in hidden]).mean(0)
    expected_var = torch.stack([h.var(0) for h in hidden]).mean(0)  # unbiased, as BatchNorm
    torch.testing.assert_close(module.norm.running_mean, expected_mean)
    torch.testing.assert_close(module.norm.running_var, expected_var)
    assert module.norm.momentum == 0.1  # left as found
    assert not module.training


def test_fit_statistics_skips_one_cell_batches():
    module = _Tiny()
    fit_statistics(module, [{"X": torch.randn(1, 3)}, {"X": torch.ones(8, 3)}])
    with torch.no_grad():
        expected = module.linear(torch.ones(8, 3)).mean(0)
    torch.testing.assert_close(module.norm.running_mean, expected)


def test_using_statistics_restores_the_reference_statistics_also_after_an_error():
    module = _Tiny()
    before = {k: v.clone() for k, v in module.norm.state_dict().items()}
    with using_statistics(module, norm_states(module)):
        fit_statistics(module, [{"X": torch.randn(20, 3) + 5}])
        query = norm_states(module)
    seen = []

    def fails() -> None:
        with using_statistics(module, query):
            seen.append(module.norm.running_mean.clone())
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fails()
    assert not torch.equal(seen[0], before["running_mean"])  # the query's, inside
    for key, value in module.norm.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_statistics_rows_are_evenly_spaced_and_bounded():
    rows = np.arange(5, 5 + 3 * STATISTICS_CELLS, 3)
    picked = statistics_rows(rows)
    assert picked.size == STATISTICS_CELLS
    assert picked[0] == rows[0]
    assert picked[-1] == rows[-1]
    assert np.all(np.diff(picked) > 0)
    np.testing.assert_array_equal(statistics_rows(rows[:10]), rows[:10])


@pytest.fixture(scope="module")
def shifted():
    """Reference and a strongly shifted query of four synthetic types, registered together."""
    reference, query = lt.data.synthetic(
        n_reference=400, n_query=300, n_genes=500, n_types=4, n_markers=25, batch_shift=0.0, seed=3
    )
    query = lt.data.strong_shift(query, seed=0)
    truth = query.obs["cell_type"].astype(str).to_numpy()
    query.obs = query.obs[["batch"]]
    return reference, query, truth


def _trained(model_cls, shifted, **init):
    reference, query, _ = shifted
    adata = lt.data.concat_reference_query(reference.copy(), query.copy(), labels_key="cell_type")
    model_cls.setup_anndata(adata, labels_key="cell_type")
    model = model_cls(adata, **init)
    model.train(max_epochs=30, **FAST)
    return model, adata


@pytest.fixture(scope="module")
def scnym(shifted):
    return _trained(lt.SCNYM, shifted)


def test_query_statistics_decide_the_calls_of_a_shifted_query(scnym, shifted, monkeypatch):
    """With the reference's statistics the shifted query is called far worse (the fix)."""
    model, _ = scnym
    _, query, truth = shifted
    own = (np.asarray(model.predict(query)) == truth).mean()
    # no query cell for the statistics: too few, so the reference's are kept
    monkeypatch.setattr(_domain_stats, "statistics_rows", lambda rows: rows[:0])
    reference_stats = (np.asarray(model.predict(query)) == truth).mean()
    assert own > reference_stats + 0.1


def test_a_query_gets_the_same_calls_alone_or_registered_with_the_reference(scnym, shifted):
    model, adata = scnym
    is_query = (adata.obs["lt_role"] == "query").to_numpy()
    together = model.predict(soft=True).to_numpy()[is_query]
    alone = model.predict(shifted[1], soft=True).to_numpy()
    np.testing.assert_allclose(alone, together, rtol=1e-5, atol=1e-6)


def test_reference_cells_keep_the_reference_statistics(scnym):
    """The reference cells' outputs do not depend on the query registered with them."""
    model, adata = scnym
    is_reference = (adata.obs["lt_role"] == "reference").to_numpy()
    with_query = model.predict(soft=True).to_numpy()[is_reference]
    direct = model._forward(adata, indices=np.flatnonzero(is_reference)).logits
    np.testing.assert_allclose(with_query, model._probabilities(direct), rtol=1e-5, atol=1e-6)


def test_a_query_read_by_chunks_gets_its_in_memory_annotation(
    scnym, shifted, tmp_path, monkeypatch
):
    """Backed, its statistics and residual axes come from samples, then 37-cell chunks."""
    model, _ = scnym
    query = shifted[1]
    expected = model.annotate(query, key_added="scnym", copy=True)
    query.write_h5ad(tmp_path / "query.h5ad")
    monkeypatch.setattr(_inference, "BACKED_CHUNK_SIZE", 37)
    registered = []  # AnnDatas registered with the model at each forward pass
    forward = type(model)._forward

    def counting_forward(self, adata, **kwargs):
        registered.append(len(self._per_instance_manager_store[self.id]))
        return forward(self, adata, **kwargs)

    monkeypatch.setattr(type(model), "_forward", counting_forward)
    backed = ad.read_h5ad(tmp_path / "query.h5ad", backed="r")
    model.annotate(backed, key_added="scnym")
    # the model's own data and the statistics sample or one chunk: the sample is released
    # once the statistics are set, before the chunks are read
    assert max(registered) == 2
    for column in ("scnym", "scnym_prediction", "scnym_rejected"):
        pd.testing.assert_series_equal(backed.obs[column], expected.obs[column])
    for column in ("scnym_confidence", "scnym_novelty"):
        np.testing.assert_allclose(backed.obs[column], expected.obs[column], rtol=1e-5)
    backed.file.close()


def test_a_query_too_small_for_statistics_keeps_the_reference_statistics(scnym, shifted):
    model, _ = scnym
    few = shifted[1][: _domain_stats.MIN_STATISTICS_CELLS - 1].copy()
    registered, _ = model._prepare(few)
    direct = model._probabilities(model._forward(registered).logits)
    model._release(registered)
    np.testing.assert_allclose(model.predict(few, soft=True).to_numpy(), direct, rtol=1e-5)


def test_balanced_rows_follow_the_reference_proportions_within_the_cap():
    rows = np.arange(100, 200)
    called = np.repeat([0, 1, 2], [80, 15, 5])
    kept = _domain_stats.balanced_rows(rows, called, np.array([0.4, 0.4, 0.2]))
    by_type = np.bincount(called[kept - 100], minlength=3)
    # targets 40, 40, 20 of 100 rows; type 2 may grow at most 5-fold (5 -> 20 is 4-fold)
    np.testing.assert_array_equal(by_type, [40, 40, 20])
    assert np.all(np.diff(kept) >= 0)
    assert set(kept) <= set(rows)
    capped = _domain_stats.balanced_rows(rows, called, np.array([0.1, 0.1, 0.8]))
    # type 2 wants 80 rows but grows 5-fold at most; type 0 shrinks 5-fold at most
    np.testing.assert_array_equal(np.bincount(called[capped - 100], minlength=3), [16, 10, 25])
    absent = _domain_stats.balanced_rows(rows[:95], called[:95], np.array([0.4, 0.4, 0.2]))
    # type 2 never called: its share goes to the others (47.5 rows each, rounded to even)
    np.testing.assert_array_equal(np.bincount(called[absent - 100], minlength=3), [48, 48, 0])


def _fitted(module, loader) -> list[dict[str, torch.Tensor]]:
    with using_statistics(module, norm_states(module)):
        fit_statistics(module, loader)
        return norm_states(module)


def test_the_weighting_stops_once_a_round_repeats_the_calls(scnym, shifted, monkeypatch):
    """A round that calls every cell as the one before ends the rounds, with the statistics
    every round would have given (the loop written out below, without the stop), and keeps
    the statistics that round fitted instead of fitting them again. The reference's cells as
    a new query: their calls settle at once. The module's own statistics are left as found."""
    model, _ = scnym
    registered, _ = model._prepare(shifted[0])
    sample = statistics_rows(np.arange(registered.n_obs))
    proportions = np.asarray(model.reference_proportions_, dtype=float)
    before = norm_states(model.module)
    forward, fit = type(model)._forward, _domain_stats.fit_statistics
    passes, fits = [], []

    def counting_forward(self, adata, **kwargs):
        passes.append(adata.n_obs)
        return forward(self, adata, **kwargs)

    def counting_fit(module, batches):
        fits.append(1)
        return fit(module, batches)

    monkeypatch.setattr(type(model), "_forward", counting_forward)
    monkeypatch.setattr(_domain_stats, "fit_statistics", counting_fit)
    ours = model._query_statistics(registered, sample)
    monkeypatch.undo()
    expected = _fitted(model.module, model._statistics_loader(registered, sample))
    for _ in range(_domain_stats.BALANCE_ROUNDS):
        with using_statistics(model.module, expected):
            logits = model._forward(registered, indices=sample, return_latent=False).logits
        rows = _domain_stats.balanced_rows(sample, logits.argmax(axis=1), proportions)
        expected = _fitted(
            model.module,
            model._batches(registered, rows, _domain_stats.STATISTICS_BATCH_SIZE, normalized=True),
        )
    try:
        assert len(passes) < _domain_stats.BALANCE_ROUNDS
        assert len(fits) == len(passes)  # one fit per round: none repeated at the end
        for state, want in zip(ours, expected, strict=True):
            torch.testing.assert_close(state, want, rtol=0, atol=0)
        for state, want in zip(norm_states(model.module), before, strict=True):
            torch.testing.assert_close(state, want, rtol=0, atol=0)
    finally:
        model._release(registered)


def test_a_query_of_mostly_one_type_keeps_its_calls(kang):
    """Weighted statistics: a sorted query (80% one type) is not moved by its composition.

    Measured with this set-up (scNym, reference alone, seed 0): unweighted query statistics
    0.667, weighted 0.895, the reference's 0.915 (issue 14, Granja ATAC's 51% B cells).
    """
    import scvi

    scvi.settings.seed = 0
    reference = kang[kang.obs["batch"] == "ctrl"].copy()
    query = kang[kang.obs["batch"] == "stim"].copy()
    truth = query.obs["cell_type"].astype(str).to_numpy()
    top = np.flatnonzero(truth == "CD4 T cells")
    rest = np.random.default_rng(0).choice(np.flatnonzero(truth != "CD4 T cells"), top.size // 4)
    keep = np.sort(np.concatenate([top, rest]))
    query, truth = query[keep].copy(), truth[keep]
    lt.SCNYM.setup_anndata(reference, labels_key="cell_type")
    model = lt.SCNYM(reference)
    model.train(max_epochs=25, accelerator="cpu", enable_progress_bar=False)
    weighted = (model.predict(query) == truth).mean()
    proportions = model.reference_proportions_
    np.testing.assert_allclose(proportions.sum(), 1.0)
    model.reference_proportions_ = None  # as a model saved before the weighting
    unweighted = (model.predict(query) == truth).mean()
    assert weighted >= 0.85
    assert weighted >= unweighted + 0.1
