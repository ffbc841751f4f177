"""A strong gene-level shift of real counts: a query as another species or platform sees it."""

from __future__ import annotations

import copy
import logging

import numpy as np
from anndata import AnnData

from ._checks import _get_matrix, _to_csr_float32, _validate_matrix

logger = logging.getLogger(__name__)

#: Concentration (``a + b``) of the beta distribution of the per-gene dropout probabilities.
DROPOUT_CONCENTRATION = 2.0


def strong_shift(
    adata: AnnData,
    *,
    gene_factor_sd: float = 3.0,
    dropout: float = 0.3,
    library_factor: float = 0.5,
    gene_overlap: float = 0.9,
    seed: int = 0,
) -> AnnData:
    """Shift raw counts as strongly as another species or sequencing platform would.

    Every gene gets its own multiplicative factor ``exp(N(0, gene_factor_sd))`` (orthologues
    and protocols differ gene by gene in capture and expression), rescaled so that the
    factors keep the input's total count (they change the composition of each cell, not its
    depth); a random fraction ``1 - gene_overlap`` of the genes is absent (all zero: no
    orthologue, not on the panel), and every count is scaled by ``library_factor``
    (shallower or deeper sequencing). Each non-zero count ``x`` of gene ``g`` is redrawn as
    ``Poisson(x * factor_g * library_factor)`` and then set to zero with the gene's own
    dropout probability ``p_g``, drawn from a beta distribution with mean ``dropout`` and
    concentration 2 (some genes lose most of their counts, others few). Zeros stay zero, so
    the matrix never becomes denser. The shift is the same for every cell: the types stay
    separable (a logistic regression of the unshifted data keeps most of its accuracy), but
    a model that compares shifted cells with unshifted ones gene by gene sees a very
    different data set.

    The defaults reproduce the collapse of the models trained on reference and query
    together seen on a real human -> mouse task (issue 14): on CellBench CEL-seq2 ->
    Drop-seq with the query shifted (``cellbench_c2d_strongshift`` in
    ``benchmarks/run.py``, seed 0) a logistic regression keeps 0.93 while scNym predicts
    a single type for every cell (0.41) and CellPredX rejects every cell (0.59).

    Parameters
    ----------
    adata
        Raw integer counts in ``X`` (dense, sparse or backed); not modified.
    gene_factor_sd
        Standard deviation of the natural log of the per-gene factors; 0 applies none.
    dropout
        Mean per-gene probability, in [0, 1), that a non-zero count is set to zero; 0 adds
        no dropout.
    library_factor
        Factor applied to every count (the change of sequencing depth); 1 keeps the depth.
    gene_overlap
        Fraction of genes, in (0, 1], that keep their counts; the others become all zero.
    seed
        Random seed; the result is deterministic for a given seed.

    Returns
    -------
    AnnData
        A new AnnData with the shifted counts in ``X`` (CSR float32, non-negative integers),
        copies of ``obs``, ``var`` and ``uns``, and ``uns["strong_shift"]``: the parameters
        and the draws (``gene_log_factor`` and ``gene_dropout``, one value per gene in
        ``var_names`` order, and ``absent_genes``, a list of names). Layers, ``obsm``,
        ``varm``, ``obsp`` and ``varp`` are not copied: they describe the unshifted data.
        Cells may end up with no count when their few counts all drop out.

    Raises
    ------
    ValueError
        If ``X`` is not raw counts (negative, non-integer or non-finite values), or a
        parameter is out of range.
    TypeError
        If ``adata`` is not an AnnData.

    Examples
    --------
    >>> import labeltransfer as lt
    >>> reference, _ = lt.data.synthetic(n_reference=50, n_query=5, n_genes=40, n_markers=3)
    >>> shifted = lt.data.strong_shift(reference, seed=1)
    >>> shifted.shape, len(shifted.uns["strong_shift"]["absent_genes"])
    ((50, 40), 4)
    """
    if not (np.isfinite(gene_factor_sd) and gene_factor_sd >= 0):
        raise ValueError(
            f"gene_factor_sd is a standard deviation and must be >= 0, got {gene_factor_sd}."
        )
    if not 0 <= dropout < 1:
        raise ValueError(
            f"dropout is a mean probability and must be in [0, 1), got {dropout}; use 0 for "
            "no extra dropout."
        )
    if not (np.isfinite(library_factor) and library_factor > 0):
        raise ValueError(
            f"library_factor must be positive, got {library_factor}; use 1 to keep the "
            "sequencing depth."
        )
    if not 0 < gene_overlap <= 1:
        raise ValueError(
            f"gene_overlap is the fraction of genes kept and must be in (0, 1], got "
            f"{gene_overlap}; use 1 to keep every gene."
        )
    _validate_matrix(adata, layer=None, name="input", expect="counts")

    rng_genes, rng_counts = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2)
    )
    n_genes = adata.n_vars
    log_factor = rng_genes.normal(0.0, gene_factor_sd, size=n_genes)
    if dropout > 0:
        p_drop = rng_genes.beta(
            dropout * DROPOUT_CONCENTRATION, (1 - dropout) * DROPOUT_CONCENTRATION, size=n_genes
        )
    else:
        p_drop = np.zeros(n_genes)
    n_absent = int(round((1 - gene_overlap) * n_genes))
    absent = np.sort(rng_genes.choice(n_genes, size=n_absent, replace=False))
    X = _to_csr_float32(_get_matrix(adata, None, "input"))
    nnz_before, genes = X.nnz, X.indices
    # factors relative to the input's expression-weighted mean: they change the composition,
    # ``library_factor`` alone changes the depth
    gene_totals = np.bincount(genes, weights=X.data, minlength=n_genes)
    factor = np.exp(log_factor)
    scale = factor / (factor @ gene_totals / max(gene_totals.sum(), 1.0)) * library_factor
    scale[absent] = 0.0
    counts = rng_counts.poisson(X.data.astype(np.float64) * scale[genes])
    counts[rng_counts.random(counts.size) < p_drop[genes]] = 0
    X.data = counts.astype(np.float32)
    X.eliminate_zeros()

    out = AnnData(X=X, obs=adata.obs.copy(), var=adata.var.copy(), uns=copy.deepcopy(adata.uns))
    out.uns["strong_shift"] = {
        "gene_factor_sd": float(gene_factor_sd),
        "dropout": float(dropout),
        "library_factor": float(library_factor),
        "gene_overlap": float(gene_overlap),
        "seed": int(seed),
        "gene_log_factor": log_factor,
        "gene_dropout": p_drop,
        "absent_genes": adata.var_names[absent].tolist(),
    }
    logger.info(
        "strong shift: %d cells x %d genes, %d genes absent, %d -> %d non-zero counts",
        adata.n_obs,
        n_genes,
        n_absent,
        nnz_before,
        X.nnz,
    )
    return out
