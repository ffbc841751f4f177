from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from labeltransfer.cli import main


@pytest.fixture
def files(synthetic_pair, tmp_path):
    ref, query = synthetic_pair
    ref.write_h5ad(tmp_path / "ref.h5ad")
    query.write_h5ad(tmp_path / "query.h5ad")
    return tmp_path


def test_cli_annotate_round_trip(files, capsys):
    out = files / "out.h5ad"
    code = main(
        [
            "annotate",
            "--reference",
            str(files / "ref.h5ad"),
            "--query",
            str(files / "query.h5ad"),
            "--labels-key",
            "cell_type",
            "--out",
            str(out),
            "--max-epochs",
            "5",
            "--no-align",
            "--accelerator",
            "cpu",
            "--save-model",
            str(files / "model"),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "raw accuracy" in printed
    annotated = ad.read_h5ad(out)
    assert {"jind", "jind_prediction", "jind_confidence", "jind_rejected"} <= set(annotated.obs)
    accuracy = (
        annotated.obs["jind_prediction"].astype(str) == annotated.obs["cell_type"].astype(str)
    ).mean()
    assert accuracy >= 0.9

    # the saved model maps the query again without the reference
    again = files / "again.h5ad"
    assert (
        main(
            [
                "annotate",
                "--model-dir",
                str(files / "model"),
                "--query",
                str(files / "query.h5ad"),
                "--labels-key",
                "cell_type",
                "--out",
                str(again),
                "--no-align",
                "--accelerator",
                "cpu",
            ]
        )
        == 0
    )
    np.testing.assert_array_equal(
        ad.read_h5ad(again).obs["jind_prediction"], annotated.obs["jind_prediction"]
    )
    capsys.readouterr()

    # ... and aligns a new query onto it, for the given number of alignment epochs
    aligned = files / "aligned.h5ad"
    args = ["annotate", "--model-dir", str(files / "model"), "--query", str(files / "query.h5ad")]
    args += ["--labels-key", "cell_type", "--out", str(aligned), "--accelerator", "cpu"]
    assert main([*args, "--align-epochs", "2"]) == 0
    printed = capsys.readouterr().out
    assert "Time: load " in printed
    assert "align " in printed
    assert "train " not in printed
    assert ad.read_h5ad(aligned).uns["jind"]["aligned"]


def test_cli_errors(files):
    with pytest.raises(SystemExit, match="--reference"):
        main(
            [
                "annotate",
                "--query",
                str(files / "query.h5ad"),
                "--labels-key",
                "x",
                "--out",
                "o.h5ad",
            ]
        )
    with pytest.raises(SystemExit, match="does not exist"):
        main(
            [
                "annotate",
                "--reference",
                "missing.h5ad",
                "--query",
                str(files / "query.h5ad"),
                "--labels-key",
                "cell_type",
                "--out",
                "o.h5ad",
            ]
        )
    with pytest.raises(SystemExit, match="not a column"):
        main(
            [
                "annotate",
                "--reference",
                str(files / "ref.h5ad"),
                "--query",
                str(files / "query.h5ad"),
                "--labels-key",
                "nope",
                "--out",
                str(files / "o.h5ad"),
            ]
        )
    with pytest.raises(SystemExit, match="no cell has"):
        main(
            [
                "annotate",
                "--reference",
                str(files / "ref.h5ad"),
                "--reference-where",
                "batch=zzz",
                "--query",
                str(files / "query.h5ad"),
                "--labels-key",
                "cell_type",
                "--out",
                "o.h5ad",
            ]
        )


def _annotate(files, *extra: str) -> int:
    return main(
        [
            "annotate",
            "--query",
            str(files / "query.h5ad"),
            "--labels-key",
            "cell_type",
            "--accelerator",
            "cpu",
            *extra,
        ]
    )


def test_cli_scnym_trains_on_reference_and_query(files, capsys):
    out = files / "scnym.h5ad"
    reference = str(files / "ref.h5ad")
    common = ["--reference", reference, "--model", "scnym", "--max-epochs", "15"]
    assert _annotate(files, *common, "--out", str(out), "--save-model", str(files / "m")) == 0
    assert "raw accuracy" in capsys.readouterr().out
    annotated = ad.read_h5ad(out)
    assert {"scnym", "scnym_prediction", "scnym_confidence", "X_scnym"} <= (
        set(annotated.obs) | set(annotated.obsm)
    )
    assert annotated.uns["scnym"]["method"] == "SCNYM"
    truth = annotated.obs["cell_type"].astype(str)
    assert (annotated.obs["scnym_prediction"].astype(str) == truth).mean() >= 0.85

    again = files / "again.h5ad"
    assert (
        _annotate(files, "--model", "scnym", "--model-dir", str(files / "m"), "--out", str(again))
        == 0
    )
    np.testing.assert_array_equal(
        ad.read_h5ad(again).obs["scnym_prediction"], annotated.obs["scnym_prediction"]
    )

    with pytest.raises(SystemExit, match="--align is JIND"):
        _annotate(files, *common, "--align", "--out", str(out))
    with pytest.raises(SystemExit, match="scnym only"):
        _annotate(files, "--reference", reference, "--new-identity-discovery", "--out", str(out))
    with pytest.raises(SystemExit, match="--layer 'counts'"):
        _annotate(files, *common, "--layer", "counts", "--out", str(out))
