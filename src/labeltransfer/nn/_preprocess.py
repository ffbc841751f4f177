"""Per-minibatch input normalisation shared by all modules."""

from __future__ import annotations

from typing import Literal

import torch

InputType = Literal["counts", "lognorm"]


def normalize_input(
    x: torch.Tensor,
    feature_idx: torch.Tensor,
    input_type: InputType,
    target_sum: float = 1e6,
    peak_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Turn a dense minibatch into the log-normalised model input.

    Parameters
    ----------
    x
        Minibatch of cells x all registered genes.
    feature_idx
        Indices of the genes the model uses (e.g. the reference's highly variable genes).
    input_type
        ``"counts"``: ``log1p(x / library_size * target_sum)`` with the library size taken over
        *all* registered genes, then the features are selected. ``"lognorm"``: the data are
        already log-normalised and only the features are selected.
    target_sum
        Library size after scaling; ``1e6`` gives log(CPM + 1) as in scNym (JIND takes
        ``log2(1 + x)`` of library-normalised data, the same up to the log base).
    peak_weights
        scATAC-seq peaks (count input): the TF-IDF weights of the features
        (:func:`labeltransfer.data._peaks.peak_weights`). The input is then the binarised
        counts divided by the cell's number of open peaks (over *all* registered peaks), the
        features selected and multiplied by these weights; ``target_sum`` is not used.

    Returns
    -------
    Tensor of shape ``(n_cells, len(feature_idx))``.
    """
    if peak_weights is not None:
        is_open = (x > 0).to(x.dtype)
        n_open = is_open.sum(dim=1, keepdim=True).clamp_min(1.0)
        return is_open.index_select(1, feature_idx) / n_open * peak_weights
    if input_type == "counts":
        library = x.sum(dim=1, keepdim=True).clamp_min(1.0)
        # the operations of log1p(x[:, features] / library * target_sum), one new tensor
        # instead of four (the same values): the selection, or the division, makes it
        if _all_features(feature_idx, x.shape[1]):
            out = torch.div(x, library)
        else:
            out = x.index_select(1, feature_idx).div_(library)
        return out.mul_(target_sum).log1p_()
    return x.index_select(1, feature_idx)


def _all_features(feature_idx: torch.Tensor, n_genes: int) -> bool:
    """Whether ``feature_idx`` selects every gene in order (the selection is then a copy)."""
    return feature_idx.numel() == n_genes and bool(
        (feature_idx == torch.arange(n_genes, device=feature_idx.device)).all()
    )
