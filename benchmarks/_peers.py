"""Peer tools of the benchmark: scANVI, CellTypist, the original scNym, sklearn baselines.

Each runner takes a :class:`~_tasks.Task` (raw counts) and a :class:`~_tools.RunContext` and
returns ``{tool: (Calls, info)}``. None of these peers has a rejection rule in the recipes used
here, so nothing is rejected (their effective accuracy equals their raw accuracy), and their
novelty score is ``1 - confidence``.

- **scANVI** (scvi-tools, main environment): the scArches reference-mapping recipe of the
  scvi-tools tutorials. ``SCVI`` on the reference's 2,000 most variable genes
  (``n_layers=2``, ``encode_covariates=True``, ``deeply_inject_covariates=False``,
  ``use_layer_norm="both"``, ``use_batch_norm="none"``), ``SCANVI.from_scvi_model`` trained
  with ``n_samples_per_label=100``, then ``SCANVI.prepare_query_anndata`` +
  ``SCANVI.load_query_data`` on the query (labels set to the unlabeled category) and a short
  query training (``weight_decay=0``); ``predict(soft=True)`` gives the probabilities.
- **CellTypist** (own environment, ``_envs.py``; child ``_peers_celltypist.py``): one
  training, two annotations (best match, and majority voting as ``celltypist_mv``).
- **Original scNym** (own environment; child ``_peers_scnym_original.py``): its documented
  ``scnym_api`` with its defaults (``new_identity_discovery`` configuration where a type is
  held out, as for ``lt.SCNYM``).
- **Logistic regression** and **kNN** (scikit-learn) on ``log1p(CPM)`` of the reference's
  2,000 most variable genes (``lt.data.select_features``, Seurat flavour): multinomial
  ``LogisticRegression(max_iter=1000)``; ``KNeighborsClassifier(n_neighbors=15)`` on the 50
  principal components of the reference (the query projected onto them).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from _common import run_child
from _envs import env_python
from _scoring import Calls
from _tasks import TRUE_KEY

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    from _tasks import Task
    from _tools import RunContext
    from anndata import AnnData

HERE = Path(__file__).resolve().parent
N_TOP_GENES = 2000
UNLABELED = "Unknown"
CPU = {"accelerator": "cpu", "enable_progress_bar": False}


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
def run_sklearn(task: Task, ctx: RunContext) -> dict[str, tuple[Calls, dict[str, Any]]]:
    """Logistic regression (tool ``logreg``) or kNN (tool ``knn``) on log1p-CPM HVGs."""
    import pandas as pd
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline

    labels = task.reference.obs[TRUE_KEY].to_numpy(dtype=str)
    start = time.perf_counter()
    ref, query, genes = hvg_log_cpm(task)
    if ctx.name == "logreg":
        model = LogisticRegression(max_iter=1000, random_state=ctx.seed)
    else:
        n_pcs = min(50, ref.shape[0] - 1, ref.shape[1])
        model = make_pipeline(
            PCA(n_pcs, random_state=ctx.seed),
            KNeighborsClassifier(n_neighbors=min(15, ref.shape[0])),
        )
    model.fit(ref, labels)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    probabilities = pd.DataFrame(
        model.predict_proba(query), index=task.query.obs_names, columns=model.classes_
    )
    info = {"train_s": train_s, "predict_s": time.perf_counter() - start, "n_features": len(genes)}
    return {ctx.name: (Calls.from_probabilities(probabilities), info)}


# ----------------------------------------------------------------------------- scANVI
def run_scanvi(task: Task, ctx: RunContext) -> dict[str, tuple[Calls, dict[str, Any]]]:
    """scANVI reference mapping (see the module docstring)."""
    from scvi.model import SCANVI, SCVI

    import labeltransfer as lt

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
    vae.train(max_epochs=ctx.epochs("scvi"), **CPU)
    scanvae = SCANVI.from_scvi_model(vae, unlabeled_category=UNLABELED)
    scanvae.train(max_epochs=ctx.epochs("scanvi"), n_samples_per_label=100, **CPU)
    train_s = time.perf_counter() - start

    start = time.perf_counter()
    query = task.query.copy()
    query.obs = query.obs[[]]
    query.obs[TRUE_KEY] = UNLABELED
    query.obs["batch"] = "query"
    SCANVI.prepare_query_anndata(query, scanvae)
    mapped = SCANVI.load_query_data(query, scanvae)
    mapped.train(max_epochs=ctx.epochs("query"), plan_kwargs={"weight_decay": 0.0}, **CPU)
    query_fit_s = time.perf_counter() - start
    start = time.perf_counter()
    probabilities = mapped.predict(soft=True)
    probabilities.index = task.query.obs_names
    info = {
        "train_s": train_s,
        "query_fit_s": query_fit_s,
        "predict_s": query_fit_s + time.perf_counter() - start,
        "n_features": int(reference.n_vars),
        "train_epochs": int(vae.history["elbo_train"].shape[0]),
        "query_epochs": int(mapped.history["elbo_train"].shape[0]),
    }
    return {ctx.name: (Calls.from_probabilities(probabilities), info)}


# ----------------------------------------------------------------------------- own environments
def _run_in_env(
    env: str, script: str, reference: AnnData, query: AnnData, *args: str, timeout: float | None
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Run ``script REF.h5ad QUERY.h5ad OUT.npz *args`` in environment ``env``.

    Returns the child's ``RESULT`` record (its timings and peak memory) and the arrays it saved.
    """
    import numpy as np

    python = env_python(env)
    with tempfile.TemporaryDirectory(prefix=f"lt_{env}_") as tmp:
        paths = [Path(tmp) / name for name in ("reference.h5ad", "query.h5ad", "calls.npz")]
        reference.write_h5ad(paths[0])
        query.write_h5ad(paths[1])
        records, error, wall = run_child(
            [str(HERE / script), *map(str, paths), *args], timeout=timeout, python=python
        )
        if error:
            raise RuntimeError(f"The {env} child ({script}) failed:\n{error}")
        with np.load(paths[2]) as saved:
            arrays = {name: saved[name] for name in saved.files}
    return {**records[0], "child_wall_s": wall}, arrays


def run_celltypist(task: Task, ctx: RunContext) -> dict[str, tuple[Calls, dict[str, Any]]]:
    """CellTypist: ``celltypist`` (best match) and ``celltypist_mv`` (majority voting) calls."""
    import numpy as np
    import pandas as pd

    reference = log1p_normalize(task.reference, 1e4)  # CellTypist's expected input
    reference.obs = reference.obs[[TRUE_KEY]]
    query = log1p_normalize(task.query, 1e4)
    query.obs = query.obs[[]]
    record, saved = _run_in_env(
        "celltypist", "_peers_celltypist.py", reference, query, TRUE_KEY, timeout=ctx.timeout
    )
    probabilities = pd.DataFrame(
        saved["probabilities"], index=task.query.obs_names, columns=saved["types"]
    )
    columns = list(probabilities.columns)
    values = probabilities.to_numpy(dtype=np.float64)
    info = {k: v for k, v in record.items() if k not in ("predict_s", "predict_mv_s")}
    out = {}
    runs = [("celltypist", saved["best"], "predict_s")]
    if "voted" in saved:  # else the record says why: majority_voting_error
        runs.append(("celltypist_mv", saved["voted"], "predict_mv_s"))
    for tool, called, predict in runs:
        # confidence of the call: CellTypist's probability of the called type
        confidence = values[np.arange(len(called)), [columns.index(c) for c in called]]
        calls = Calls(
            called, called.copy(), confidence, np.zeros(len(called), bool), probabilities
        )
        out[tool] = (calls, {**info, "predict_s": record[predict]})
    return out


def run_scnym_original(task: Task, ctx: RunContext) -> dict[str, tuple[Calls, dict[str, Any]]]:
    """The original scNym's ``scnym_api`` on raw counts (the child normalises as it documents)."""
    import pandas as pd

    reference = task.reference.copy()
    reference.obs = reference.obs[[TRUE_KEY]]
    query = task.query.copy()
    query.obs = query.obs[[]]
    config = "new_identity_discovery" if task.held_out else "no_new_identity"
    epochs = ctx.epochs("train")
    record, saved = _run_in_env(
        "scnym_original",
        "_peers_scnym_original.py",
        reference,
        query,
        TRUE_KEY,
        config,
        str(epochs or 0),
        str(ctx.seed),
        timeout=ctx.timeout,
    )
    probabilities = pd.DataFrame(
        saved["probabilities"], index=task.query.obs_names, columns=saved["types"]
    )
    return {ctx.name: (Calls.from_probabilities(probabilities), record)}
