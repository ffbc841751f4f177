"""Integrated-gradient saliency of a trained model (scNym's interpretation analysis).

References
----------
Kimmel JC, Kelley DR. 2021. Semisupervised adversarial neural networks for single-cell
classification. Genome Res 31: 1781-1793. doi:10.1101/gr.268581.120
Sundararajan M, Taly A, Yan Q. 2017. Axiomatic attribution for deep networks. ICML.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData

__all__ = ["integrated_gradients", "marker_genes"]


def _logits_network(module: Any) -> Any:
    """``nn.Module`` mapping the normalised model input to the logits of ``module``."""
    from torch import nn

    if hasattr(module, "encoder") and hasattr(module, "classifier"):
        body = module.encoder
    elif hasattr(module, "embedder") and hasattr(module, "classifier"):
        body = module.embedder
    else:
        raise TypeError(
            f"integrated gradients need a module with `classifier` and `encoder` (JIND) or "
            f"`embedder` (scNym); {type(module).__name__} has neither."
        )
    if not hasattr(module, "transform") or not hasattr(module, "feature_idx"):
        raise TypeError(
            f"{type(module).__name__} has no `transform`/`feature_idx`: its normalised input "
            "cannot be computed."
        )

    class _Logits(nn.Module):
        def __init__(self, body: nn.Module, classifier: nn.Module):
            super().__init__()
            self.body = body
            self.classifier = classifier

        def forward(self, x):
            return self.classifier(self.body(x))

    return _Logits(body, module.classifier)


def _feature_names(model: Any) -> pd.Index:
    from labeltransfer._constants import REGISTRY_KEYS

    columns = np.asarray(model.adata_manager.get_state_registry(REGISTRY_KEYS.X_KEY).column_names)
    return pd.Index(columns[model.module.feature_idx.cpu().numpy()].astype(str))


def _target_index(model: Any, target: str) -> int:
    cell_types = list(model.cell_types)
    if target not in cell_types:
        raise ValueError(
            f"target {target!r} is not a reference cell type; choose from {cell_types}."
        )
    return cell_types.index(target)


def _baseline(baseline: str | float | np.ndarray, n_features: int) -> np.ndarray:
    if isinstance(baseline, str):
        if baseline != "zero":
            raise ValueError(f"baseline must be 'zero', a number or an array, got {baseline!r}.")
        return np.zeros(n_features, dtype=np.float32)
    values = np.broadcast_to(np.asarray(baseline, dtype=np.float32), (n_features,))
    return np.ascontiguousarray(values)


def _attributions(
    model: Any,
    registered: AnnData,
    *,
    target_idx: int,
    indices: np.ndarray | None,
    n_steps: int,
    baseline: str | float | np.ndarray,
    batch_size: int,
) -> np.ndarray:
    """Integrated gradients (cells x features) of ``registered`` (already set up)."""
    import torch
    from captum.attr import IntegratedGradients

    from labeltransfer._constants import REGISTRY_KEYS

    module = model.module
    network = _logits_network(module)
    device = module.feature_idx.device
    base = torch.as_tensor(_baseline(baseline, len(module.feature_idx)), device=device)
    explainer = IntegratedGradients(network)
    loader = model._make_data_loader(
        adata=registered, indices=indices, batch_size=batch_size, shuffle=False
    )
    was_training = module.training
    module.eval()  # dropout off, batch-norm running statistics
    out = []
    try:
        for tensors in loader:
            x = tensors[REGISTRY_KEYS.X_KEY].to(device)
            with torch.no_grad():
                inputs = module.transform(x).float()
            attribution = explainer.attribute(
                inputs,
                baselines=base.expand_as(inputs),
                target=target_idx,
                n_steps=n_steps,
                internal_batch_size=batch_size,
            )
            out.append(attribution.detach().cpu().numpy())
    finally:
        module.train(was_training)
    if not out:
        return np.zeros((0, len(module.feature_idx)), dtype=np.float32)
    return np.concatenate(out)


def integrated_gradients(
    model: Any,
    adata: AnnData,
    *,
    target: str,
    n_steps: int = 100,
    baseline: str | float | np.ndarray = "zero",
    batch_size: int = 256,
    indices: Sequence[int] | None = None,
) -> pd.DataFrame:
    """Integrated-gradient attributions of each cell's logit for one reference type.

    As in scNym's interpretation analysis (Kimmel and Kelley 2021, Methods "Integrated
    gradient analysis"), the gradients of the class-``target`` output are integrated along the
    straight path from a baseline (the zero vector by default) to each cell's input, and
    multiplied by the difference between the input and the baseline (Sundararajan et al.
    2017), using :class:`captum.attr.IntegratedGradients`. The attributed input is the
    *normalised* model input: the module's ``transform`` (library-size normalisation and
    ``log1p`` for counts) of the raw registered expression, restricted to the model's
    ``feature_idx`` genes. The attributed output is the logit of ``target`` (the
    pre-softmax class score; the paper differentiates the class output of ``f_theta``).

    For :class:`~labeltransfer.JIND` the network is the encoder followed by the classifier
    (the unaligned prediction path; JIND's alignment generator is not used); for
    :class:`~labeltransfer.SCNYM` it is the embedder followed by the classifier.

    Parameters
    ----------
    model
        A trained model whose module has ``transform``, ``feature_idx``, ``classifier`` and
        either ``encoder`` or ``embedder``.
    adata
        Cells to explain (any gene order; harmonised to the model's genes as in ``annotate``),
        or the model's own AnnData.
    target
        Reference cell type (one of ``model.cell_types``) whose logit is attributed.
    n_steps
        Points along the integration path (scNym: ``M = 100``).
    baseline
        ``"zero"`` (the paper's baseline), a number, or one value per feature gene, in the
        normalised input space.
    batch_size
        Cells per minibatch (also captum's ``internal_batch_size``).
    indices
        Positions of the cells of ``adata`` to explain; all cells by default.

    Returns
    -------
    DataFrame of shape ``(cells, feature genes)``: rows are the explained cells'
    ``obs_names``, columns the model's feature genes. Positive values push the cell towards
    ``target``.

    Raises
    ------
    ValueError
        If ``target`` is not a reference type or ``baseline`` is invalid.
    TypeError
        If the model's module has no ``encoder``/``embedder`` and ``classifier``.

    References
    ----------
    Kimmel JC, Kelley DR. 2021. Semisupervised adversarial neural networks for single-cell
    classification. Genome Res 31: 1781-1793.
    """
    _logits_network(model.module)
    target_idx = _target_index(model, target)
    model._check_if_trained(warn=False)
    registered, _ = model._prepare(adata)
    idx = None if indices is None else np.asarray(indices, dtype=np.int64)
    values = _attributions(
        model,
        registered,
        target_idx=target_idx,
        indices=idx,
        n_steps=n_steps,
        baseline=baseline,
        batch_size=batch_size,
    )
    names = registered.obs_names if idx is None else registered.obs_names[idx]
    model._release(registered)
    return pd.DataFrame(values, index=pd.Index(names), columns=_feature_names(model))


def marker_genes(
    model: Any,
    adata: AnnData,
    *,
    groupby: str,
    target: str | None = None,
    n_cells: int = 300,
    n_top: int = 20,
    seed: int = 0,
    key_added: str | None = None,
    n_steps: int = 100,
    batch_size: int = 256,
) -> pd.DataFrame:
    """Rank genes per cell type by their mean integrated gradient (scNym's class maps).

    For every group ``g`` of ``adata.obs[groupby]`` that is a reference type, up to
    ``n_cells`` cells of the group are drawn at random (scNym: ``n_s = min(300, n_k)``), their
    integrated gradients towards ``g`` are computed with :func:`integrated_gradients` and
    averaged per gene; the ``n_top`` genes with the largest mean attribution are returned
    (Kimmel and Kelley 2021, Methods "Integrated gradient analysis").

    With ``target``, every group is explained towards that one reference type instead: "why
    were these cells called ``target``?" (the paper's analysis of FCGR3A+ monocytes
    misclassified as CD14+ monocytes). Group the cells by their true type among those called
    ``target``, e.g. ``adata[adata.obs["scnym"] == "CD14+ Monocytes"]`` with
    ``groupby="cell_type"``: the genes that drive the wrong call rank first.

    Parameters
    ----------
    model
        A trained model (see :func:`integrated_gradients`).
    adata
        Cells with a grouping column, e.g. the reference labels or an annotation.
    groupby
        Column of ``adata.obs`` with the groups. Without ``target``, groups that are not
        reference types (for instance ``"Unassigned"``) are skipped.
    target
        Reference type whose logit is attributed for every group; ``None`` (default)
        attributes each group's own type.
    n_cells
        Maximum cells sampled per group.
    n_top
        Genes kept per group.
    seed
        Seed of the cell sampling.
    key_added
        If given, ``adata.uns[key_added]`` (a dict, e.g. written by ``annotate``) receives
        ``"markers"``: the returned table as a dict of plain lists (one per column).
    n_steps
        Points along the integration path.
    batch_size
        Cells per minibatch.

    Returns
    -------
    Tidy DataFrame with columns ``group``, ``target`` (the attributed type), ``rank``
    (1 = most salient), ``gene`` and ``attribution`` (mean integrated gradient over the
    sampled cells).

    Raises
    ------
    KeyError
        If ``groupby`` is not in ``adata.obs``, or ``key_added`` is given and
        ``adata.uns[key_added]`` is not a dict.
    ValueError
        If ``target`` is not a reference type.

    References
    ----------
    Kimmel JC, Kelley DR. 2021. Semisupervised adversarial neural networks for single-cell
    classification. Genome Res 31: 1781-1793.
    """
    if groupby not in adata.obs:
        raise KeyError(f"{groupby!r} is not a column of adata.obs.")
    if key_added is not None and not isinstance(adata.uns.get(key_added), dict):
        raise KeyError(
            f"adata.uns[{key_added!r}] is not a dict; annotate the data with this key first "
            "or leave key_added=None."
        )
    _logits_network(model.module)
    model._check_if_trained(warn=False)
    groups = pd.Series(np.asarray(adata.obs[groupby]).astype(str))
    cell_types = list(model.cell_types)
    present = [g for g in cell_types if (groups == g).any()]
    if target is not None:  # reference types first, so their cell samples do not change
        _target_index(model, target)
        present += sorted(set(groups) - set(cell_types))
    registered, _ = model._prepare(adata)
    genes = _feature_names(model)
    rng = np.random.default_rng(seed)
    rows = []
    for group in present:
        members = np.flatnonzero(groups.to_numpy() == group)
        if len(members) > n_cells:
            members = np.sort(rng.choice(members, size=n_cells, replace=False))
        values = _attributions(
            model,
            registered,
            target_idx=cell_types.index(group if target is None else target),
            indices=members,
            n_steps=n_steps,
            baseline="zero",
            batch_size=batch_size,
        )
        mean = values.mean(axis=0)
        order = np.argsort(-mean, kind="stable")[:n_top]
        rows.append(
            pd.DataFrame(
                {
                    "group": group,
                    "target": group if target is None else target,
                    "rank": np.arange(1, len(order) + 1),
                    "gene": genes[order],
                    "attribution": mean[order].astype(np.float64),
                }
            )
        )
    model._release(registered)
    columns = ["group", "target", "rank", "gene", "attribution"]
    table = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=columns)
    if key_added is not None:
        adata.uns[key_added]["markers"] = {
            "group": [str(v) for v in table["group"]],
            "target": [str(v) for v in table["target"]],
            "rank": [int(v) for v in table["rank"]],
            "gene": [str(v) for v in table["gene"]],
            "attribution": [float(v) for v in table["attribution"]],
        }
    return table
