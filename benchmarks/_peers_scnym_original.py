"""Original scNym child of the harness (``_peers.run_scnym_original``): runs in its own environment.

Reads a reference and a query (raw counts) from h5ad files and runs the original scNym's
documented high-level API (``scnym`` 0.3.2, calico/scnym) with its defaults:
``scnym.api.scnym_api(adata, task="train", groupby=..., out_path=..., config=CONFIG)`` then
``task="predict"`` on the joined reference + query AnnData, input log(CPM + 1)
(``sc.pp.normalize_total(target_sum=1e6)``, ``sc.pp.log1p``), query cells labelled
``"Unlabeled"``. Seeds: ``random.seed``, ``np.random.seed`` and ``torch.manual_seed`` (its
splits use the global NumPy generator). It writes the query's probabilities to an ``.npz`` file
and prints one ``RESULT {json}`` line with the timings, epochs and peak memory.

Only two settings may differ from its defaults: ``n_epochs`` (``MAX_EPOCHS`` > 0, the capped
budgets of the harness) and ``batch_size``. The original holds out 10% of the reference, then
10% of the rest, and loads the remaining labelled cells with ``drop_last=True``: with fewer than
its batch of 256 (CellBench's 274 CEL-seq2 cells leave 221) its first epoch has no batch and it
stops with ``ZeroDivisionError``. The batch is then the largest power of two not above 80% of
the reference (128 on CellBench), recorded as ``batch_size``.

``scnym.dataprep`` imports ``torchvision`` only for ``transforms.Compose``; when torchvision is
missing or does not match the local torch build, an equivalent stub (apply the transforms in
order) is put in ``sys.modules`` first (``torchvision_shim`` in the record). Nothing in
site-packages is edited.

Usage (from ``_peers.py``)::

    <venv>/bin/python benchmarks/_peers_scnym_original.py REF.h5ad QUERY.h5ad OUT.npz \
        LABELS_KEY CONFIG MAX_EPOCHS SEED
"""

from __future__ import annotations

import contextlib
import copy
import io
import sys
import tempfile
import types
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Stopwatch, emit, peak_rss_mb

GROUPBY = "scnym_label"  # the original's label column: reference types + "Unlabeled"
VERSIONS = ("scnym", "torch", "numpy", "scipy", "pandas", "scanpy", "anndata", "scikit-learn")


def torchvision_shim() -> bool:
    """Put a ``torchvision.transforms.Compose`` stub in ``sys.modules`` if torchvision fails."""
    try:
        import torchvision
    except Exception:  # noqa: BLE001 - missing, or a build that does not match torch
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
    else:
        return False

    class Compose:
        """``torchvision.transforms.Compose``: apply the transforms in order."""

        def __init__(self, transforms) -> None:
            self.transforms = list(transforms)

        def __call__(self, x):
            for transform in self.transforms:
                x = transform(x)
            return x

    torchvision = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    transforms.Compose = Compose
    torchvision.transforms = transforms
    sys.modules["torchvision"] = torchvision
    sys.modules["torchvision.transforms"] = transforms
    return True


def main(
    ref_path: str,
    query_path: str,
    out_path: str,
    labels_key: str,
    config_name: str,
    max_epochs: str,
    seed: str,
) -> None:
    """Train on ``ref_path`` + ``query_path``, save the query's probabilities to ``out_path``."""
    warnings.simplefilter("ignore")
    import random
    from importlib.metadata import PackageNotFoundError, version

    import torch

    torch.set_num_threads(1)
    shimmed = torchvision_shim()
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scanpy as sc
    from scnym.api import CONFIGS, UNLABELED_TOKEN, scnym_api

    reference, query = ad.read_h5ad(ref_path), ad.read_h5ad(query_path)
    settings = copy.deepcopy(CONFIGS[config_name])
    if int(max_epochs) > 0:
        settings["n_epochs"] = int(max_epochs)
    room = int(0.8 * reference.n_obs)
    if room < settings["batch_size"]:
        settings["batch_size"] = 2 ** int(np.log2(max(room, 2)))
    random.seed(int(seed))
    np.random.seed(int(seed))  # noqa: NPY002 - the original draws its splits from it
    torch.manual_seed(int(seed))
    sw = Stopwatch()
    log = io.StringIO()  # the original prints per-epoch progress; keep it out of the output
    with tempfile.TemporaryDirectory(prefix="scnym_orig_") as tmp:
        try:
            with sw("train"):
                labels = np.r_[
                    reference.obs[labels_key].astype(str).to_numpy(dtype=object),
                    np.full(query.n_obs, UNLABELED_TOKEN, dtype=object),
                ]
                adata = ad.concat([reference, query], join="inner", index_unique="-")
                adata.obs[GROUPBY] = pd.Categorical(labels)
                sc.pp.normalize_total(adata, target_sum=1e6)
                sc.pp.log1p(adata)
                with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                    scnym_api(
                        adata=adata,
                        task="train",
                        groupby=GROUPBY,
                        out_path=tmp,
                        config=settings,
                    )
            with sw("predict"), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                scnym_api(
                    adata=adata,
                    task="predict",
                    trained_model=tmp,
                    out_path=tmp,
                    config=settings,
                    key_added="scNym",
                )
        except Exception:
            sys.stderr.write(log.getvalue()[-3000:])
            raise
        rows = [
            line.rstrip().split(",")
            for line in (Path(tmp) / f"{Path(tmp).name}_log.csv").read_text().splitlines()
        ]
        n_train = len(np.atleast_1d(np.loadtxt(Path(tmp) / "train_idx.csv")))
    probabilities = adata.uns["scNym_probabilities"].iloc[reference.n_obs :]
    np.savez(
        out_path,
        types=np.asarray(probabilities.columns, dtype=str),
        probabilities=probabilities.to_numpy(dtype=np.float64),
    )
    epochs = sum(1 for r in rows if r[-1] == "val_epoch")
    best = [int(r[0]) for r in rows if r[-1] == "best_model_weights"]
    steps = n_train // settings["batch_size"]
    versions = {}
    for name in VERSIONS:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    emit(
        {
            **sw.record(),
            "config": config_name,
            "batch_size": settings["batch_size"],
            "n_train": n_train,
            "train_epochs": epochs,
            "train_s_per_epoch": sw.seconds["train"] / max(epochs, 1),
            "train_steps_per_epoch": steps,
            # every step: a full labelled batch and a full query batch (repeated, drop_last)
            "train_cells_per_epoch": 2 * settings["batch_size"] * steps,
            "best_epoch": best[-1] if best else None,
            "max_epochs": settings["n_epochs"],
            "torchvision_shim": shimmed,
            "versions": versions,
            "peak_rss_mb": peak_rss_mb(),
        }
    )


if __name__ == "__main__":
    if len(sys.argv) != 8:
        sys.exit(__doc__)
    main(*sys.argv[1:])
