"""Task registry of the benchmark harness: every reference/query split, in one table.

A task gives a reference and a query of raw counts in ``X`` (CSR float32) with the true type in
``obs["cell_type"]`` (str) and the domain in ``obs["batch"]``; CellBench queries also carry
``obs["singlet"]`` (demuxlet calls the cell a singlet). To add a task, add one
:class:`TaskSpec` to :data:`TASKS` (and, for a new data set, a loader to :data:`SOURCES`).

How a :class:`TaskSpec` becomes a :class:`Task` (:func:`load_task`):

1. the source is read and split into named parts (its batches);
2. reference = part ``reference``; query = part ``query``, or, when ``query`` is None, a random
   :data:`NOSHIFT_QUERY_FRACTION` of the reference part (per seed: a split without shift).
   ``intra=True`` is scDET's intra-data protocol instead: the types of all parts are split at
   random (per seed) into ``ceil(n / 2)`` seen and the rest novel; a random half of the seen
   cells is the reference, every other cell the query;
3. each side of a real data set is subsampled to :data:`MAX_REAL_CELLS` of the budget (seeded);
4. ``held_out`` types, and ``n_random_held_out`` types drawn per seed (scDET's inter-data
   protocol), are removed from the reference only: the query keeps them;
5. ``strong_shift=True``: the query's counts go through ``lt.data.strong_shift`` (its
   defaults, the task's seed): per-gene factors, per-gene dropout, half the depth and 10% of
   the genes absent, as another species or platform would look.

Budgets: ``full`` uses every cell, ``small`` at most 500 per side of a real set and fewer
synthetic cells, ``quick`` (smoke runs) at most 150 per side and tiny synthetic sets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from _common import ROOT

if TYPE_CHECKING:
    from collections.abc import Callable

    from anndata import AnnData

DATA = ROOT.parent / "shared" / "data"
TRUE_KEY = "cell_type"
BUDGETS = ("quick", "small", "full")
#: Most cells kept of each side (reference, query) of a real data set, per budget.
MAX_REAL_CELLS: dict[str, int | None] = {"quick": 150, "small": 500, "full": None}
#: Sizes of the synthetic data sets per budget (``subtype_scale`` multiplies the cell counts
#: of scDET's long-tail simulation, :data:`SUBTYPE_LONGTAIL`).
SYNTHETIC_SIZES: dict[str, dict[str, float]] = {
    "quick": {
        "multiome_cells": 300,
        "longtail_reference": 300,
        "longtail_query": 150,
        "balanced_cells": 200,
        "subtype_scale": 0.2,
    },
    "small": {
        "multiome_cells": 800,
        "longtail_reference": 1200,
        "longtail_query": 600,
        "balanced_cells": 800,
        "subtype_scale": 1.0,
    },
    "full": {
        "multiome_cells": 2000,
        "longtail_reference": 4000,
        "longtail_query": 2000,
        "balanced_cells": 800,
        "subtype_scale": 1.0,
    },
}
NOSHIFT_QUERY_FRACTION = 0.3
LONGTAIL = {"n_types": 6, "imbalance": 50.0, "n_genes": 500}
#: scDET's long-tail simulation: seen types 1500 / 600 / 240 / 30 cells (50:1), the rarest a
#: subtype of the largest (its markers plus ``n_own`` genes of its own raised ``own_fold``);
#: novel types 250 / 150 cells.
SUBTYPE_LONGTAIL = {
    "sizes": (1500, 600, 240, 30, 250, 150),
    "n_genes": 300,
    "n_markers": 20,
    "n_own": 8,
    "own_fold": (4.0, 6.0),
}


# ============================================================================ registry
@dataclass(frozen=True)
class TaskSpec:
    """How to build one task from a source (see the module docstring)."""

    source: str
    reference: str | None
    query: str | None
    shifted: bool
    about: str
    held_out: tuple[str, ...] = ()
    #: in the peer table (suites ``small`` and ``full``)
    peer_table: bool = False
    n_random_held_out: int = 0
    intra: bool = False
    #: obs column of the source used as the task's ``batch`` (the domains a model sees)
    domain: str = "batch"
    #: the query goes through ``lt.data.strong_shift`` (defaults, the task's seed)
    strong_shift: bool = False


def _kang(about: str, held_out: tuple[str, ...] = (), **kwargs: Any) -> TaskSpec:
    return TaskSpec(
        "kang", "ctrl", "stim", True, f"Kang PBMC ctrl -> stim{about}", held_out, **kwargs
    )


def _cellbench(
    ref: str, query: str, held_out: tuple[str, ...] = (), strong_shift: bool = False
) -> TaskSpec:
    about = f"CellBench three cell lines, {ref} -> {query}"
    if held_out:
        about += f", {held_out[0]} held out"
    if strong_shift:
        about += _STRONG
    return TaskSpec(
        "cellbench", ref, query, True, about, held_out, peer_table=True, strong_shift=strong_shift
    )


def _granja(about: str, held_out: tuple[str, ...] = ()) -> TaskSpec:
    return TaskSpec(
        "granja",
        "BMMC_D6T1",
        "BMMC_D5T1",
        True,
        f"Granja 2019 scATAC peaks, donor D6T1 -> D5T1{about}",
        held_out,
        peer_table=True,
    )


_C2D, _D2C = ("CEL-seq2", "Drop-seq"), ("Drop-seq", "CEL-seq2")
_STRONG = ", query strongly shifted (lt.data.strong_shift)"
_LINES = ("H1975", "H2228", "HCC827")
_PBMC68K = "pbmc68k_reduced (bulk_labels), random 70% -> 30%"

#: Every task by name; ``peer_table=True``: in the peer table.
TASKS: dict[str, TaskSpec] = {
    "kang": _kang("", peer_table=True),
    "kang_strongshift": _kang(_STRONG, peer_table=True, strong_shift=True),
    "kang_novel_b": _kang(", B cells held out", ("B cells",), peer_table=True),
    "kang_novel_fcgr3a": _kang(
        ", FCGR3A+ monocytes held out", ("FCGR3A+ Monocytes",), peer_table=True
    ),
    "kang_noshift": TaskSpec(
        "kang", "ctrl", None, False, "Kang PBMC ctrl, random 70% -> 30%", peer_table=True
    ),
    **{
        f"kang_{sample}": TaskSpec(
            "kang_donors", "ctrl", sample, True, f"Kang PBMC ctrl101 + ctrl107 -> {sample}"
        )
        for sample in ("stim101", "stim107")
    },
    "kang_samples": _kang(", the two donors' samples as four domains", domain="sample"),
    "kang_inter2": _kang(", two types drawn per seed held out", n_random_held_out=2),
    "kang_intra": TaskSpec(
        "kang",
        None,
        None,
        False,
        "Kang PBMC, half of the types novel (scDET intra-data)",
        intra=True,
    ),
    "cellbench_c2d": _cellbench(*_C2D),
    "cellbench_c2d_strongshift": _cellbench(*_C2D, strong_shift=True),
    **{f"cellbench_c2d_novel_{line.lower()}": _cellbench(*_C2D, (line,)) for line in _LINES},
    "cellbench_d2c": _cellbench(*_D2C),
    **{f"cellbench_d2c_novel_{line.lower()}": _cellbench(*_D2C, (line,)) for line in _LINES},
    "cellbench_noshift": TaskSpec(
        "cellbench", "CEL-seq2", None, False, "CellBench CEL-seq2, random 70% -> 30%"
    ),
    "cellbench_intra": TaskSpec(
        "cellbench",
        None,
        None,
        False,
        "CellBench, half of the lines novel (scDET intra-data)",
        intra=True,
    ),
    "pbmc68k": TaskSpec("pbmc68k", "all", None, False, _PBMC68K, peer_table=True),
    "pbmc68k_novel_cd19b": TaskSpec(
        "pbmc68k",
        "all",
        None,
        False,
        f"{_PBMC68K}, CD19+ B held out",
        ("CD19+ B",),
        peer_table=True,
    ),
    "atac": _granja(""),
    "atac_novel_b": _granja(", 17_B held out", ("17_B",)),
    "multiome": TaskSpec(
        "multiome",
        "rna",
        "atac",
        True,
        "synthetic unpaired RNA -> ATAC (gene activity)",
        peer_table=True,
    ),
    "multiome_novel": TaskSpec(
        "multiome_novel", "rna", "atac", True, "synthetic RNA -> ATAC, one ATAC-only type"
    ),
    "longtail": TaskSpec(
        "longtail",
        "reference",
        "query",
        False,
        "synthetic, 6 types at 50:1 in the reference",
        peer_table=True,
    ),
    "subtype_longtail": TaskSpec(
        "subtype_longtail",
        "reference",
        "query",
        False,
        "scDET long tail: 50:1 seen types, the rarest a subtype, 2 novel types",
    ),
    **{
        f"synthetic_novel{n}": TaskSpec(
            f"balanced_novel{n}", "reference", "query", True, f"synthetic, {n} novel types"
        )
        for n in range(4)
    },
}


@dataclass
class Task:
    """A reference and a query of raw counts, with what the benchmark needs to know."""

    name: str
    reference: AnnData
    query: AnnData
    held_out: tuple[str, ...]
    shifted: bool
    atac: AnnData | None = None

    @property
    def reference_types(self) -> list[str]:
        """Sorted types of the reference."""
        return sorted(set(self.reference.obs[TRUE_KEY]))

    @property
    def novel_types(self) -> list[str]:
        """Sorted query types absent from the reference."""
        return sorted(set(self.query.obs[TRUE_KEY]) - set(self.reference_types))

    @property
    def n_novel(self) -> int:
        """Number of query types absent from the reference."""
        return len(self.novel_types)

    @property
    def multi_domain(self) -> bool:
        """More than one domain on a side (e.g. the Kang samples)."""
        return self.reference.obs["batch"].nunique() > 1 or self.query.obs["batch"].nunique() > 1


# ============================================================================ sources
@dataclass
class Source:
    """A data set split into named parts; ``atac`` holds the peaks of a multiome source."""

    parts: dict[str, AnnData]
    real: bool
    atac: AnnData | None = None


def _clean(adata: AnnData, domain: str = "batch") -> AnnData:
    """CSR float32 counts; obs ``cell_type`` (str), ``batch`` (from ``domain``), ``singlet``."""
    import numpy as np
    import pandas as pd
    from scipy import sparse

    adata = adata.copy()
    adata.X = sparse.csr_matrix(adata.X, dtype=np.float32)
    obs = pd.DataFrame(index=adata.obs_names)
    obs[TRUE_KEY] = adata.obs[TRUE_KEY].astype(str).to_numpy()
    obs["batch"] = adata.obs[domain].astype(str).to_numpy()
    if "demuxlet_cls" in adata.obs:
        obs["singlet"] = (adata.obs["demuxlet_cls"].astype(str) == "SNG").to_numpy()
    adata.obs = obs
    adata.obs_names_make_unique()
    return adata


def _by_batch(file: str, domain: str = "batch") -> Source:
    """A shared h5ad split by ``obs["batch"]``."""
    import anndata as ad

    adata = ad.read_h5ad(DATA / file)
    adata.obs_names_make_unique()
    batch = adata.obs["batch"].astype(str).to_numpy()
    parts = {name: _clean(adata[batch == name], domain) for name in sorted(set(batch))}
    return Source(parts, real=True)


def _kang_donors(seed: int, budget: str, domain: str) -> Source:
    """Kang as ``ctrl`` (both donors) and the stimulated cells per donor sample (``stim101``...)."""
    import anndata as ad
    import numpy as np

    adata = ad.read_h5ad(DATA / "kang_ifnb_small.h5ad")
    adata.obs_names_make_unique()
    batch = adata.obs["batch"].astype(str).to_numpy()
    part = np.where(batch == "ctrl", "ctrl", adata.obs["sample"].astype(str).to_numpy())
    return Source({name: _clean(adata[part == name], domain) for name in sorted(set(part))}, True)


def pbmc68k_counts() -> AnnData:
    """``pbmc68k_reduced`` with counts rebuilt from ``.raw`` and ``obs["cell_type"]``.

    Its ``X`` holds scaled values; ``.raw`` holds ``log1p`` of counts per 10,000 over the whole
    transcriptome, so the counts are ``round(expm1(raw) * n_counts / 1e4)`` over the 765 genes of
    ``.raw`` (exact to 0.1). Labels: ``bulk_labels``.
    """
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
    obs["batch"] = "all"
    out = AnnData(sparse.csr_matrix(counts.astype(np.float32)), obs=obs)
    out.var_names = raw.var_names
    return out


def _pbmc68k(seed: int, budget: str, domain: str) -> Source:
    return Source({"all": _clean(pbmc68k_counts(), domain)}, real=True)


def _multiome(seed: int, budget: str, domain: str, n_novel: int = 0) -> Source:
    """RNA reference and the ATAC cells' gene activity (``lt.data.gene_activity``); peaks kept."""
    import labeltransfer as lt

    rna, atac = lt.data.synthetic_multiome(
        n_cells=int(SYNTHETIC_SIZES[budget]["multiome_cells"]),
        n_genes=500,
        n_background_peaks=2000,
        paired=False,
        n_novel=n_novel,
        seed=seed,
        genome_table=DATA / "hs_genes_hg38.tsv.gz",
    )
    activity = lt.data.gene_activity(atac, genes=rna)
    activity.obs[TRUE_KEY] = atac.obs[TRUE_KEY].astype(str).to_numpy()
    rna.obs["batch"], activity.obs["batch"] = "rna", "atac"
    reference = _clean(rna)
    reference.var = rna.var.copy()  # keeps var["interval"] for CellPredX's setup_mudata
    return Source({"rna": reference, "atac": _clean(activity)}, real=False, atac=atac)


def _longtail(seed: int, budget: str, domain: str) -> Source:
    import labeltransfer as lt

    sizes = SYNTHETIC_SIZES[budget]
    reference, query = lt.data.synthetic(
        n_reference=int(sizes["longtail_reference"]),
        n_query=int(sizes["longtail_query"]),
        n_genes=LONGTAIL["n_genes"],
        n_types=LONGTAIL["n_types"],
        imbalance=LONGTAIL["imbalance"],
        batch_shift=0.0,
        seed=seed,
    )
    reference.obs["batch"], query.obs["batch"] = "reference", "query"
    return Source({"reference": _clean(reference), "query": _clean(query)}, real=False)


def _balanced_novel(seed: int, budget: str, domain: str, n_novel: int) -> Source:
    import labeltransfer as lt

    n_cells = int(SYNTHETIC_SIZES[budget]["balanced_cells"])
    reference, query = lt.data.synthetic(
        n_reference=n_cells,
        n_query=n_cells,
        n_genes=500,
        n_types=4,
        n_novel=n_novel,
        batch_shift=0.3,
        seed=seed,
    )
    reference.obs["batch"], query.obs["batch"] = "reference", "query"
    return Source({"reference": _clean(reference), "query": _clean(query)}, real=False)


def _subtype_longtail(seed: int, budget: str, domain: str) -> Source:
    """scDET's long-tail simulation (:data:`SUBTYPE_LONGTAIL`), half of each seen type as reference.

    Gamma-Poisson counts (inverse dispersion 10, log-normal library sizes around 2,000) on a
    log-normal base profile. ``type_0``, ``type_1``, ``type_2`` and the two novel types raise 20
    marker genes each by a fold change drawn in [4, 8]; the minority seen type ``type_3`` has
    the markers of ``type_0`` plus ``n_own`` of its own raised [4, 6]-fold: a rare subtype of
    the majority type, easy to absorb into it.
    """
    import numpy as np
    import pandas as pd
    from anndata import AnnData
    from scipy import sparse

    rng = np.random.default_rng(seed)
    spec = SUBTYPE_LONGTAIL
    names = ["type_0", "type_1", "type_2", "type_3", "novel_a", "novel_b"]
    scale = SYNTHETIC_SIZES[budget]["subtype_scale"]
    sizes = [max(6, round(size * scale)) for size in spec["sizes"]]
    n_genes, n_markers, n_own = spec["n_genes"], spec["n_markers"], spec["n_own"]
    base = rng.normal(0.0, 1.5, n_genes)
    pool = rng.permutation(np.argsort(base)[n_genes // 3 :])  # the more expressed two thirds
    markers = {t: pool[i * n_markers : (i + 1) * n_markers] for i, t in enumerate(names[:3])}
    for i, t in enumerate(names[4:], start=3):
        markers[t] = pool[i * n_markers : (i + 1) * n_markers]
    own = pool[5 * n_markers : 5 * n_markers + n_own]
    blocks, labels = [], []
    for t, size in zip(names, sizes, strict=True):
        log_mean = base.copy()
        up = markers["type_0"] if t == "type_3" else markers[t]
        log_mean[up] += np.log(rng.uniform(4.0, 8.0, up.size))
        if t == "type_3":
            log_mean[own] += np.log(rng.uniform(*spec["own_fold"], n_own))
        profile = np.exp(log_mean) / np.exp(log_mean).sum()
        library = 2000.0 * np.exp(rng.normal(0.0, 0.3, size))
        mean = library[:, None] * profile[None, :]
        blocks.append(rng.poisson(rng.gamma(10.0, mean / 10.0)))
        labels += [t] * size
    labels = np.asarray(labels)
    obs = pd.DataFrame(
        {TRUE_KEY: labels, "batch": "reference"}, index=[f"cell_{i}" for i in range(labels.size)]
    )
    adata = AnnData(sparse.csr_matrix(np.vstack(blocks).astype(np.float32)), obs=obs)
    adata.var_names = [f"gene_{i}" for i in range(n_genes)]
    to_ref = np.zeros(labels.size, dtype=bool)
    for t in names[:4]:
        members = np.flatnonzero(labels == t)
        to_ref[rng.choice(members, members.size // 2, replace=False)] = True
    query = adata[~to_ref][rng.permutation(int((~to_ref).sum()))].copy()
    query.obs["batch"] = "query"
    return Source({"reference": _clean(adata[to_ref]), "query": _clean(query)}, real=False)


#: Source name -> loader ``(seed, budget, domain) -> Source``.
SOURCES: dict[str, Callable[[int, str, str], Source]] = {
    "kang": lambda seed, budget, domain: _by_batch("kang_ifnb_small.h5ad", domain),
    "cellbench": lambda seed, budget, domain: _by_batch("cellbench_3cl.h5ad", domain),
    "granja": lambda seed, budget, domain: _by_batch("granja2019_bmmc_atac.h5ad", domain),
    "kang_donors": _kang_donors,
    "pbmc68k": _pbmc68k,
    "multiome": _multiome,
    "multiome_novel": partial(_multiome, n_novel=1),
    "longtail": _longtail,
    "subtype_longtail": _subtype_longtail,
    **{f"balanced_novel{n}": partial(_balanced_novel, n_novel=n) for n in range(4)},
}


# ============================================================================ splits
def _subsample(adata: AnnData, n_cells: int | None, seed: int) -> AnnData:
    """At most ``n_cells`` cells of ``adata``, drawn uniformly without replacement."""
    import numpy as np

    if n_cells is None or adata.n_obs <= n_cells:
        return adata
    keep = np.random.default_rng(seed).choice(adata.n_obs, n_cells, replace=False)
    return adata[np.sort(keep)].copy()


def _random_split(adata: AnnData, seed: int) -> tuple[AnnData, AnnData]:
    """A random :data:`NOSHIFT_QUERY_FRACTION` of ``adata`` as query, the rest as reference."""
    import numpy as np

    is_query = np.zeros(adata.n_obs, dtype=bool)
    n_query = round(NOSHIFT_QUERY_FRACTION * adata.n_obs)
    is_query[np.random.default_rng(seed).choice(adata.n_obs, n_query, replace=False)] = True
    return adata[~is_query].copy(), adata[is_query].copy()


def _intra_split(parts: dict[str, AnnData], seed: int) -> tuple[AnnData, AnnData]:
    """scDET's intra-data split: half the types (rounded up) seen, half their cells reference."""
    import anndata as ad
    import numpy as np

    adata = ad.concat(list(parts.values()))
    labels = adata.obs[TRUE_KEY].to_numpy()
    rng = np.random.default_rng(seed)
    types = sorted(set(labels))
    seen = rng.permutation(types)[: math.ceil(len(types) / 2)]
    to_ref = np.isin(labels, seen) & (rng.random(adata.n_obs) < 0.5)
    return adata[to_ref].copy(), adata[~to_ref].copy()


def load_task(name: str, seed: int, budget: str = "small") -> Task:
    """Build task ``name`` (a key of :data:`TASKS`) for ``seed`` and ``budget``.

    Raises
    ------
    ValueError
        An unknown task or budget.
    """
    import numpy as np

    if budget not in BUDGETS:
        raise ValueError(f"Unknown budget {budget!r}; use one of {', '.join(BUDGETS)}.")
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; use one of {', '.join(TASKS)}.")
    spec = TASKS[name]
    source = SOURCES[spec.source](seed, budget, spec.domain)
    if spec.intra:
        reference, query = _intra_split(source.parts, seed)
    elif spec.query is None:
        reference, query = _random_split(source.parts[spec.reference], seed)
    else:
        reference, query = source.parts[spec.reference], source.parts[spec.query]
    if source.real:
        reference = _subsample(reference, MAX_REAL_CELLS[budget], seed)
        query = _subsample(query, MAX_REAL_CELLS[budget], seed + 1000)
    if spec.strong_shift:
        import labeltransfer as lt

        query = lt.data.strong_shift(query, seed=seed)
    held_out = spec.held_out
    if spec.n_random_held_out:
        types = sorted(set(reference.obs[TRUE_KEY]))
        drawn = np.random.default_rng(seed).choice(types, spec.n_random_held_out, replace=False)
        held_out = tuple(sorted(map(str, drawn)))
    if held_out:
        reference = reference[~reference.obs[TRUE_KEY].isin(held_out).to_numpy()].copy()
    return Task(name, reference, query, held_out, spec.shifted, source.atac)


def describe_tasks(names: list[str], budget: str) -> list[dict[str, Any]]:
    """One row per task (seed 0): cells, features, types and the query's novel types."""
    rows = []
    for name in names:
        task = load_task(name, 0, budget)
        rows.append(
            {
                "task": name,
                "about": TASKS[name].about,
                "n_reference": task.reference.n_obs,
                "n_query": task.query.n_obs,
                "n_features": task.reference.n_vars,
                "n_types": len(task.reference_types),
                "novel": ", ".join(task.novel_types),
                "shift": task.shifted,
            }
        )
    return rows
