"""Saving never deletes a user's file; loading names a damaged ``model.pt``."""

from __future__ import annotations

import os
import random
import re

import numpy as np
import pytest
import torch

import labeltransfer as lt


def _snapshot(folder) -> dict[str, bytes | None]:
    """Every path under ``folder`` with the bytes of its files (``None`` for folders)."""
    return {
        os.path.relpath(os.path.join(root, name), folder): (
            open(os.path.join(root, name), "rb").read() if name in files else None
        )
        for root, dirs, files in os.walk(folder)
        for name in [*dirs, *files]
    }


@pytest.fixture
def user_folder(tmp_path):
    """A folder with a notebook, a data file and a sub-folder of the user's."""
    folder = tmp_path / "analysis"
    (folder / "data").mkdir(parents=True)
    (folder / "notebook.ipynb").write_text('{"cells": []}')
    (folder / "data" / "counts.h5ad").write_bytes(b"not really h5ad")
    return folder


@pytest.mark.parametrize("overwrite", [False, True])
def test_save_into_a_folder_with_user_files_is_refused(model_and_query, user_folder, overwrite):
    model, _ = model_and_query
    before = _snapshot(user_folder)
    message = (
        rf"{re.escape(str(user_folder))} is not empty and is not a saved model: it contains "
        r"'data/', 'notebook.ipynb'\. Saving replaces only a saved model's own files "
        r"\(model.pt, adata.h5ad, mdata.h5mu\) and never deletes other files: pass a new or "
        r"empty folder"
    )
    with pytest.raises(ValueError, match=message):
        model.save(user_folder, overwrite=overwrite)
    assert _snapshot(user_folder) == before
    assert sorted(os.listdir(user_folder.parent)) == ["analysis"]  # no temporary folder left


def test_save_to_a_file_is_refused(model_and_query, tmp_path):
    model, _ = model_and_query
    path = tmp_path / "results.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(
        ValueError, match=r"results.csv is a file, not a folder: .* never replaces"
    ):
        model.save(path, overwrite=True)
    assert path.read_text() == "a,b\n1,2\n"
    assert os.listdir(tmp_path) == ["results.csv"]


def test_saved_model_with_a_user_file_added_is_refused(model_and_query, tmp_path):
    model, _ = model_and_query
    folder = tmp_path / "model"
    model.save(folder)
    (folder / "notes.txt").write_text("my notes")
    before = _snapshot(folder)
    with pytest.raises(ValueError, match=r"it contains 'notes.txt'\. Saving replaces only"):
        model.save(folder, overwrite=True)
    assert _snapshot(folder) == before


def test_overwrite_replaces_a_saved_model(model_and_query, tmp_path):
    model, query = model_and_query
    folder = tmp_path / "model"
    model.save(folder, save_anndata=True)
    assert sorted(os.listdir(folder)) == ["adata.h5ad", "model.pt"]
    with pytest.raises(ValueError, match="already exists and holds a saved model. Pass overwrite"):
        model.save(folder)
    model.save(folder, overwrite=True)
    # the replaced model's data file went with it: it must not be loaded with the new model
    assert os.listdir(folder) == ["model.pt"]
    assert os.listdir(tmp_path) == ["model"]
    loaded = lt.JIND.load(folder, accelerator="cpu")
    np.testing.assert_array_equal(loaded.predict(query), model.predict(query))


def test_save_into_an_empty_folder_and_through_a_link(model_and_query, tmp_path):
    model, _ = model_and_query
    empty = tmp_path / "empty"
    empty.mkdir()
    model.save(empty)
    assert os.listdir(empty) == ["model.pt"]
    link = tmp_path / "link"
    link.symlink_to(empty, target_is_directory=True)
    model.save(link, overwrite=True)
    assert link.is_symlink()
    assert os.listdir(empty) == ["model.pt"]


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    "damage",
    [lambda data: b"", _truncated, lambda data: random.Random(0).randbytes(2000)],
    ids=["empty", "truncated", "garbage"],
)
def test_damaged_model_file_is_named(model_and_query, tmp_path, damage):
    model, _ = model_and_query
    model.save(tmp_path / "model")
    path = tmp_path / "model" / "model.pt"
    path.write_bytes(damage(path.read_bytes()))
    message = (
        rf"'{re.escape(str(path))}' is damaged and cannot be read \(.*\)\. It was probably cut "
        r"short .* copy the model folder again, or train the model and save it again"
    )
    with pytest.raises(ValueError, match=message):
        lt.JIND.load(tmp_path / "model", accelerator="cpu")


def test_model_file_without_a_model_is_named(tmp_path):
    (tmp_path / "model").mkdir()
    torch.save({"weights": [1, 2, 3]}, tmp_path / "model" / "model.pt")
    with pytest.raises(ValueError, match=r"model.pt' is damaged .*holds no model attributes"):
        lt.JIND.load(tmp_path / "model", accelerator="cpu")


def test_load_prints_no_download_lines(model_and_query, tmp_path, capfd):
    model, _ = model_and_query
    model.save(tmp_path / "model")
    capfd.readouterr()
    lt.JIND.load(tmp_path / "model", accelerator="cpu")
    printed = capfd.readouterr()
    assert "already downloaded" not in printed.out + printed.err
