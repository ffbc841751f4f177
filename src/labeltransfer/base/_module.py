"""Base class of the annotation modules: input handling and the scvi module contract."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from scipy import sparse
from scvi.module.base import BaseModuleClass, LossOutput

from labeltransfer._constants import REGISTRY_KEYS
from labeltransfer.nn import labelled_cross_entropy, normalize_input

from ._batches import NORMALIZED_KEY


def all_batch_norms(module: torch.nn.Module) -> list[torch.nn.modules.batchnorm._BatchNorm]:
    """Return every batch-normalisation layer of ``module``, in module order."""
    return [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


class AnnotationModule(BaseModuleClass):
    """A discriminative scvi module: normalised input genes in, ``z`` and ``logits`` out.

    Subclasses build their networks and implement ``inference(x, ...)`` returning
    ``{"z": embedding, "logits": logits}``; the default :meth:`loss` is the cross-entropy on
    the labelled cells (weighted by ``class_weights`` when the subclass registers them).

    Parameters
    ----------
    n_input
        Number of registered genes.
    n_labels
        Number of reference cell types.
    feature_idx
        Indices of the genes used as input.
    input_type
        ``"counts"`` (log(CPM + 1) per minibatch), ``"lognorm"`` (used as is) or ``"peaks"``
        (scATAC-seq peak counts, read as TF-IDF with ``peak_weights``; the module's
        :attr:`input_type` is then ``"counts"``, the kind of data it takes).
    peak_weights
        The peaks' TF-IDF weights (``input_type="peaks"`` only; a buffer, saved with the
        module).
    """

    def __init__(
        self,
        n_input: int,
        n_labels: int,
        *,
        feature_idx: Sequence[int],
        input_type: str,
        peak_weights: Sequence[float] | None = None,
    ):
        super().__init__()
        self.n_input = n_input
        self.n_labels = n_labels
        if (input_type == "peaks") != (peak_weights is not None):
            raise ValueError("peak_weights go with input_type='peaks', and only with it.")
        self.input_type = "counts" if input_type == "peaks" else input_type
        self.register_buffer("feature_idx", torch.as_tensor(feature_idx, dtype=torch.long))
        weights = None if peak_weights is None else torch.as_tensor(peak_weights)
        self.register_buffer("peak_weights", None if weights is None else weights.float())

    @property
    def n_features(self) -> int:
        """Number of input genes."""
        return self.feature_idx.numel()

    #: Library size of the log-normalisation of count input (1e6: log(CPM + 1), as scNym).
    target_sum: float = 1e6

    def inference_norms(self) -> list[torch.nn.modules.batchnorm._BatchNorm]:
        """Return the batch norms :meth:`inference` passes through: all of the module's.

        These are the layers whose statistics each domain replaces with its own
        (:mod:`labeltransfer.base._domain_stats`); a module whose inference skips some of its
        batch norms lists only the others.
        """
        return all_batch_norms(self)

    def transform(
        self, x: torch.Tensor | sparse.csr_matrix, normalized: bool = False
    ) -> torch.Tensor:
        """Log-normalise a minibatch (TF-IDF for peaks) and keep the model's features.

        ``x``: a dense tensor or a CSR matrix (:func:`~labeltransfer.nn.normalize_input`).
        ``normalized``: ``x`` already is the model's input (``transform`` of a CSR minibatch,
        as inference reads one) and is returned as is.
        """
        if normalized:
            return x
        return normalize_input(
            x, self.feature_idx, self.input_type, self.target_sum, self.peak_weights
        )

    def held_out_reference(self, unlabelled: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mask of the cells of an unlabelled minibatch that carry a reference label.

        They are held-out reference cells trained like the query
        (``RefQueryDataSplitter(validation_in_query_stream=True)``); a minibatch without a
        labels tensor has none.
        """
        labels = unlabelled.get(REGISTRY_KEYS.LABELS_KEY)
        if labels is None:
            x = unlabelled[REGISTRY_KEYS.X_KEY]
            return torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        return labels.long().ravel() < self.n_labels

    def _get_inference_input(self, tensors: dict[str, torch.Tensor], **kwargs) -> dict:
        if NORMALIZED_KEY in tensors:  # an inference minibatch, normalised as it was read
            return {"x": tensors[NORMALIZED_KEY], "normalized": True}
        return {"x": tensors[REGISTRY_KEYS.X_KEY]}

    def _get_generative_input(self, tensors, inference_outputs, **kwargs) -> dict:
        return {}

    def generative(self) -> dict:
        """Return nothing: the annotation models have no generative part."""
        return {}

    def loss(self, tensors, inference_outputs, generative_outputs) -> LossOutput:
        """Cross-entropy and accuracy on the labelled cells of the minibatch."""
        return labelled_cross_entropy(
            inference_outputs["logits"],
            tensors[REGISTRY_KEYS.LABELS_KEY],
            self.n_labels,
            getattr(self, "class_weights", None),
        )

    def sample(self, *args, **kwargs):
        """Not available: the annotation models are discriminative."""
        raise NotImplementedError(f"{type(self).__name__} is a classifier and cannot sample data.")
