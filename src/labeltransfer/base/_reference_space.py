"""The open-set layer's space: the reference's principal components and a bank of its cells.

Why not the model's own latent space. Measured on held-out types (``benchmarks/``, the
``*_novel`` tasks), distances in the models' embeddings rank a held-out type poorly: JIND's
aligned code gives an open-set AUROC of 0.24 (Kang, FCGR3A+ monocytes held out) and scNym's
co-trained embedding 0.78 (Kang, B cells), because alignment and domain-adversarial
training are built to map every query cell onto the reference types. The layer therefore
works in a space no training can bend: the principal components of the reference's own
log-normalised expression (``log1p`` of counts per 10,000) over the model's genes, fitted
once after training and saved with the model (a bank of at most :data:`BANK_SIZE`
reference cells, the PCA mean and loadings; about 1 MB).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import sparse
from scipy.linalg import eigh

from labeltransfer.nn import normalize_input

from ._neighbors import _BLOCK

#: Reference cells kept for coverage (stratified by type).
BANK_SIZE = 5_000
#: Values (cells x genes) of the bank cells the PCA is fitted on, densified at once: 10 MB,
#: e.g. 1,000 cells of 2,500 genes or 500 cells of 5,000 (never fewer than :data:`MIN_FIT`).
FIT_VALUES = 2_500_000
MIN_FIT = 300
#: Fewest bank cells of a reference type (all of its cells when it has fewer).
MIN_PER_TYPE = 50
#: Principal components of the coverage space.
N_COMPONENTS = 30
#: Axes of the query's own residual added to its graph (:meth:`ReferenceSpace.residual_axes`),
#: fitted on as many of its cells as the reference's components (:data:`FIT_VALUES`).
#: Measured on seed-0 runs (JIND, scNym, CellPredX), Kang with B cells held out: the share
#: of novel-group cells that are B cells rose from 0.71-0.81 to 0.81-0.96 with 10 axes
#: (0.83-0.92 with 5).
N_RESIDUAL = 10
#: Library size of the coverage space's log-normalisation (counts per 10,000).
TARGET_SUM = 1e4


def expression_features(
    x: torch.Tensor | sparse.csr_matrix, module: torch.nn.Module
) -> torch.Tensor:
    """``log1p`` counts per 10,000 of the module's genes (log-normalised input as given).

    ``x``: a dense minibatch of all registered genes, or a CSR one (see
    :func:`~labeltransfer.nn.normalize_input`).

    Peaks (a module with ``peak_weights``) are read as the module reads them, TF-IDF, and
    each cell is then scaled to unit length, so that distances are cosine distances, as in
    the LSI of scATAC-seq tools. Why: a cell's TF-IDF values are its open peaks' weights
    divided by its number of open peaks, so without the scaling a cell's depth set its
    place in the space as much as its peaks did. Measured on the Granja scATAC donors (full
    suite, 3 seeds): with 17_B held out the open-set AUROC rose from 0.654 / 0.807 / 0.648 /
    0.721 to 0.774 / 0.936 / 0.669 / 0.929 (JIND, scNym, scDET, CellPredX); with every type
    kept, 91% of the query's cells had a mutual reference partner, 58% before (JIND, seed 2).
    """
    features = normalize_input(
        x, module.feature_idx, module.input_type, TARGET_SUM, module.peak_weights
    )
    if module.peak_weights is None:
        return features
    return torch.nn.functional.normalize(features, dim=1)


def bank_rows(labels: np.ndarray, size: int = BANK_SIZE, seed: int = 0) -> np.ndarray:
    """Return at most ``size`` sorted positions of ``labels``, stratified by type.

    Each type is kept in proportion but with at least :data:`MIN_PER_TYPE` cells (all the
    cells of a rarer type).
    """
    labels = np.asarray(labels)
    if labels.size <= size:
        return np.arange(labels.size)
    rng = np.random.default_rng(seed)
    keep = []
    for value in np.unique(labels):
        rows = np.flatnonzero(labels == value)
        n = min(rows.size, max(MIN_PER_TYPE, round(size * rows.size / labels.size)))
        keep.append(rng.choice(rows, n, replace=False))
    return np.sort(np.concatenate(keep))


@dataclass
class ReferenceSpace:
    """The reference's principal components and a bank of its cells in them.

    Attributes
    ----------
    mean
        Mean of the reference's log-normalised expression, one per model gene.
    components
        Loadings, components x model genes.
    bank
        Coordinates of the bank cells (centred on the reference).
    bank_labels
        Reference type code of each bank cell.
    """

    mean: np.ndarray
    components: np.ndarray
    bank: np.ndarray
    bank_labels: np.ndarray

    @classmethod
    def fit(cls, features: np.ndarray, seed: int = 0) -> ReferenceSpace:
        """Fit the PCA on log-normalised reference cells (cells x model genes); no bank yet.

        ``features`` is centred in place (it is a temporary array of the caller's).
        """
        features = np.asarray(features, dtype=np.float32)
        mean = features.mean(axis=0)
        features -= mean
        if features.shape[0] < 2:
            raise ValueError(
                "The open-set layer needs at least 2 reference cells to fit its coverage space."
            )
        components = principal_axes(features, N_COMPONENTS)
        empty = np.zeros((0, components.shape[0]), dtype=np.float32)
        return cls(mean, components, empty, np.zeros(0, dtype=np.int64))

    def project(
        self, features: torch.Tensor | np.ndarray, residual_axes: np.ndarray | None = None
    ) -> np.ndarray:
        """Coordinates of log-normalised cells (from :func:`expression_features`).

        With ``residual_axes`` (from :meth:`residual_axes`), the coordinates of the cells'
        residuals on them follow the reference's components.
        """
        x = torch.as_tensor(features).float()
        centred = x - torch.as_tensor(self.mean, device=x.device)
        components = torch.as_tensor(self.components, device=x.device)
        coords = centred @ components.T
        if residual_axes is not None:
            residual = centred - coords @ components
            axes = torch.as_tensor(residual_axes, device=x.device)
            coords = torch.cat([coords, residual @ axes.T], dim=1)
        return coords.cpu().numpy()

    def residual_axes(self, features: np.ndarray) -> np.ndarray:
        """Return the query's own principal axes of what the reference's components leave out.

        ``features`` are log-normalised query cells (a sample, replaced in place by their
        residuals); returns at most :data:`N_RESIDUAL` axes (rows, model genes).
        """
        features -= self.mean
        for start in range(0, len(features), _BLOCK):  # no second cells x genes array
            block = features[start : start + _BLOCK]
            block -= (block @ self.components.T) @ self.components
        features -= features.mean(axis=0)
        return principal_axes(features, N_RESIDUAL)

    def state(self) -> dict[str, np.ndarray]:
        """Arrays to save with the model."""
        return {
            "mean": self.mean,
            "components": self.components,
            "bank": self.bank,
            "bank_labels": self.bank_labels,
        }


def principal_axes(centred: np.ndarray, n: int) -> np.ndarray:
    """Top ``n`` principal axes (rows) of a centred cells x genes matrix.

    Through the smaller of its two Gram matrices: no copy of the matrix itself. Only its top
    ``n`` eigenpairs are computed (LAPACK's ``syevr``): the same axes, up to their signs, as a
    full decomposition, 3-4x faster at 2,000 genes (0.9 against 2.9 s on one thread).
    """
    n = int(min(n, centred.shape[0] - 1, centred.shape[1]))
    if n < 1:
        return np.zeros((0, centred.shape[1]), dtype=np.float32)
    by_cells = centred.shape[0] <= centred.shape[1]
    gram = centred @ centred.T if by_cells else centred.T @ centred
    m = gram.shape[0]
    values, vectors = eigh(gram, subset_by_index=[m - n, m - 1], driver="evr", overwrite_a=True)
    values, axes = values[::-1], vectors[:, ::-1].T  # ascending: the largest first, as rows
    if not by_cells:
        return np.ascontiguousarray(axes, dtype=np.float32)
    scale = np.sqrt(np.maximum(values, 1e-12)).astype(np.float32)
    return (axes.astype(np.float32) @ centred) / scale[:, None]
