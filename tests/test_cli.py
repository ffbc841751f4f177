from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from labeltransfer import cli
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

    # the saved model maps the query (fine-tuning on it, here for 3 epochs)
    again = files / "again.h5ad"
    model_dir = ["--model-dir", str(files / "m"), "--max-epochs", "3"]
    assert _annotate(files, "--model", "scnym", *model_dir, "--out", str(again)) == 0
    assert "Time: load " in capsys.readouterr().out
    mapped = ad.read_h5ad(again)
    assert mapped.uns["scnym"]["method"] == "SCNYM"
    assert (mapped.obs["scnym_prediction"].astype(str) == truth).mean() >= 0.85
    # a saved scNym model given as JIND names the option to change, not Python
    with pytest.raises(
        SystemExit, match=r"holds a SCNYM model, not a JIND one: pass --model scnym"
    ):
        _annotate(files, "--model", "jind", *model_dir, "--out", str(again))

    with pytest.raises(SystemExit, match="--align is JIND"):
        _annotate(files, *common, "--align", "--out", str(out))
    with pytest.raises(SystemExit, match="scnym only"):
        _annotate(files, "--reference", reference, "--new-identity-discovery", "--out", str(out))
    with pytest.raises(SystemExit, match="--layer 'counts'"):
        _annotate(files, *common, "--layer", "counts", "--out", str(out))


# ------------------------------------------- checks before any data are read or trained
def _sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def no_data_read(monkeypatch):
    """Fail the test if the command reads an input's data (every check must come first)."""

    def read(*args, **kwargs):
        raise AssertionError("the command read data before refusing its arguments")

    monkeypatch.setattr(cli, "_read", read)


def _base(files) -> list[str]:
    return [
        "annotate",
        "--reference",
        str(files / "ref.h5ad"),
        "--query",
        str(files / "query.h5ad"),
    ]


@pytest.mark.parametrize("how", ["same path", "symlink", "hard link", "other spelling"])
def test_cli_out_equal_to_query_is_refused(files, no_data_read, how):
    query = files / "query.h5ad"
    before = _sha256(query)
    out = {
        "same path": query,
        "symlink": files / "link.h5ad",
        "hard link": files / "hard.h5ad",
        "other spelling": files / "sub" / ".." / "query.h5ad",
    }[how]
    if how == "symlink":
        out.symlink_to(query)
    elif how == "hard link":
        os.link(query, out)
    elif how == "other spelling":
        (files / "sub").mkdir()
    args = [*_base(files), "--labels-key", "cell_type", "--out", str(out)]
    with pytest.raises(
        SystemExit, match=r"^error: --out .* is the --query file: the input is never"
    ):
        main(args)
    assert _sha256(query) == before


def test_cli_out_equal_to_reference_is_refused(files, no_data_read):
    reference = files / "ref.h5ad"
    before = _sha256(reference)
    args = [*_base(files), "--labels-key", "cell_type", "--out", str(reference)]
    with pytest.raises(SystemExit, match=r"^error: --out .* is the --reference file"):
        main(args)
    assert _sha256(reference) == before


def test_cli_save_model_into_a_folder_with_user_files_is_refused(files, no_data_read):
    folder = files / "results"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    args = [*_base(files), "--labels-key", "cell_type", "--out", str(files / "o.h5ad")]
    for extra in ([], ["--overwrite"]):
        with pytest.raises(
            SystemExit,
            match=r"^error: --save-model .*results is not empty and is not a saved model: it "
            r"contains 'notes.txt'\. .* never deletes other files",
        ):
            main([*args, "--save-model", str(folder), *extra])
    assert os.listdir(folder) == ["notes.txt"]
    assert (folder / "notes.txt").read_text() == "mine"


def test_cli_save_model_replaces_a_saved_model_only_with_overwrite(files, capsys):
    args = [*_base(files), "--labels-key", "cell_type", "--out", str(files / "o.h5ad")]
    args += ["--no-align", "--max-epochs", "2", "--accelerator", "cpu"]
    model = files / "model"
    assert main([*args, "--save-model", str(model)]) == 0
    saved = _sha256(model / "model.pt")
    with pytest.raises(SystemExit, match="already holds a saved model; pass --overwrite"):
        main([*args, "--save-model", str(model)])
    assert _sha256(model / "model.pt") == saved
    assert main([*args, "--save-model", str(model), "--overwrite", "--max-epochs", "3"]) == 0
    assert os.listdir(model) == ["model.pt"]
    assert _sha256(model / "model.pt") != saved


@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan", "high"])
def test_cli_bad_rejection_is_one_error_line(files, no_data_read, capsys, value):
    args = [*_base(files), "--labels-key", "cell_type", "--out", str(files / "o.h5ad")]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--rejection", value])
    assert exit_info.value.code == 2
    printed = capsys.readouterr()
    assert printed.out == ""
    assert printed.err == (
        "error: argument --rejection: must be default, openset, per_type, paper, none or a "
        "number in [0, 1] "
        f"(one confidence cut), got {value!r} (`labeltransfer annotate --help` lists the "
        "options)\n"
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--labels-key", "nope"], "--labels-key 'nope' is not a column of the reference"),
        (["--batch-key", "nope"], "--batch-key 'nope' is not a column of the reference"),
        (["--layer", "counts"], "--layer 'counts' is not a layer of the reference"),
        (["--true-key", "nope"], "--true-key 'nope' is not a column of the query"),
        (["--query-where", "batch=zzz"], "no cell has batch == 'zzz'"),
        (["--query-where", "nope=1"], "--query-where column 'nope' is not in"),
        (["--key-added", "a/b"], "--key-added 'a/b' cannot contain '/'"),
        (
            ["--key-added", "cell_type"],
            "--key-added 'cell_type' would overwrite \\['cell_type'\\], the --labels-key",
        ),
        (["--overwrite"], "--overwrite replaces the folder of --save-model; give --save-model"),
        (["--model", "scnym", "--align-epochs", "3"], "--align-epochs sets JIND's"),
        (["--model-dir", "m", "--batch-key", "b"], "--reference, --batch-key apply to training"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_cli_arguments_are_checked_before_reading_data(
    files, no_data_read, capsys, extra, message
):
    args = ["annotate", "--reference", str(files / "ref.h5ad"), "--query"]
    args += [str(files / "query.h5ad"), "--out", str(files / "o.h5ad")]
    if "--labels-key" not in extra:
        args += ["--labels-key", "cell_type"]
    with pytest.raises(SystemExit, match=f"^error: {message}"):
        main([*args, *extra])
    assert "Epoch" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max-epochs", "0"], "argument --max-epochs: must be a positive whole number, got '0'"),
        (["--query-where", "batch"], "argument --query-where: must be KEY=VALUE"),
        (["--accelerator", "tpu"], "argument --accelerator: invalid choice: 'tpu'"),
    ],
)
def test_cli_parser_errors_are_one_line(files, capsys, extra, message):
    args = [*_base(files), "--labels-key", "cell_type", "--out", str(files / "o.h5ad")]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}")
    assert err.count("\n") == 1


def test_cli_damaged_model_dir_names_the_file(files, trained_jind):
    trained_jind.save(files / "model")
    (files / "model" / "model.pt").write_bytes(b"")
    args = ["annotate", "--model-dir", str(files / "model"), "--query", str(files / "query.h5ad")]
    args += ["--labels-key", "cell_type", "--out", str(files / "o.h5ad"), "--accelerator", "cpu"]
    with pytest.raises(
        SystemExit,
        match=r"^error: cannot load --model-dir .* as --model jind: '.*model.pt' is damaged "
        r"and cannot be read \(EOFError: Ran out of input\)",
    ):
        main(args)
    assert not (files / "o.h5ad").exists()


def test_cli_help_imports_no_model_stack():
    code = (
        "import sys\n"
        "from labeltransfer.cli import main\n"
        "try:\n    main(['annotate', '--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'scvi', 'scanpy', 'anndata') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.fixture
def restored_logging():
    """Put back the logging set-up that ``_configure_output`` changes."""
    names = ["labeltransfer", "scvi", "lightning.pytorch", "lightning.fabric"]
    names.append("lightning.pytorch.utilities.rank_zero")
    saved = {
        name: (list(lg.handlers), lg.propagate, list(lg.filters), lg.level)
        for name in names
        for lg in [logging.getLogger(name)]
    }
    yield
    for name, (handlers, propagate, filters, level) in saved.items():
        lg = logging.getLogger(name)
        lg.handlers, lg.propagate, lg.filters = handlers, propagate, filters
        lg.setLevel(level)


def test_cli_output_has_one_line_per_event_and_no_tips(restored_logging, capsys):
    import scvi

    cli._configure_output()
    cli._configure_output()  # a second command in one process adds nothing
    capsys.readouterr()
    scvi.settings.seed = 0  # Lightning logs "Seed set to 0"
    logging.getLogger("labeltransfer.data._checks").info("reference: counts data")
    logging.getLogger("scvi.model.base").info("scvi says")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").info("💡 Tip: try litlogger")
    err = capsys.readouterr().err
    assert err == "Seed set to 0\nreference: counts data\nscvi says\n"


def test_cli_model_dir_reuses_a_stored_alignment_and_no_align_applies_none(
    files, trained_jind, capsys
):
    """A saved alignment of this query is used, not learned again; --no-align uses none."""
    import labeltransfer as lt

    query = ad.read_h5ad(files / "query.h5ad")
    model = lt.JIND.load_query_data(query, trained_jind)
    model.align(query, name="stored", max_epochs=2, accelerator="cpu", enable_progress_bar=False)
    model.save(files / "aligned_model")
    common = ["--model-dir", str(files / "aligned_model"), "--out", str(files / "a.h5ad")]

    assert _annotate(files, *common) == 0
    printed = capsys.readouterr().out
    assert "align " not in printed
    uns = ad.read_h5ad(files / "a.h5ad").uns["jind"]
    assert uns["aligned"]
    assert uns["alignment"] == "stored"

    assert _annotate(files, *common, "--no-align") == 0
    assert "align " not in capsys.readouterr().out
    assert not ad.read_h5ad(files / "a.h5ad").uns["jind"]["aligned"]


@pytest.mark.parametrize("model", ["scdet", "cellpredx"])
def test_cli_trains_and_maps_with_every_model(files, capsys, model):
    """--model offers all four models; --model-dir maps a query with each of them."""
    out = files / f"{model}.h5ad"
    reference = ["--reference", str(files / "ref.h5ad"), "--model", model]
    args = [*reference, "--max-epochs", "5", "--save-model", str(files / model)]
    assert _annotate(files, *args, "--out", str(out)) == 0
    assert "Time: train " in capsys.readouterr().out
    assert f"{model}_prediction" in ad.read_h5ad(out).obs

    mapped = files / f"{model}_mapped.h5ad"
    model_dir = ["--model", model, "--model-dir", str(files / model), "--max-epochs", "2"]
    assert _annotate(files, *model_dir, "--out", str(mapped)) == 0
    printed = capsys.readouterr().out
    assert "Time: load " in printed
    assert "map " in printed
    assert f"{model}_prediction" in ad.read_h5ad(mapped).obs
