from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from labeltransfer.metrics import annotation_report, format_report


def make_annotated() -> ad.AnnData:
    """Seven hand-made cells, reference types A and B, one novel type N.

    idx truth pred conf  rejected final
    0   A     A    0.90  F        A
    1   A     A    0.80  F        A
    2   A     B    0.60  F        B
    3   B     B    0.95  F        B
    4   B     A    0.55  T        Unassigned
    5   N     A    0.50  T        novel_0
    6   N     B    0.45  T        novel_0
    """
    truth = ["A", "A", "A", "B", "B", "N", "N"]
    pred = ["A", "A", "B", "B", "A", "A", "B"]
    conf = np.array([0.9, 0.8, 0.6, 0.95, 0.55, 0.5, 0.45])
    rejected = [False, False, False, False, True, True, True]
    final = ["A", "A", "B", "B", "Unassigned", "novel_0", "novel_0"]
    adata = ad.AnnData(np.zeros((7, 2), dtype=np.float32))
    adata.obs_names = [f"cell{i}" for i in range(7)]
    adata.obs["cell_type"] = pd.Categorical(truth)
    adata.obs["lt"] = pd.Categorical(final)
    adata.obs["lt_prediction"] = pd.Categorical(pred, categories=["A", "B"])
    adata.obs["lt_confidence"] = conf
    adata.obs["lt_rejected"] = rejected
    p_a = np.where(np.array(pred) == "A", conf, 1 - conf)
    prob = np.column_stack([p_a, 1 - p_a])
    adata.obsm["lt_probabilities"] = pd.DataFrame(prob, index=adata.obs_names, columns=["A", "B"])
    adata.uns["lt"] = {"method": "test"}
    return adata


def test_a_models_own_novel_classes_count_as_withheld():
    # scDET: its novel classes are columns of the probabilities and its cells are not flagged
    adata = make_annotated()
    adata.obs["lt_rejected"] = [False, False, False, False, True, False, False]
    probabilities = adata.obsm["lt_probabilities"].copy()
    probabilities["novel_0"] = 0.0
    adata.obsm["lt_probabilities"] = probabilities
    rep = annotation_report(adata, "cell_type", "lt")
    assert rep["n_novel"] == 2
    assert rep["novel_rejection_rate"] == pytest.approx(1.0)
    assert rep["rejection_rate"] == pytest.approx(1 / 5)


def test_annotation_report_by_hand():
    rep = annotation_report(make_annotated(), "cell_type", "lt")
    assert rep["n_cells"] == 7
    assert rep["n_known"] == 5
    assert rep["n_novel"] == 2
    # known cells 0-4: correct T T F T F
    assert rep["raw_accuracy"] == pytest.approx(3 / 5)
    assert rep["rejection_rate"] == pytest.approx(1 / 5)
    assert rep["effective_accuracy"] == pytest.approx(3 / 4)
    # F1: A = 2*2 / (3 + 3) = 2/3, B = 2*1 / (2 + 2) = 1/2
    assert rep["macro_f1"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    # po = 0.6; pe = (3*3 + 2*2) / 25 = 0.52; kappa = 0.08 / 0.48
    assert rep["kappa"] == pytest.approx(0.08 / 0.48)
    # bins: 9 = {0.90 T, 0.95 T}: |1 - 0.925| * 2/5 = 0.03 ; 8 = {0.80 T}: 0.2/5 = 0.04
    #       6 = {0.60 F}: 0.6/5 = 0.12 ; 5 = {0.55 F}: 0.55/5 = 0.11          -> ECE = 0.30
    # OE: bins 6 and 5 only: (0.6*0.6 + 0.55*0.55) / 5 = 0.1325
    assert rep["ece"] == pytest.approx(0.30)
    # a calibrated model's expected ECE on these five confidences: bins 8, 6, 5 hold one cell
    # each (E|y - c| = 2c(1 - c)): (0.32 + 0.48 + 0.495) / 5; bin 9 {0.90, 0.95}:
    # (0.855 * 0.075 + 0.14 * 0.425 + 0.005 * 0.925) * 2/5  -> 0.3103: the 0.30 is noise
    assert rep["ece_floor"] == pytest.approx(0.3103, abs=0.02)
    assert rep["overconfidence_error"] == pytest.approx(0.1325)
    # novel cells are all withheld and less confident than every known cell
    assert rep["novel_rejection_rate"] == pytest.approx(1.0)
    assert rep["novel_auroc"] == pytest.approx(1.0)
    # perfect separation: OSCR = closed-set accuracy on known cells
    assert rep["oscr"] == pytest.approx(3 / 5)
    ow = rep["open_world"]
    assert ow["seen_accuracy"] == pytest.approx(3 / 5)
    assert ow["novel_accuracy"] == pytest.approx(1.0)
    assert ow["overall_accuracy"] == pytest.approx(5 / 7)
    assert ow["mapping"] == {"novel_0": "N"}
    table = rep["per_type"]
    assert list(table.index) == ["A", "B", "N"]
    assert table.loc["N", "rejection_rate"] == 1.0
    assert table.loc["N", "raw_accuracy"] == 0.0
    assert table.loc["A", "n_cells"] == 3


def test_annotation_report_closed_set_has_no_open_set_entries():
    adata = make_annotated()[:5].copy()
    rep = annotation_report(adata, "cell_type", "lt")
    assert rep["n_novel"] == 0
    assert "novel_auroc" not in rep
    assert "oscr" not in rep
    assert "open_world" not in rep


def test_annotation_report_as_frame_and_format():
    adata = make_annotated()
    frame = annotation_report(adata, "cell_type", "lt", as_frame=True)
    assert isinstance(frame, pd.DataFrame)
    assert frame.index.tolist() == ["lt"]
    assert frame.loc["lt", "raw_accuracy"] == pytest.approx(0.6)
    assert frame.loc["lt", "open_world_novel_accuracy"] == pytest.approx(1.0)
    assert "per_type" in frame.attrs
    text = format_report(annotation_report(adata, "cell_type", "lt"))
    assert "raw accuracy          0.600" in text
    assert "effective accuracy    0.750" in text
    assert "AUROC 1.000" in text
    assert f"ECE                   0.300 (noise floor {rep_floor(adata):.3f})" in text
    assert "Per type:" in text
    assert format_report(frame).splitlines()[:5] == text.splitlines()[:5]
    assert "Per type" not in format_report(
        annotation_report(adata, "cell_type", "lt"), per_type=False
    )


def test_annotation_report_errors():
    adata = make_annotated()
    with pytest.raises(KeyError, match=r"Unknown key 'truth' in adata.obs.*'cell_type'"):
        annotation_report(adata, "truth", "lt")
    with pytest.raises(KeyError, match="lt2_prediction|'lt2'"):
        annotation_report(adata, "cell_type", "lt2")
    adata.obs["with_nan"] = pd.Categorical(["A", None, "A", "B", "B", "N", "N"])
    with pytest.raises(ValueError, match="missing label"):
        annotation_report(adata, "with_nan", "lt")
    with pytest.raises(ValueError, match="Empty input"):
        annotation_report(adata[:0].copy(), "cell_type", "lt")
    with pytest.raises(KeyError, match="annotation_report"):
        format_report({"n_cells": 3})


def test_annotation_report_without_probabilities_warns_and_uses_categories():
    adata = make_annotated()
    del adata.obsm["lt_probabilities"]
    with pytest.warns(UserWarning, match="lt_probabilities"):
        rep = annotation_report(adata, "cell_type", "lt")
    # reference types fall back to the categories of lt_prediction (A, B): same numbers
    assert rep["n_novel"] == 2
    assert rep["raw_accuracy"] == pytest.approx(3 / 5)


def rep_floor(adata):
    return annotation_report(adata, "cell_type", "lt")["ece_floor"]
