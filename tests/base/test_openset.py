"""The open-set layer's functions on synthetic data with a planted novel type."""

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

import labeltransfer as lt
from labeltransfer.base import _openset as openset
from labeltransfer.base import _reference_space as reference_space
from labeltransfer.base._neighbors import knn


def _space(reference) -> reference_space.ReferenceSpace:
    """The reference's coverage space with every reference cell in the bank."""
    features = _log_cp10k(reference.X)
    space = reference_space.ReferenceSpace.fit(features.copy())
    space.bank = space.project(features)
    space.bank_labels = reference.obs["cell_type"].cat.codes.to_numpy().astype(np.int64)
    return space


def _log_cp10k(matrix) -> np.ndarray:
    dense = np.asarray(matrix.todense() if hasattr(matrix, "todense") else matrix, float)
    return np.log1p(dense / np.maximum(dense.sum(1, keepdims=True), 1) * 1e4)


@pytest.fixture(scope="module")
def planted():
    """A shifted query with one type the reference lacks, in the reference's space."""
    reference, query = lt.data.synthetic(
        n_reference=800, n_query=600, n_genes=300, n_types=4, n_novel=1, batch_shift=0.5, seed=3
    )
    space = _space(reference)
    coords = openset.centre_by_group(
        space.project(_log_cp10k(query.X)), np.zeros(query.n_obs, int)
    )
    types = list(reference.obs["cell_type"].cat.categories)
    truth = query.obs["cell_type"].astype(str).to_numpy()
    novel = ~np.isin(truth, types)
    # the classifier's call for a seen cell is its type; a novel cell gets some seen type
    prediction = np.array([types.index(t) if t in types else 0 for t in truth])
    return space, coords, prediction, novel


def test_bank_keeps_every_type_and_at_most_the_size():
    labels = np.repeat([0, 1, 2], [9000, 900, 20])
    rows = reference_space.bank_rows(labels, size=2000)
    kept = np.bincount(labels[rows], minlength=3)
    assert rows.size <= 2000 + 2 * reference_space.MIN_PER_TYPE
    assert kept[2] == 20  # a rare type keeps all of its cells
    assert kept[1] >= reference_space.MIN_PER_TYPE
    assert np.all(np.diff(rows) > 0)


def test_planted_novel_type_is_uncovered_and_seen_cells_are_not(planted):
    space, coords, prediction, novel = planted
    uncovered = openset.uncovered_fraction(space, coords, prediction)
    assert roc_auc_score(novel, uncovered) > 0.95
    flagged = uncovered > openset.NOVEL_CUT
    assert flagged[novel].mean() > 0.8
    assert flagged[~novel].mean() < 0.05


def test_novel_groups_gather_the_planted_type(planted):
    space, coords, prediction, novel = planted
    flagged = openset.uncovered_fraction(space, coords, prediction) > openset.NOVEL_CUT
    groups = openset.novel_groups(coords, flagged, min_cells=10)
    in_group = np.zeros(novel.size, bool)
    in_group[np.flatnonzero(flagged)[groups >= 0]] = True
    assert in_group[novel].mean() > 0.8
    largest = np.flatnonzero(flagged)[groups == 0]
    assert novel[largest].mean() > 0.9  # the largest group is the planted type


def test_novel_groups_of_many_candidates_are_found_on_a_sample(monkeypatch):
    """Above COMMUNITY_SAMPLE candidates, the communities of a sample are spread to the rest."""
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 6, (4, 10))
    truth = np.repeat([0, 1, 2, 3], [900, 600, 300, 200])
    coords = (centres[truth] + rng.normal(0, 1, (truth.size, 10))).astype(np.float32)
    candidates = np.ones(truth.size, bool)
    whole = openset.novel_groups(coords, candidates, min_cells=10)
    monkeypatch.setattr(openset, "COMMUNITY_SAMPLE", 400)
    monkeypatch.setattr(openset, "BANK_SIZE", 150)
    sampled = openset.novel_groups(coords, candidates, min_cells=10)
    assert pd.crosstab(truth, sampled).shape == (4, 4)  # one group per planted cluster
    assert (pd.crosstab(truth, sampled).max(axis=1) == np.bincount(truth)).all()
    assert np.array_equal(whole, sampled)  # numbered by size, so the same numbers


def test_a_query_without_a_new_type_is_covered():
    reference, query = lt.data.synthetic(
        n_reference=600, n_query=400, n_genes=300, n_types=4, batch_shift=0.5, seed=5
    )
    space = _space(reference)
    coords = openset.centre_by_group(
        space.project(_log_cp10k(query.X)), np.zeros(query.n_obs, int)
    )
    types = list(reference.obs["cell_type"].cat.categories)
    prediction = query.obs["cell_type"].astype(str).map(types.index).to_numpy()
    assert (
        openset.uncovered_fraction(space, coords, prediction) > openset.NOVEL_CUT
    ).mean() < 0.05


def _blobs(n_per_blob: int, uncovered_share: list[float], seed: int = 0):
    """Well separated blobs of query cells, each with its share of cells without a partner."""
    from labeltransfer.base._neighbors import knn

    rng = np.random.default_rng(seed)
    blob = np.repeat(np.arange(len(uncovered_share)), n_per_blob)
    coords = (rng.normal(size=(blob.size, 5)) + 20 * np.eye(5)[blob]).astype(np.float32)
    covered = rng.random(blob.size) >= np.asarray(uncovered_share)[blob]
    return coords, knn(coords, openset.N_NEIGHBORS, seed=seed), covered, blob


@pytest.mark.parametrize("sample", [None, 400])
def test_a_community_far_less_covered_than_the_rest_is_uncovered(monkeypatch, sample):
    # a held-out type near a seen type keeps mutual partners for 60% of its cells: too many
    # for the neighbourhood cut, far fewer than the 97% of the seen types
    if sample is not None:  # a query larger than the sample the communities are found on
        monkeypatch.setattr(openset, "COMMUNITY_SAMPLE", sample)
    coords, graph, covered, blob = _blobs(300, [0.03, 0.03, 0.03, 0.4])
    flagged = openset.uncovered_communities(coords, graph, covered, seed=0)
    assert flagged[blob == 3].all()
    assert not flagged[blob < 3].any()


def test_an_evenly_shifted_query_has_no_uncovered_community():
    # a shift that leaves 30% of every type without a partner is not a new type
    coords, graph, covered, _ = _blobs(300, [0.3, 0.3, 0.3, 0.3])
    assert not openset.uncovered_communities(coords, graph, covered, seed=0).any()


def test_the_community_test_reads_partners_of_any_type(planted, monkeypatch):
    space, coords, prediction, novel = planted
    wrong = np.where(novel, prediction, (prediction + 1) % 4)  # every seen call is wrong
    seen = []
    real = openset.uncovered_communities

    def spy(coords, graph, partnered, *, seed):
        flagged = real(coords, graph, partnered, seed=seed)
        seen.append((partnered, flagged))
        return flagged

    monkeypatch.setattr(openset, "uncovered_communities", spy)
    openset.uncovered_fraction(space, coords, wrong)
    partnered, flagged = seen[0]
    assert partnered[~novel].mean() > 0.8  # seen cells keep partners, whatever the call
    assert not flagged[~novel].any()
    assert flagged[novel].mean() > 0.9


def test_cells_of_uncovered_communities_are_lifted_to_the_cut(planted, monkeypatch):
    space, coords, prediction, _ = planted
    monkeypatch.setattr(openset, "COMMUNITY_MIN_SHARE", 1.0)  # no community reaches it
    alone = openset.uncovered_fraction(space, coords, prediction)
    every_other = lambda coords, graph, covered, seed: np.arange(len(coords)) % 2 == 0  # noqa: E731
    monkeypatch.setattr(openset, "uncovered_communities", every_other)
    lifted = openset.uncovered_fraction(space, coords, prediction)
    np.testing.assert_array_equal(lifted[::2], np.maximum(alone[::2], openset.PAST_CUT))
    np.testing.assert_array_equal(lifted[1::2], alone[1::2])


def test_registered_reference_cells_leave_the_query_coverage_unchanged(planted):
    space, coords, prediction, _ = planted
    alone = openset.uncovered_fraction(space, coords, prediction)
    # a co-trained model's registered AnnData: reference cells (here the bank's) and the query
    cells = np.vstack([space.bank, coords])
    predicted = np.concatenate([space.bank_labels, prediction])
    query = np.arange(len(cells)) >= len(space.bank)
    np.testing.assert_array_equal(
        openset.uncovered_apart(space, cells, predicted, query)[query], alone
    )


def test_novelty_breaks_ties_by_confidence_without_crossing_steps():
    uncovered = np.array([0.0, 0.0, 1 / 15, 1 / 15])
    confidence = np.array([0.99, 0.2, 0.99, 0.2])
    score = openset.novelty_score(uncovered, confidence)
    assert np.all(np.diff(score) > 0)


def test_projection_matches_for_numpy_and_torch(planted):
    import torch

    space = planted[0]
    x = np.random.default_rng(0).random((5, space.mean.size)).astype(np.float32)
    np.testing.assert_allclose(space.project(x), space.project(torch.as_tensor(x)), atol=1e-5)


def test_query_thresholds_follow_a_shift_and_never_rise():
    from labeltransfer.base._rejection import per_type_thresholds, query_thresholds

    rng = np.random.default_rng(0)
    prediction = rng.integers(0, 3, 3000)
    held_out = rng.beta(8, 1, 3000)
    reference = per_type_thresholds(held_out, prediction, 3, theta=0.05)
    covered = np.ones(3000, dtype=bool)
    same = query_thresholds(reference, held_out, prediction, covered, theta=0.05)
    np.testing.assert_allclose(same, reference)  # no shift: the reference's thresholds
    shifted = held_out * 0.7  # a shift lowers every cell's confidence
    assert (shifted < reference[prediction]).mean() > 0.5
    applied = query_thresholds(reference, shifted, prediction, covered, theta=0.05)
    assert np.all(applied <= reference)
    assert (shifted < applied[prediction]).mean() == pytest.approx(0.05, abs=0.01)
    raised = query_thresholds(reference, np.ones(3000), prediction, covered, theta=0.05)
    np.testing.assert_array_equal(raised, reference)  # never above the reference's
    few = query_thresholds(reference, shifted, prediction, prediction == 9, theta=0.05)
    np.testing.assert_array_equal(few, reference)  # no covered cells: the reference's


# ----------------------------------------------------------------------- through a model
@pytest.fixture(scope="module")
def model_and_query():
    import scvi

    scvi.settings.seed = 0
    reference, query = lt.data.synthetic(
        n_reference=800, n_query=600, n_genes=300, n_types=4, n_novel=1, batch_shift=0.5, seed=3
    )
    truth = query.obs["cell_type"].astype(str).to_numpy()
    query.obs = query.obs[["batch"]]
    lt.JIND.setup_anndata(reference, labels_key="cell_type")
    model = lt.JIND(reference, n_top_genes=200)
    model.train(max_epochs=10, enable_progress_bar=False, accelerator="cpu")
    return model, query, truth


def test_model_layer_finds_the_planted_type_and_groups_it(model_and_query):
    model, query, truth = model_and_query
    out = model.annotate(query, key_added="lt", copy=True)
    novel = truth == "type_4"
    assert roc_auc_score(novel, out.obs["lt_novelty"]) > 0.95
    calls = out.obs["lt"].to_numpy(dtype=str)
    assert np.char.startswith(calls[novel], "novel_").mean() > 0.8
    assert not np.char.startswith(calls[~novel], "novel_").any()
    rule = out.uns["lt"]["rejection"]
    assert rule["rule"] == "openset"
    assert rule["n_novel_groups"] >= 1
    assert len(rule["query_thresholds"]) == len(rule["thresholds"]) == 4
    assert np.all(np.asarray(rule["query_thresholds"]) <= np.asarray(rule["thresholds"]))
    assert {"ece_before", "ece_after", "temperature"} <= set(out.uns["lt"]["calibration"])
    without_groups = model.annotate(query, key_added="lt", copy=True, novel=False)
    assert not without_groups.obs["lt"].astype(str).str.startswith("novel_").any()


def test_layer_is_saved_and_used_without_the_reference(model_and_query, tmp_path):
    model, query, _ = model_and_query
    before = model.annotate(query, key_added="lt", copy=True)
    model.save(tmp_path / "model")
    loaded = lt.JIND.load(tmp_path / "model")  # no reference data
    after = loaded.annotate(query, key_added="lt", copy=True)
    np.testing.assert_array_equal(after.obs["lt_novelty"], before.obs["lt_novelty"])
    np.testing.assert_array_equal(after.obs["lt"].astype(str), before.obs["lt"].astype(str))
    pd.testing.assert_series_equal(loaded.rejection_thresholds(), model.rejection_thresholds())
    for name, values in model.reference_space_.items():
        np.testing.assert_array_equal(loaded.reference_space_[name], values)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rejection": 1.5}, r"A global rejection threshold must be in \[0, 1\], got 1.5"),
        ({"rejection": "strict"}, "Unknown rejection rule 'strict'. Use 'openset'"),
        ({"novel": "yes"}, "novel must be 'auto' .* or False .*, got 'yes'"),
    ],
)
def test_bad_rule_or_novel_fails_before_inference(model_and_query, kwargs, message):
    model, query, _ = model_and_query
    columns = list(query.obs.columns)
    with pytest.raises(ValueError, match=message):
        model.annotate(query, key_added="lt", **kwargs)
    assert list(query.obs.columns) == columns


def test_thresholds_for_a_theta_out_of_range_are_refused(model_and_query):
    with pytest.raises(ValueError, match=r"theta \(outlier fraction\) must be in \[0, 1\)"):
        model_and_query[0].rejection_thresholds(theta=1.0)


def test_a_run_rejecting_most_cells_says_so(model_and_query):
    model, query, _ = model_and_query
    with pytest.warns(UserWarning, match=r"JIND rejected 100% of the 600 cells with the 'global'"):
        model.annotate(query, key_added="lt", copy=True, rejection=1.0)


def test_scale_groups_gives_the_chosen_domains_the_reference_spread():
    rng = np.random.default_rng(0)
    coords = np.vstack([rng.normal(0, 1, (50, 3)), rng.normal(0, 0.1, (60, 3))])
    coords[50:] -= coords[50:].mean(axis=0)
    groups = np.array([-1] * 50 + [0] * 60)
    spread = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    scaled = openset.scale_groups(coords, groups, [0], spread)
    np.testing.assert_allclose(scaled[50:].std(axis=0), spread, rtol=1e-5)
    np.testing.assert_array_equal(scaled[:50], coords[:50].astype(np.float32))


def test_residual_axes_separate_a_type_the_reference_has_no_axis_for():
    """A held-out type that differs only in genes the reference never varies.

    In the reference's components it lands on the seen type it resembles; the query's own
    residual axes hold its genes, and with them its cells are each other's neighbours.
    """
    rng = np.random.default_rng(0)
    n_genes, own = 400, slice(300, 400)
    profiles = np.zeros((3, n_genes))
    profiles[:, :40] = rng.normal(0, 2, (3, 40))
    novel_profile = profiles[0].copy()
    novel_profile[own] = 0.4  # type 0 plus genes of its own

    def cells(profile, n):
        return (profile + rng.normal(0, 0.3, (n, n_genes))).astype(np.float32)

    reference = np.vstack([cells(p, 200) for p in profiles])
    space = reference_space.ReferenceSpace.fit(reference.copy())
    query = np.vstack([cells(profiles[0], 150), cells(profiles[1], 150), cells(novel_profile, 60)])
    novel = np.repeat([False, False, True], [150, 150, 60])

    axes = space.residual_axes(query.copy())
    assert axes.shape == (reference_space.N_RESIDUAL, n_genes)
    assert (axes[0, own] ** 2).sum() > 0.8  # the first axis is the novel type's genes
    plain = space.project(query)
    extended = space.project(query, axes)
    np.testing.assert_allclose(extended[:, : plain.shape[1]], plain, rtol=1e-5, atol=1e-5)

    def novel_neighbours(coords):
        neighbours = knn(coords, 15, seed=0)
        return novel[neighbours[novel]].mean()

    assert novel_neighbours(plain) < 0.8  # mixed with type 0
    assert novel_neighbours(extended) > 0.95
