"""Reference/query tasks of the peer benchmark (``benchmarks/run.py``).

Every task gives a reference and a query of raw counts in ``X`` (CSR float32) with the true
type in ``obs["cell_type"]`` (str) and the domain in ``obs["batch"]``. A ``*_novel`` task
removes one type (``Task.held_out``) from the reference only; the query keeps it. Only the
data depend on the suite (``small`` uses fewer synthetic cells); the splits of the real data
sets are the same in both suites, except that the small suite draws 500 cells of each side of
Kang (:data:`MAX_REAL_CELLS`).

Tasks
-----
``kang``
    Kang et al. PBMC, reference ``batch == "ctrl"``, query ``"stim"`` (novel: ``B cells``).
``cellbench_c2d`` / ``cellbench_d2c``
    CellBench three cell lines, CEL-seq2 -> Drop-seq and back (novel: ``H2228``).
``pbmc68k``
    ``scanpy.datasets.pbmc68k_reduced()``, random 70/30 split per seed, labels
    ``bulk_labels`` (novel: ``CD19+ B``). Its ``X`` holds scaled values; the counts are
    rebuilt from ``.raw`` (``log1p`` of counts per 10,000 over the whole transcriptome) as
    ``round(expm1(raw) * n_counts / 1e4)`` over the 765 genes of ``.raw`` (exact to 0.1).
``multiome``
    ``lt.data.synthetic_multiome`` (unpaired, hg38 gene loci): RNA reference, ATAC query.
    ``Task.atac`` holds the peaks (for CellPredX's ``setup_mudata``); ``Task.query`` is the
    ATAC cells' gene activity (``lt.data.gene_activity`` from the peaks and the RNA
    ``var["interval"]``), which the other tools use as their query.
``longtail``
    ``lt.data.synthetic`` with 6 types at 50:1 imbalance in the reference (geometric sizes),
    a balanced query, no batch shift.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from anndata import AnnData

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
TRUE_KEY = "cell_type"

#: name -> (loader, held-out type of the ``*_novel`` variant or None, batch shift between
#: reference and query)
BASE_TASKS: dict[str, tuple[str, str | None, bool]] = {
    "kang": ("kang", "B cells", True),
    "cellbench_c2d": ("cellbench", "H2228", True),
    "cellbench_d2c": ("cellbench", "H2228", True),
    "pbmc68k": ("pbmc68k", "CD19+ B", False),
    "multiome": ("multiome", None, True),
    "longtail": ("longtail", None, False),
}
#: Every task name, novel variants after their base task.
TASKS: tuple[str, ...] = tuple(
    name
    for base, (_, held_out, _) in BASE_TASKS.items()
    for name in ((base, f"{base}_novel") if held_out else (base,))
)
#: Cells of the synthetic tasks per suite.
SYNTHETIC_SIZES: dict[str, dict[str, int]] = {
    "small": {"multiome_cells": 800, "longtail_reference": 1200, "longtail_query": 600},
    "full": {"multiome_cells": 2000, "longtail_reference": 4000, "longtail_query": 2000},
}
#: Most cells kept of each side (reference, query) of a real data set per suite: the small
#: suite subsamples Kang (750 ctrl, 806 stim) to 500 + 500 cells (seeded, uniformly).
MAX_REAL_CELLS: dict[str, int | None] = {"small": 500, "full": None}
PBMC68K_QUERY_FRACTION = 0.3
LONGTAIL = {"n_types": 6, "imbalance": 50.0, "n_genes": 500}


@dataclass
class Task:
    """A reference and a query of raw counts, with what the benchmark needs to know."""

    name: str
    reference: AnnData
    query: AnnData
    held_out: str | None
    shifted: bool
    atac: AnnData | None = None

    @property
    def n_novel(self) -> int:
        """Number of query types absent from the reference."""
        ref = set(self.reference.obs[TRUE_KEY])
        return len(set(self.query.obs[TRUE_KEY]) - ref)


def _clean(adata: AnnData, batch: str) -> AnnData:
    """CSR float32 counts, str labels, a ``batch`` column, unique names."""
    import numpy as np
    from scipy import sparse

    adata = adata.copy()
    adata.X = sparse.csr_matrix(adata.X, dtype=np.float32)
    adata.obs = adata.obs[[TRUE_KEY]].copy()
    adata.obs[TRUE_KEY] = adata.obs[TRUE_KEY].astype(str)
    adata.obs["batch"] = batch
    adata.obs_names_make_unique()
    return adata


def _read_batches(file: str, ref_batch: str, query_batch: str) -> tuple[AnnData, AnnData]:
    import anndata as ad

    adata = ad.read_h5ad(DATA / file)
    adata.obs_names_make_unique()
    batch = adata.obs["batch"].astype(str).to_numpy()
    return (
        _clean(adata[batch == ref_batch], ref_batch),
        _clean(adata[batch == query_batch], query_batch),
    )


def pbmc68k_counts() -> AnnData:
    """``pbmc68k_reduced`` with counts rebuilt from ``.raw`` and ``obs["cell_type"]``."""
    import numpy as np
    import scanpy as sc
    from anndata import AnnData
    from scipy import sparse

    pbmc = sc.datasets.pbmc68k_reduced()
    raw = pbmc.raw.to_adata()
    log_cp10k = raw.X.toarray() if sparse.issparse(raw.X) else np.asarray(raw.X)
    totals = pbmc.obs["n_counts"].to_numpy(dtype=np.float64)[:, None]
    counts = np.round(np.expm1(log_cp10k.astype(np.float64)) * totals / 1e4)
    obs = pbmc.obs[["bulk_labels"]].rename(columns={"bulk_labels": TRUE_KEY})
    out = AnnData(sparse.csr_matrix(counts.astype(np.float32)), obs=obs)
    out.var_names = raw.var_names
    return out


def _pbmc68k(seed: int) -> tuple[AnnData, AnnData]:
    import numpy as np

    adata = pbmc68k_counts()
    rng = np.random.default_rng(seed)
    is_query = np.zeros(adata.n_obs, dtype=bool)
    n_query = round(PBMC68K_QUERY_FRACTION * adata.n_obs)
    is_query[rng.choice(adata.n_obs, n_query, replace=False)] = True
    return _clean(adata[~is_query], "reference"), _clean(adata[is_query], "query")


def _multiome(seed: int, n_cells: int) -> tuple[AnnData, AnnData, AnnData]:
    """RNA reference, ATAC peaks and the ATAC cells' gene activity."""
    import labeltransfer as lt

    rna, atac = lt.data.synthetic_multiome(
        n_cells=n_cells,
        n_genes=500,
        n_background_peaks=2000,
        paired=False,
        seed=seed,
        genome_table=DATA / "hs_genes_hg38.tsv.gz",
    )
    activity = lt.data.gene_activity(atac, genes=rna)
    activity.obs[TRUE_KEY] = atac.obs[TRUE_KEY].astype(str).to_numpy()
    reference = _clean(rna, "rna")
    reference.var = rna.var.copy()  # keeps var["interval"] for setup_mudata
    return reference, atac, _clean(activity, "atac")


def _longtail(seed: int, sizes: dict[str, int]) -> tuple[AnnData, AnnData]:
    import labeltransfer as lt

    reference, query = lt.data.synthetic(
        n_reference=sizes["longtail_reference"],
        n_query=sizes["longtail_query"],
        n_genes=LONGTAIL["n_genes"],
        n_types=LONGTAIL["n_types"],
        imbalance=LONGTAIL["imbalance"],
        batch_shift=0.0,
        seed=seed,
    )
    return _clean(reference, "reference"), _clean(query, "query")


def _subsample(adata: AnnData, n_cells: int, seed: int) -> AnnData:
    """At most ``n_cells`` cells of ``adata``, drawn uniformly without replacement."""
    import numpy as np

    if adata.n_obs <= n_cells:
        return adata
    keep = np.random.default_rng(seed).choice(adata.n_obs, n_cells, replace=False)
    return adata[np.sort(keep)].copy()


def load_task(name: str, seed: int, suite: str = "small") -> Task:
    """Build task ``name`` (see :data:`TASKS`) for ``seed`` and ``suite`` (``small``/``full``).

    Raises
    ------
    ValueError
        An unknown task or suite.
    """
    if suite not in SYNTHETIC_SIZES:
        raise ValueError(f"Unknown suite {suite!r}; use one of {sorted(SYNTHETIC_SIZES)}.")
    base = name.removesuffix("_novel")
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; use one of {', '.join(TASKS)}.")
    loader, held_out, shifted = BASE_TASKS[base]
    held_out = held_out if name.endswith("_novel") else None
    sizes = SYNTHETIC_SIZES[suite]
    atac = None
    if loader == "kang":
        reference, query = _read_batches("kang_ifnb_small.h5ad", "ctrl", "stim")
    elif loader == "cellbench":
        pair = ("CEL-seq2", "Drop-seq") if base == "cellbench_c2d" else ("Drop-seq", "CEL-seq2")
        reference, query = _read_batches("cellbench_3cl.h5ad", *pair)
    elif loader == "pbmc68k":
        reference, query = _pbmc68k(seed)
    elif loader == "multiome":
        reference, atac, query = _multiome(seed, sizes["multiome_cells"])
    else:
        reference, query = _longtail(seed, sizes)
    if loader in ("kang", "cellbench") and MAX_REAL_CELLS[suite] is not None:
        reference = _subsample(reference, MAX_REAL_CELLS[suite], seed)
        query = _subsample(query, MAX_REAL_CELLS[suite], seed + 1000)
    if held_out is not None:
        reference = reference[reference.obs[TRUE_KEY] != held_out].copy()
    return Task(name, reference, query, held_out, shifted, atac)


def describe_tasks(suite: str) -> list[dict[str, Any]]:
    """One row per task (seed 0): cells, genes, types and the held-out type."""
    rows = []
    for name in TASKS:
        task = load_task(name, 0, suite)
        rows.append(
            {
                "task": name,
                "n_reference": task.reference.n_obs,
                "n_query": task.query.n_obs,
                "n_genes": task.reference.n_vars,
                "n_types": task.reference.obs[TRUE_KEY].nunique(),
                "held_out": task.held_out or "",
                "shift": task.shifted,
            }
        )
    return rows
