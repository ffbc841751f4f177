"""Peer methods of the benchmark (``benchmarks/run.py``): scANVI, CellTypist, sklearn baselines.

Each runner takes a :class:`~_tasks.Task` (raw counts) and returns :class:`Calls`, the
per-cell output every tool is scored on, and a dict of timings. None of these peers has a
rejection rule of its own in the recipes used here, so nothing is rejected: their rejection
rate is 0 and their effective accuracy equals their raw accuracy.

- **scANVI** (scvi-tools, main environment): the scArches reference-mapping recipe of the
  scvi-tools tutorials. ``SCVI`` on the reference's 2,000 most variable genes
  (``n_layers=2``, ``encode_covariates=True``, ``deeply_inject_covariates=False``,
  ``use_layer_norm="both"``, ``use_batch_norm="none"``), ``SCANVI.from_scvi_model`` trained
  with ``n_samples_per_label=100``, then ``SCANVI.prepare_query_anndata`` +
  ``SCANVI.load_query_data`` on the query (labels set to the unlabeled category) and a short
  query training (``weight_decay=0``); ``predict(soft=True)`` gives the probabilities.
- **CellTypist** (own virtual environment, :func:`celltypist_python`): see
  ``_peers_celltypist.py``; one training, two annotations (best match, majority voting).
- **Logistic regression** and **kNN** (scikit-learn) on ``log1p(CPM)`` of the reference's
  2,000 most variable genes (``lt.data.select_features``, Seurat flavour): multinomial
  ``LogisticRegression(max_iter=1000)``; ``KNeighborsClassifier(n_neighbors=15)`` on the 50
  principal components of the reference (the query projected onto them).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from _common import run_child
from _tasks import ROOT, TRUE_KEY

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    from _tasks import Task
    from anndata import AnnData

N_TOP_GENES = 2000
UNLABELED = "Unknown"
#: The CellTypist virtual environment (git-ignored) and the version installed there.
CELLTYPIST_VENV = ROOT / ".benchmarks" / "venvs" / "celltypist"
#: CellTypist 1.7.1 passes ``multi_class`` to ``LogisticRegression``, which scikit-learn 1.8
#: removed: the environment pins an older scikit-learn over the main environment's.
CELLTYPIST_REQUIREMENTS = ("celltypist==1.7.1", "scikit-learn>=1.5,<1.8")
#: Epoch budgets of the scANVI recipe per suite (None: scvi-tools' default heuristic).
SCANVI_EPOCHS: dict[str, dict[str, int | None]] = {
    "small": {"scvi": 30, "scanvi": None, "query": 20},
    "full": {"scvi": None, "scanvi": None, "query": 100},
}


@dataclass
class Calls:
    """Per-query-cell output of one tool, in the fields of ``annotate``."""

    prediction: np.ndarray
    final: np.ndarray
    confidence: np.ndarray
    rejected: np.ndarray
    probabilities: pd.DataFrame

    @classmethod
    def from_probabilities(cls, probabilities: pd.DataFrame) -> Calls:
        """Argmax calls and max-probability confidences, nothing rejected."""
        import numpy as np

        values = probabilities.to_numpy(dtype=np.float64)
        prediction = np.asarray(probabilities.columns, dtype=str)[values.argmax(axis=1)]
        return cls(
            prediction=prediction,
            final=prediction.copy(),
            confidence=values.max(axis=1),
            rejected=np.zeros(len(values), dtype=bool),
            probabilities=probabilities,
        )


# ----------------------------------------------------------------------------- features
def log1p_normalize(adata: AnnData, target_sum: float) -> AnnData:
    """``log1p`` of the counts scaled to ``target_sum`` per cell (CSR float32), a copy."""
    import numpy as np
    from scipy import sparse

    counts = sparse.csr_matrix(adata.X, dtype=np.float32)
    totals = np.asarray(counts.sum(axis=1)).ravel()
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    out = adata.copy()
    out.X = sparse.csr_matrix(sparse.diags(scale.astype(np.float32)) @ counts)
    out.X.data = np.log1p(out.X.data)
    return out


def on_genes(adata: AnnData, genes: pd.Index) -> np.ndarray:
    """Dense cells x ``genes`` matrix of ``adata``; genes it lacks are zero."""
    import numpy as np
    from scipy import sparse

    position = adata.var_names.get_indexer(genes)
    present = position >= 0
    dense = np.zeros((adata.n_obs, len(genes)), dtype=np.float32)
    block = adata.X[:, position[present]]
    dense[:, present] = block.toarray() if sparse.issparse(block) else block
    return dense


def hvg_log_cpm(task: Task) -> tuple[np.ndarray, np.ndarray, pd.Index]:
    """``log1p(CPM)`` of the reference and the query on the reference's HVGs."""
    import labeltransfer as lt

    index = lt.data.select_features(
        task.reference, n_top_genes=min(N_TOP_GENES, task.reference.n_vars)
    )
    genes = task.reference.var_names[index]
    ref = on_genes(log1p_normalize(task.reference, 1e6), genes)
    query = on_genes(log1p_normalize(task.query, 1e6), genes)
    return ref, query, genes


# ----------------------------------------------------------------------------- sklearn
def run_sklearn(task: Task, method: str, seed: int) -> tuple[Calls, dict[str, Any]]:
    """Logistic regression (``"logreg"``) or kNN (``"knn"``) on log1p-CPM HVGs."""
    import pandas as pd
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline

    labels = task.reference.obs[TRUE_KEY].to_numpy(dtype=str)
    start = time.perf_counter()
    ref, query, genes = hvg_log_cpm(task)
    if method == "logreg":
        model = LogisticRegression(max_iter=1000, random_state=seed)
    elif method == "knn":
        n_pcs = min(50, ref.shape[0] - 1, ref.shape[1])
        model = make_pipeline(
            PCA(n_pcs, random_state=seed),
            KNeighborsClassifier(n_neighbors=min(15, ref.shape[0])),
        )
    else:
        raise ValueError(f"Unknown sklearn baseline {method!r}; use 'logreg' or 'knn'.")
    model.fit(ref, labels)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    probabilities = pd.DataFrame(
        model.predict_proba(query), index=task.query.obs_names, columns=model.classes_
    )
    predict_s = time.perf_counter() - start
    return Calls.from_probabilities(probabilities), {
        "train_s": train_s,
        "predict_s": predict_s,
        "n_features": len(genes),
    }


# ----------------------------------------------------------------------------- scANVI
def run_scanvi(task: Task, seed: int, suite: str) -> tuple[Calls, dict[str, Any]]:
    """scANVI reference mapping (see the module docstring)."""
    import scvi
    from scvi.model import SCANVI, SCVI

    import labeltransfer as lt

    scvi.settings.seed = seed
    epochs = SCANVI_EPOCHS[suite]
    cpu = {"accelerator": "cpu", "enable_progress_bar": False}
    start = time.perf_counter()
    index = lt.data.select_features(
        task.reference, n_top_genes=min(N_TOP_GENES, task.reference.n_vars)
    )
    reference = task.reference[:, index].copy()
    SCVI.setup_anndata(reference, batch_key="batch", labels_key=TRUE_KEY)
    vae = SCVI(
        reference,
        n_layers=2,
        encode_covariates=True,
        deeply_inject_covariates=False,
        use_layer_norm="both",
        use_batch_norm="none",
    )
    vae.train(max_epochs=epochs["scvi"], **cpu)
    scanvae = SCANVI.from_scvi_model(vae, unlabeled_category=UNLABELED)
    scanvae.train(max_epochs=epochs["scanvi"], n_samples_per_label=100, **cpu)
    train_s = time.perf_counter() - start

    start = time.perf_counter()
    query = task.query.copy()
    query.obs[TRUE_KEY] = UNLABELED
    query.obs["batch"] = "query"
    SCANVI.prepare_query_anndata(query, scanvae)
    mapped = SCANVI.load_query_data(query, scanvae)
    mapped.train(max_epochs=epochs["query"], plan_kwargs={"weight_decay": 0.0}, **cpu)
    query_fit_s = time.perf_counter() - start
    start = time.perf_counter()
    probabilities = mapped.predict(soft=True)
    predict_s = time.perf_counter() - start
    probabilities.index = task.query.obs_names
    return Calls.from_probabilities(probabilities), {
        "train_s": train_s,
        "query_fit_s": query_fit_s,
        "predict_s": query_fit_s + predict_s,
        "n_features": int(reference.n_vars),
        "epochs_scvi": int(vae.history["elbo_train"].shape[0]),
        "epochs_query": int(mapped.history["elbo_train"].shape[0]),
    }


# ----------------------------------------------------------------------------- CellTypist
def celltypist_python(venv: Path = CELLTYPIST_VENV) -> Path:
    """The CellTypist environment's python; created (and CellTypist installed) when missing.

    ``python -m venv --system-site-packages``: CellTypist's dependencies (scanpy, numpy, ...)
    come from the main environment when they are installed there, so pip adds CellTypist, a
    scikit-learn it works with (:data:`CELLTYPIST_REQUIREMENTS`) and whatever is missing;
    CellTypist needs no torch. The environment is rebuilt when the requirements change.
    """
    python = venv / "bin" / "python"
    ready = venv / ".installed"
    wanted = "\n".join(CELLTYPIST_REQUIREMENTS) + "\n"
    if python.exists() and ready.exists() and ready.read_text() == wanted:
        return python
    venv.parent.mkdir(parents=True, exist_ok=True)
    steps = [
        [sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
        [str(python), "-m", "pip", "install", "--quiet", *CELLTYPIST_REQUIREMENTS],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(
                f"Could not create the CellTypist environment ({' '.join(step)}):\n"
                f"{done.stderr[-3000:]}\nDelete {venv} and rerun, or check that PyPI is "
                "reachable."
            )
    ready.write_text(wanted)
    return python


def run_celltypist(task: Task, timeout: float | None = None) -> dict[str, Any]:
    """CellTypist in its own environment: best-match and majority-voting calls.

    Returns ``{"celltypist": (Calls, info), "celltypist_mv": (Calls, info)}``; ``info`` holds
    the child's timings and peak memory (the training is shared by both).
    """
    import numpy as np
    import pandas as pd

    python = celltypist_python()
    with tempfile.TemporaryDirectory(prefix="lt_celltypist_") as tmp:
        paths = [Path(tmp) / name for name in ("reference.h5ad", "query.h5ad", "calls.npz")]
        reference = log1p_normalize(task.reference, 1e4)
        reference.obs = reference.obs[[TRUE_KEY]]
        reference.write_h5ad(paths[0])
        query = log1p_normalize(task.query, 1e4)
        query.obs = query.obs[[]]
        query.write_h5ad(paths[1])
        script = Path(__file__).with_name("_peers_celltypist.py")
        records, error, wall = run_child(
            [str(script), *map(str, paths), TRUE_KEY], timeout=timeout, python=python
        )
        if error:
            raise RuntimeError(f"CellTypist child failed:\n{error}")
        saved = np.load(paths[2])
        probabilities = pd.DataFrame(
            saved["probabilities"], index=task.query.obs_names, columns=saved["types"]
        )
        calls = {"celltypist": saved["best"], "celltypist_mv": saved["voted"]}
    info = {k: v for k, v in records[0].items() if k not in ("predict_s", "predict_mv_s")}
    info["child_wall_s"] = wall
    columns = list(probabilities.columns)
    values = probabilities.to_numpy(dtype=np.float64)
    out = {}
    for tool, called in calls.items():
        # confidence of the call: CellTypist's probability of the called type
        confidence = values[np.arange(len(called)), [columns.index(c) for c in called]]
        out[tool] = (
            Calls(
                prediction=called,
                final=called.copy(),
                confidence=confidence,
                rejected=np.zeros(len(called), dtype=bool),
                probabilities=probabilities,
            ),
            {
                **info,
                "predict_s": records[0]["predict_s" if tool == "celltypist" else "predict_mv_s"],
            },
        )
    return out
