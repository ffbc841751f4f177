"""The five losses of CellPredX (Liu et al., PLoS Comput. Biol. 2025, Eqs. 1-6).

Every function takes embeddings (and labels or attention weights) as tensors and returns a
0-d tensor; none knows about AnnData. The equations of the paper's text are partly lost in
its published form; where a detail is left open, the docstring says which choice was made
and why (usually the reference implementation, ``BioCS-Lab/CellPredX``, or scNCL, whose PR,
FA and kNN-contrastive losses CellPredX adopts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from labeltransfer.train._guards import NON_NEGATIVE, POSITIVE, UNIT, Number, check_arguments

__all__ = [
    "CellPredXLossConfig",
    "feature_alignment_loss",
    "knn_contrastive_loss",
    "projection_regularization",
    "pseudo_label_selection",
    "sparse_center_loss",
]


@dataclass(frozen=True, kw_only=True)
class CellPredXLossConfig:
    """Hyper-parameters of CellPredX's objective (Eq. 7): the one place of their checks.

    ``L = L_CE + pr_weight L_PR + cl_weight L_CL + fa_weight L_FA + sc_weight L_SC``.
    :class:`~labeltransfer.CellPredX` builds it from its preset (the paper's values per
    scenario, :data:`~labeltransfer.cellpredx.PRESETS`), its own arguments and
    ``train(plan_kwargs=...)`` (every name below is accepted there);
    :class:`~labeltransfer.cellpredx.CellPredXTrainingPlan` holds it and
    :meth:`~labeltransfer.cellpredx.CellPredXModule.loss` reads it. Creating it checks every
    value (``ValueError`` naming the value and its range).

    Parameters
    ----------
    cl_weight
        Weight >= 0 of the kNN contrastive loss (no default: the paper tunes it per
        scenario; RNA->ATAC matched 0.06, unmatched 1.2, RNA->RNA and ATAC->ATAC 0.1).
    fa_weight
        Weight >= 0 of the feature alignment loss (per scenario: 0.05 across modalities, 0
        within one).
    sc_weight
        Weight >= 0 of the sparse center loss (per scenario: 0.01 across modalities and
        RNA->RNA, where the paper has 0.1; 0.001 ATAC->ATAC).
    temperature
        Temperature > 0 of the contrastive loss (per scenario: 0.04 RNA->ATAC matched, 0.8
        otherwise).
    pr_weight
        Weight >= 0 of the projection regularisation (not among the paper's tuned
        hyper-parameters; 0.1 as the reference implementation's ``ortho_w``).
    top_p
        Fraction of query cells aligned by the FA loss, in (0, 1] (the paper's ``p``; 0.8 as
        the reference implementation and scNCL).
    pseudo_label_quantile
        Query cells above this quantile, in [0, 1], of the minibatch's confidences enter the
        sparse center loss with their pseudo-label (0.75, the reference implementation's).
    """

    cl_weight: float
    fa_weight: float
    sc_weight: float
    temperature: float
    pr_weight: float = 0.1
    top_p: float = 0.8
    pseudo_label_quantile: float = 0.75

    def __post_init__(self) -> None:
        check_arguments(type(self), vars(self), _CELLPREDX_LOSS_RULES)

    @property
    def weights(self) -> dict[str, float]:
        """The four loss weights by name (``pr_weight``, ``cl_weight``, ...)."""
        return {
            "pr_weight": float(self.pr_weight),
            "cl_weight": float(self.cl_weight),
            "fa_weight": float(self.fa_weight),
            "sc_weight": float(self.sc_weight),
        }


_CELLPREDX_LOSS_RULES = {
    "cl_weight": NON_NEGATIVE,
    "fa_weight": NON_NEGATIVE,
    "sc_weight": NON_NEGATIVE,
    "temperature": POSITIVE,
    "pr_weight": NON_NEGATIVE,
    "top_p": Number(low=0, high=1, low_open=True),
    "pseudo_label_quantile": UNIT,
}


def projection_regularization(z: torch.Tensor) -> torch.Tensor:
    r"""Projection regularisation (PR, Eq. 1, from scNCL) of one minibatch of embeddings.

    .. math::

        L_{PR}(Z) = \frac{1}{nm}\sum_{i,j} |z_{ij}|
        + \frac{2}{m(m-1)}\sum_{j<k} |\mathrm{cov}(z_{\cdot j}, z_{\cdot k})|
        + \Big(\frac{1}{nm}\sum_{i,j} |z_{ij} - \bar z_{\cdot j}|\Big)^{-1}

    The first term keeps the embedding centred and small, the second decorrelates its
    dimensions (orthogonal features) and the third keeps its spread from collapsing. CellPredX
    applies it to the reference and to the query minibatch and adds the two.

    Parameters
    ----------
    z
        Embeddings, cells x dimensions (at least two cells).

    Returns
    -------
    0-d tensor.

    Notes
    -----
    The correlation term averages the absolute off-diagonal covariances over the ``m(m-1)/2``
    pairs (scNCL averages ``|triu(cov, 1)|`` over all ``m^2`` entries: the same loss up to a
    constant factor, ``(m-1)/(2m)``); the reference implementation adds the spread term for the
    query only, the paper's Eq. 1 for both minibatches, as here.
    """
    if z.shape[0] < 2:
        raise ValueError("projection_regularization needs at least two cells.")
    magnitude = z.abs().mean()
    centred = z - z.mean(dim=0, keepdim=True)
    cov = centred.T @ centred / (z.shape[0] - 1)
    m = z.shape[1]
    off = torch.triu(torch.ones(m, m, dtype=torch.bool, device=z.device), diagonal=1)
    correlation = cov[off].abs().mean() if m > 1 else z.new_zeros(())
    spread = 1.0 / centred.abs().mean().clamp_min(1e-8)
    return magnitude + correlation + spread


def feature_alignment_loss(
    z_reference: torch.Tensor, z_query: torch.Tensor, top_p: float
) -> torch.Tensor:
    r"""Feature alignment (FA, Eq. 5, from scJoint/scNCL): pull each query cell to its match.

    For every query cell ``b`` the most similar reference cell ``i*(b) = argmax_i cos(z_i,
    z_b)`` is found on the *detached* embeddings; the query cells whose best match is among
    the top ``top_p`` fraction of similarities (the set :math:`B_p`) are aligned:

    .. math::

        L_{FA} = \frac{1}{|B_p|}\sum_{b \in B_p} \big(1 - \cos(z_b, z_{i^*(b)})\big)

    Parameters
    ----------
    z_reference
        Reference embeddings, cells x dimensions.
    z_query
        Query embeddings, cells x dimensions.
    top_p
        Fraction of the query cells that are aligned (the paper's ``p``; 0.8 as the reference
        implementation and scNCL, the paper gives no value).

    Returns
    -------
    0-d tensor in ``[0, 2]``; 0 when every aligned query cell points in the direction of its
    match.

    Notes
    -----
    The paper maximises the cosine similarity; ``1 - cos`` has the same gradients and is
    non-negative. The reference implementation also pushes random pairs apart with a margin;
    the paper's Eq. 5 has no such term and neither has this loss. Gradients flow into both
    the query and the matched reference embeddings; the matching itself is not differentiated.
    """
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
    if z_reference.shape[0] == 0 or z_query.shape[0] == 0:
        return z_query.new_zeros(())
    ref = F.normalize(z_reference, dim=1)
    query = F.normalize(z_query, dim=1)
    with torch.no_grad():
        best, match = (query @ ref.T).max(dim=1)
        n_top = max(1, int(z_query.shape[0] * top_p))
        chosen = torch.topk(best, n_top).indices
    similarity = (query[chosen] * ref[match[chosen]]).sum(dim=1)
    return (1.0 - similarity).mean()


def knn_contrastive_loss(
    z: torch.Tensor, z_positive: torch.Tensor, temperature: float
) -> torch.Tensor:
    r"""Contrastive loss (CL, Eq. 3) keeping each query cell next to a kNN neighbour.

    ``z_positive[i]`` is the embedding of a random neighbour of query cell ``i`` in the query's
    kNN graph (built on the raw data); every other cell of the ``2n`` cells is a negative
    (NT-Xent / InfoNCE, as the reference implementation):

    .. math::

        L_{CL} = \frac{1}{2n}\sum_{a} -\log\frac{\exp(\cos(z_a, z_{a^+})/\tau)}
        {\sum_{c \ne a} \exp(\cos(z_a, z_c)/\tau)}

    over the ``2n`` anchors ``a`` (each cell and each positive).

    Parameters
    ----------
    z
        Query embeddings, cells x dimensions.
    z_positive
        Embeddings of one kNN neighbour of each query cell (same shape).
    temperature
        ``tau`` (preset dependent: 0.04 or 0.8).

    Returns
    -------
    0-d tensor, >= 0. It tends to 0 when each cell coincides with its neighbour and is
    dissimilar from every other cell (as ``tau -> 0``, or as the negative similarities
    -> -1).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if z.shape != z_positive.shape:
        raise ValueError("z and z_positive must have the same shape.")
    n = z.shape[0]
    if n == 0:
        return z.new_zeros(())
    features = F.normalize(torch.cat([z, z_positive]), dim=1)
    # the temperature divides the 2n x m features, not the 2n x 2n similarities, and the
    # diagonal is filled in place, without a 2n x 2n mask: the same values; 512 cells a
    # minibatch (one thread) took 23 ms forward and backward, 15 ms so
    logits = features @ (features.T / temperature)
    logits.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, target)


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient row by row by ``scale``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (scale,) = ctx.saved_tensors
        return grad * scale[:, None], None


def sparse_center_loss(
    z: torch.Tensor,
    attention: torch.Tensor,
    labels: torch.Tensor,
    centers: torch.Tensor,
) -> torch.Tensor:
    r"""Sparse center loss (SC, Eq. 6, after DACL): attention-weighted distances to class centers.

    .. math::

        L_{SC} = \frac{1}{2n}\sum_{i=1}^{n}\sum_{j=1}^{m} a_{ij}\,(z_{ij} - c_{y_i j})^2

    where ``a_ij`` is the attention weight of dimension ``j`` for cell ``i`` (from the
    attention network) and ``c_{y_i}`` the center of the cell's class (true label for
    reference cells, pseudo-label for query cells).

    Parameters
    ----------
    z
        Embeddings, cells x dimensions.
    attention
        Attention weights in ``[0, 1]``, same shape as ``z``.
    labels
        Class index of each cell.
    centers
        Class centers, classes x dimensions (a learnable parameter).

    Returns
    -------
    0-d tensor, >= 0.

    Notes
    -----
    Gradients reach the embeddings (``a_ij (z_ij - c_j) / n``) and the attention network
    (``(z_ij - c_j)^2 / 2n``). The centers "adjusted dynamically during training" are updated
    as in DACL and the reference implementation: the gradient of center ``k`` is
    ``-sum_{i: y_i = k} a_i (z_i - c_k) / (1 + n_k)``, i.e. a running mean over the ``n_k``
    cells of class ``k`` in the minibatch, not divided by the whole minibatch size.
    """
    if z.shape != attention.shape:
        raise ValueError("z and attention must have the same shape.")
    n = z.shape[0]
    if n == 0:
        return z.new_zeros(())
    labels = labels.long().ravel()
    counts = torch.bincount(labels, minlength=centers.shape[0]).to(z.dtype)
    scale = n / (1.0 + counts[labels])
    centers_batch = _ScaleGradient.apply(centers.index_select(0, labels), scale)
    return (attention * (z - centers_batch) ** 2).sum() / (2.0 * n)


def pseudo_label_selection(
    logits: torch.Tensor, quantile: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudo-labels of the most confident query cells for the sparse center loss.

    Parameters
    ----------
    logits
        Classifier logits of the query minibatch.
    quantile
        Cells whose maximum probability is at least this quantile of the minibatch's maximum
        probabilities are kept. The paper says only that pseudo-labels come from the
        classifier during training; 0.75 (the most confident quarter) is the reference
        implementation's choice.

    Returns
    -------
    ``(selected, labels)``: boolean mask of the kept cells and the argmax class of every cell.
    """
    with torch.no_grad():
        probabilities = torch.softmax(logits, dim=1)
        confidence, labels = probabilities.max(dim=1)
        if confidence.numel() == 0:
            return torch.zeros_like(confidence, dtype=torch.bool), labels
        cut = torch.quantile(confidence, quantile)
        return confidence >= cut, labels
