"""Distributed data parallel (DDP) training of the four models on CPU: two processes, gloo.

``strategy="ddp"`` re-launches the running script once per extra device, so the test runs this
file as a script in a subprocess (``python tests/test_ddp.py OUT_DIR MODEL ...``). Every rank
trains every model, records which training cells it saw in each epoch (each minibatch row is
matched to its cell), then annotates the query and writes ``OUT_DIR/<model>_rank<r>.json``.
JIND then aligns the query on one device in each process. ``strategy="ddp_fork"`` trains in
forked children of the test process itself and returns the weights to it; that path is
checked in process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import scvi
import torch

import labeltransfer as lt

pytestmark = pytest.mark.ddp

MODELS = ("JIND", "SCNYM", "SCDET", "CellPredX")
#: Epochs and per-process minibatch size: a few steps per epoch on the tiny task.
EPOCHS = 8
BATCH_SIZE = 32
#: Per-model options for a short run (scDET: the test suite's faster learning rate).
TRAIN_KWARGS: dict[str, dict[str, Any]] = {
    "JIND": {},
    "SCNYM": {},
    "SCDET": {"lr": 1e-3, "estimation_interval": 1, "early_stopping": False},
    "CellPredX": {},
}
#: Three types (chance 1/3); every model reaches well above 0.8 on one device.
MIN_ACCURACY = 0.8


def _data():
    """Tiny separable task: reference + shifted query, concatenated for the joint models."""
    ref, query = lt.data.synthetic(
        n_reference=400, n_query=400, n_genes=200, n_types=3, batch_shift=0.3, seed=1
    )
    adata = lt.data.concat_reference_query(ref, query, labels_key="cell_type")
    return ref, query, adata


class SeenCells(pl.Callback):
    """Record the registered cells of every training minibatch, per epoch.

    Minibatch rows are matched to cells by their exact expression values (the rows of the
    synthetic counts are unique), so this sees what the loaders really delivered.
    """

    def __init__(self, X: np.ndarray):
        super().__init__()
        self.row_of = {row.tobytes(): i for i, row in enumerate(X)}
        if len(self.row_of) != X.shape[0]:
            raise ValueError("Duplicated expression rows: cells cannot be identified.")
        self.epochs: list[list[int]] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.epochs.append([])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        parts = batch if isinstance(batch, tuple | list) else (batch,)
        for part in parts:
            X = part["X"].detach().cpu()
            X = X.to_dense() if X.layout != torch.strided else X  # CSR minibatches stay sparse
            X = X.numpy().astype(np.float32)
            self.epochs[-1].extend(self.row_of[row.tobytes()] for row in X)


def _train(name: str, ref, query, adata, strategy: str) -> tuple[Any, SeenCells, Any, np.ndarray]:
    """Set up and train one model on two CPU processes; return it and what it saw."""
    scvi.settings.seed = 0
    cls = getattr(lt, name)
    if name == "JIND":  # JIND trains on the reference alone, then annotates the query
        data = ref.copy()
        cls.setup_anndata(data, labels_key="cell_type")
        model = cls(data, n_top_genes=None)
        target, truth = query.copy(), query.obs["cell_type"].astype(str).to_numpy()
    else:
        data = adata.copy()
        cls.setup_anndata(data, labels_key="cell_type", unlabeled_category="Unknown")
        model = cls(data, **({"n_novel": 0} if name == "SCDET" else {}))
        target = None
        is_query = (data.obs["lt_role"] == "query").to_numpy()
        truth = data.obs["cell_type_original"].astype(str).to_numpy()[is_query]
    seen = SeenCells(data.X.toarray().astype(np.float32))
    model.train(
        max_epochs=EPOCHS,
        batch_size=BATCH_SIZE,
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        enable_progress_bar=False,
        callbacks=[seen],
        **TRAIN_KWARGS[name],
    )
    return model, seen, target, truth


def _accuracy(model, target, truth: np.ndarray) -> float:
    out = model.annotate(target, key_added="ddp", copy=True)
    pred = out.obs["ddp_prediction"].astype(str).to_numpy()
    if target is None:
        pred = pred[(out.obs["lt_role"] == "query").to_numpy()]
    return float((pred == truth).mean())


def _checksum(model) -> float:
    return float(sum(v.double().abs().sum() for v in model.module.state_dict().values()))


def _worker(out_dir: Path, names: list[str]) -> None:
    """Script mode: train the models with strategy="ddp"; every rank writes its record."""
    torch.set_num_threads(1)
    ref, query, adata = _data()
    for name in names:
        model, seen, target, truth = _train(name, ref, query, adata, "ddp")
        rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        record = {
            "rank": rank,
            "world_size": world_size,
            "seen": seen.epochs,
            "train_indices": np.asarray(model.train_indices).tolist(),
            # scNym and scDET also train on the held-out cells, labels hidden
            "unlabelled_validation": np.asarray(
                model.validation_indices if model._validation_in_query_stream else []
            ).tolist(),
            "checksum": _checksum(model),
            "current_epoch": int(model.trainer.current_epoch),
            "training_summary": {
                k: model.training_summary_.get(k) for k in ("best_epoch", "n_train")
            },
            "accuracy": _accuracy(model, target, truth),
        }
        if name == "JIND":  # a single-device stage after DDP training, in every process
            model.align(target, max_epochs=2, accelerator="cpu", devices=1)
            record["aligned_accuracy"] = _accuracy(model, target, truth)
        (out_dir / f"{name}_rank{rank}.json").write_text(json.dumps(record))


@pytest.fixture(scope="module")
def ddp_records(tmp_path_factory) -> dict[str, list[dict]]:
    """Train the four models with strategy="ddp" on 2 CPU processes (one subprocess run)."""
    out_dir = tmp_path_factory.mktemp("ddp")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "NUMBA_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
    }
    # the children import the same labeltransfer as this process
    package_root = str(Path(lt.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), str(out_dir), *MODELS],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {
        name: [json.loads((out_dir / f"{name}_rank{r}.json").read_text()) for r in (0, 1)]
        for name in MODELS
    }


@pytest.mark.parametrize("name", MODELS)
def test_ddp_ranks_train_on_disjoint_shards(ddp_records, name):
    rank0, rank1 = ddp_records[name]
    assert (rank0["rank"], rank1["rank"], rank0["world_size"]) == (0, 1, 2)
    train = set(rank0["train_indices"]) | set(rank0["unlabelled_validation"])
    assert rank0["train_indices"] == rank1["train_indices"]
    assert bool(rank0["unlabelled_validation"]) is (name in ("SCNYM", "SCDET"))
    assert len(rank0["seen"]) == len(rank1["seen"]) == EPOCHS
    for epoch in range(EPOCHS):
        seen0, seen1 = set(rank0["seen"][epoch]), set(rank1["seen"][epoch])
        # every training cell is seen in every epoch, each by one rank; the padding of the
        # shards to equal size (DistributedSampler) repeats at most one cell per set
        assert seen0 | seen1 == train
        assert len(seen0 & seen1) <= 2
        assert abs(len(seen0) - len(seen1)) <= 2
        assert len(seen0) < 0.6 * len(train)
    # a new shuffle every epoch (the nested loaders' samplers get the epoch)
    assert rank0["seen"][0] != rank0["seen"][1]


@pytest.mark.parametrize("name", MODELS)
def test_ddp_model_is_identical_on_every_rank_and_annotates(ddp_records, name):
    rank0, rank1 = ddp_records[name]
    assert rank0["checksum"] == pytest.approx(rank1["checksum"], rel=1e-6)
    assert rank0["current_epoch"] == rank1["current_epoch"] == EPOCHS
    assert rank0["training_summary"] == rank1["training_summary"]
    if name != "SCDET":  # scDET keeps the final epoch
        assert rank0["training_summary"]["best_epoch"] is not None
    assert rank0["accuracy"] == rank1["accuracy"]
    assert rank0["accuracy"] >= MIN_ACCURACY, rank0["accuracy"]
    if name == "JIND":
        assert rank0["aligned_accuracy"] == rank1["aligned_accuracy"] >= MIN_ACCURACY


def test_ddp_fork_returns_the_trained_model_to_this_process():
    """ddp_fork trains in forked children; weights, epochs and best epoch come back."""
    torch.set_num_threads(1)
    ref, query, adata = _data()
    model, seen, target, truth = _train("SCNYM", ref, query, adata, "ddp_fork")
    assert seen.epochs == []  # training ran in the children
    assert model.trainer.current_epoch == EPOCHS
    assert model.training_summary_["best_epoch"] is not None
    assert "validation_accuracy" in model.history_
    assert _accuracy(model, target, truth) >= MIN_ACCURACY


def test_extra_training_stages_refuse_ddp():
    ref, query, _ = _data()
    lt.JIND.setup_anndata(ref, labels_key="cell_type")
    model = lt.JIND(ref, n_top_genes=None)
    model.train(max_epochs=1, accelerator="cpu", enable_progress_bar=False)
    with pytest.raises(ValueError, match="DDP is supported by `model.train\\(\\)` only"):
        model.align(query, max_epochs=1, accelerator="cpu", devices=2, strategy="ddp")


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), sys.argv[2:])
