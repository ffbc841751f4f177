"""Interrupted training, atomic saving and loading across package versions.

An exception or Ctrl+C during ``train()`` leaves the model clearly untrained (annotate and
predict refuse it) with its module at the best weights seen so far; Ctrl+C surfaces as a
``KeyboardInterrupt`` (not Lightning's ``SystemExit``) and Ctrl+C keeps working afterwards. An
interrupted extra stage (JIND's ``align`` / ``self_train``) leaves the trained model as it was.
"""

from __future__ import annotations

import copy
import os
import signal

import lightning.pytorch as pl
import numpy as np
import pytest
import scvi
import torch

import labeltransfer as lt
import labeltransfer.base._save_load as mixin_module
from labeltransfer.train import BestStateCallback

TRAIN = {"accelerator": "cpu", "enable_progress_bar": False}


@pytest.fixture(scope="module")
def pair():
    return lt.data.synthetic(n_reference=200, n_query=100, n_genes=50, n_types=3, seed=0)


@pytest.fixture
def trained(pair):
    """A small trained JIND, new for each test (the stage tests change it)."""
    model = _fresh(pair)
    model.train(max_epochs=3, **TRAIN)
    return model


class RaiseAtEpoch(pl.Callback):
    """Raise ``error`` at the end of training epoch ``epoch`` (after its validation).

    Keeps a copy of the best weights held by the model's :class:`BestStateCallback` then.
    """

    def __init__(self, epoch: int, error: BaseException):
        self.epoch = epoch
        self.error = error
        self.best_state: dict | None = None
        self.best_epoch: int | None = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            best = [c for c in trainer.callbacks if isinstance(c, BestStateCallback)]
            if best:
                self.best_state = copy.deepcopy(best[0].best_state)
                self.best_epoch = best[0].best_epoch
            raise self.error


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def _fresh(pair) -> lt.JIND:
    scvi.settings.seed = 0
    ref = pair[0].copy()
    lt.JIND.setup_anndata(ref, labels_key="cell_type")
    return lt.JIND(ref)


# ----------------------------------------------------------------------------- interruption
def test_keyboard_interrupt_leaves_best_weights_and_an_untrained_flag(pair):
    model = _fresh(pair)
    handler = signal.getsignal(signal.SIGINT)
    stop = RaiseAtEpoch(2, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt, match="Training was interrupted; the model is left"):
        model.train(max_epochs=10, callbacks=[stop], **TRAIN)
    assert signal.getsignal(signal.SIGINT) is handler  # Lightning had set SIG_IGN
    assert stop.best_epoch is not None
    assert stop.best_epoch <= 2
    assert _same_state(model.module.state_dict(), stop.best_state)
    assert not model.is_trained_
    with pytest.raises(RuntimeError, match="train"):
        model.annotate(pair[1].copy())
    model.train(max_epochs=2, **TRAIN)  # training again works
    assert model.is_trained_
    assert model.predict(pair[1]).shape == (pair[1].n_obs,)


def test_an_exception_propagates_and_unflags_a_trained_model(pair):
    model = _fresh(pair)
    model.train(max_epochs=2, **TRAIN)
    assert model.is_trained_
    stop = RaiseAtEpoch(1, RuntimeError("disk full"))
    with pytest.raises(RuntimeError, match="^disk full$"):
        model.train(max_epochs=5, callbacks=[stop], **TRAIN)
    assert not model.is_trained_  # the thresholds no longer match the weights
    assert _same_state(model.module.state_dict(), stop.best_state)
    with pytest.raises(RuntimeError, match="train"):
        model.predict(pair[1])


def test_interrupted_alignment_keeps_the_stored_alignments(trained, pair):
    model = trained
    query_a = pair[1][:50].copy()
    query_b = pair[1][50:].copy()
    model.align(query_a, name="a", max_epochs=3, **TRAIN)
    aligned_a = model.predict(query_a, soft=True)
    stop = RaiseAtEpoch(1, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt, match="This training stage was interrupted"):
        model.align(query_b, name="b", max_epochs=5, callbacks=[stop], **TRAIN)
    assert list(model.alignments_) == ["a"]
    np.testing.assert_array_equal(model.predict(query_a, soft=True), aligned_a)


def test_interrupted_self_training_restores_the_reference_model(trained, pair):
    model = trained
    before = copy.deepcopy(model.module.state_dict())
    stop = RaiseAtEpoch(0, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt, match="This training stage was interrupted"):
        model.self_train(pair[1].copy(), max_epochs=3, callbacks=[stop], **TRAIN)
    assert model.self_training_ is None
    assert _same_state(model.module.state_dict(), before)
    model.align(pair[1].copy(), max_epochs=1, **TRAIN)  # still a reference model


def test_stages_reject_non_positive_epochs(trained, pair):
    with pytest.raises(ValueError, match="max_epochs must be a positive integer, got 0"):
        trained.align(pair[1].copy(), max_epochs=0, **TRAIN)


# ----------------------------------------------------------------------------- saving
def _failing_save(monkeypatch):
    """Make scvi's save write a partial file, then fail."""

    def save(self, dir_path, **kwargs):
        os.makedirs(dir_path, exist_ok=True)
        with open(os.path.join(dir_path, "model.pt"), "wb") as fh:
            fh.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(scvi.model.base.BaseModelClass, "save", save)


def test_failed_save_leaves_no_partial_folder(trained, tmp_path, monkeypatch):
    _failing_save(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        trained.save(tmp_path / "model")
    assert os.listdir(tmp_path) == []  # neither the folder nor the temporary one


def test_failed_overwrite_keeps_the_existing_model(trained, pair, tmp_path, monkeypatch):
    target = tmp_path / "model"
    trained.save(target)
    saved = (target / "model.pt").read_bytes()
    _failing_save(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        trained.save(target, overwrite=True)
    assert os.listdir(tmp_path) == ["model"]
    assert (target / "model.pt").read_bytes() == saved


def test_failed_final_rename_puts_the_existing_model_back(trained, tmp_path, monkeypatch):
    target = tmp_path / "model"
    trained.save(target)
    saved = (target / "model.pt").read_bytes()
    real_replace = os.replace

    def replace(src, dst):
        if os.fspath(dst) == os.fspath(target) and os.path.basename(src) == "model":
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        trained.save(target, overwrite=True)
    assert os.listdir(tmp_path) == ["model"]
    assert (target / "model.pt").read_bytes() == saved


# ----------------------------------------------------------------------------- loading
def _save_as_version(model, path, monkeypatch, saved_version: str) -> None:
    with monkeypatch.context() as patch:
        patch.setattr(mixin_module, "version", lambda name: saved_version)
        model.save(path)


def test_load_from_another_version_warns_and_works(trained, pair, tmp_path, monkeypatch):
    _save_as_version(trained, tmp_path / "old", monkeypatch, "0.0.1")
    with pytest.warns(UserWarning, match="saved with labeltransfer 0.0.1 and is loaded with"):
        loaded = lt.JIND.load(tmp_path / "old", accelerator="cpu")
    np.testing.assert_array_equal(loaded.predict(pair[1]), trained.predict(pair[1]))


def test_incompatible_model_from_another_version_names_both_versions(
    trained, tmp_path, monkeypatch
):
    _save_as_version(trained, tmp_path / "old", monkeypatch, "0.0.1")
    path = tmp_path / "old" / "model.pt"
    content = torch.load(path, weights_only=False)
    content["model_state_dict"].pop(next(iter(content["model_state_dict"])))
    torch.save(content, path)
    current = mixin_module.version("labeltransfer")
    with pytest.warns(UserWarning, match="saved with labeltransfer 0.0.1"):
        with pytest.raises(
            RuntimeError,
            match=rf"(?s)saved with labeltransfer 0.0.1, failed with labeltransfer {current} "
            r"\(RuntimeError: .*pip install labeltransfer==0.0.1",
        ):
            lt.JIND.load(tmp_path / "old", accelerator="cpu")


def test_load_rejects_a_folder_without_a_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a saved model: .*model.pt' does not"):
        lt.JIND.load(tmp_path)


def test_load_rejects_a_model_of_another_class(trained, tmp_path):
    trained.save(tmp_path / "jind")
    with pytest.raises(ValueError, match=r"holds a JIND model, not a SCNYM one.*lt.JIND.load"):
        lt.SCNYM.load(tmp_path / "jind")
