"""CellTypist child of the harness (``_peers.run_celltypist``): runs in its own environment.

Reads a reference and a query (``log1p`` of counts per 10,000, CellTypist's expected input)
from h5ad files, trains a CellTypist model on the reference (``celltypist.train`` with
``feature_selection=True``, the recipe of CellTypist's custom-model tutorial, one job),
annotates the query without and with majority voting (``celltypist.annotate``, mode
``"best match"``, over-clustering computed by CellTypist), writes the calls and the probability
matrices to an ``.npz`` file and prints one ``RESULT {json}`` line with the timings and the
peak resident memory. A failed majority-voting run (at 100,000 query cells its over-clustering
failed inside scanpy 1.11.5's neighbour search with scipy 1.17: ``'csr_array' object has no
attribute 'getnnz'``) is reported in the record as ``majority_voting_error`` and its calls are
left out; the best-match calls and timings stay. It imports neither labeltransfer nor torch.

Usage (from ``_peers.py``)::

    <venv>/bin/python benchmarks/_peers_celltypist.py REF.h5ad QUERY.h5ad OUT.npz LABELS_KEY
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, peak_rss_mb


def main(ref_path: str, query_path: str, out_path: str, labels_key: str) -> None:
    """Train on ``ref_path``, annotate ``query_path``, save the calls to ``out_path``."""
    warnings.simplefilter("ignore")
    import anndata as ad
    import celltypist
    import numpy as np

    reference = ad.read_h5ad(ref_path)
    query = ad.read_h5ad(query_path)
    start = time.perf_counter()
    model = celltypist.train(reference, labels=labels_key, feature_selection=True, n_jobs=1)
    train_s = time.perf_counter() - start

    start = time.perf_counter()
    best = celltypist.annotate(query, model=model, majority_voting=False)
    predict_s = time.perf_counter() - start
    arrays, record = {}, {}
    start = time.perf_counter()
    try:  # a failure here must not lose the best-match measurement above
        voted = celltypist.annotate(query, model=model, majority_voting=True)
    except Exception as error:  # noqa: BLE001 - reported with the record, not swallowed
        record["majority_voting_error"] = f"{type(error).__name__}: {error}"
    else:
        record["predict_mv_s"] = time.perf_counter() - start
        voted_calls = voted.predicted_labels.loc[query.obs_names, "majority_voting"]
        arrays["voted"] = np.asarray(voted_calls, dtype=str)

    probabilities = best.probability_matrix.loc[query.obs_names]
    np.savez(
        out_path,
        types=np.asarray(probabilities.columns, dtype=str),
        probabilities=probabilities.to_numpy(dtype=np.float64),
        best=np.asarray(best.predicted_labels.loc[query.obs_names, "predicted_labels"], dtype=str),
        **arrays,
    )
    emit(
        {
            "train_s": train_s,
            "predict_s": predict_s,
            **record,
            "n_features": int(len(model.features)),
            "celltypist_version": celltypist.__version__,
            "peak_rss_mb": peak_rss_mb(),
        }
    )


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    main(*sys.argv[1:])
