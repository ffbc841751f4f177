"""CellPredX networks: feature extractor, classifier, attention network and class centers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from scvi.module.base import LossOutput, auto_move_data
from torch import nn

from labeltransfer._constants import REGISTRY_KEYS
from labeltransfer.base import AnnotationModule

from ._losses import (
    CellPredXLossConfig,
    feature_alignment_loss,
    knn_contrastive_loss,
    projection_regularization,
    pseudo_label_selection,
    sparse_center_loss,
)

#: Key of the kNN-neighbour expression added to query minibatches by the CellPredX splitter.
POSITIVE_KEY = "X_positive"


class AttentionNetwork(nn.Module):
    """CellPredX's attention network ``A``: per-dimension weights for the sparse center loss.

    A context-encoder unit (CE-Unit: linear layer, batch norm, tanh) maps the embedding to a
    latent context ``e``; a multi-head binary classifier gives each embedding dimension ``j``
    an inclusion score ``s_in_j = w_in_j . e + b_in_j`` and an exclusion score ``s_ex_j =
    w_ex_j . e + b_ex_j`` (Eqs. 8-9); the weight is ``a_j = exp(s_in_j) / (exp(s_in_j) +
    exp(s_ex_j))`` (Eq. 10).

    Parameters
    ----------
    n_latent
        Embedding dimensionality ``m`` (one head per dimension).
    n_context
        Width of the CE-Unit ("a linear layer of m dimension": ``m`` by default).
    """

    def __init__(self, n_latent: int, n_context: int | None = None):
        super().__init__()
        n_context = n_context or n_latent
        self.context = nn.Sequential(
            nn.Linear(n_latent, n_context), nn.BatchNorm1d(n_context), nn.Tanh()
        )
        self.inclusion = nn.Linear(n_context, n_latent)
        self.exclusion = nn.Linear(n_context, n_latent)

    def scores(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inclusion and exclusion scores, cells x dimensions."""
        e = self.context(z)
        return self.inclusion(e), self.exclusion(e)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Attention weights in ``(0, 1)``, cells x dimensions.

        Eq. 10's two-way softmax, ``exp(s_in) / (exp(s_in) + exp(s_ex))``, is the logistic
        function of ``s_in - s_ex`` (the same values to 1e-7): a softmax over a last axis of
        two entries took 2.6 ms forward and backward on 512 cells x 64 dimensions (one
        thread), the logistic 0.12 ms; three calls a step were a tenth of an epoch.
        """
        s_in, s_ex = self.scores(z)
        return torch.sigmoid(s_in - s_ex)


#: Library size of CellPredX's log-normalisation of counts (see ``CellPredXModule.target_sum``).
TARGET_SUM = 1e4


class CellPredXModule(AnnotationModule):
    """Feature extractor ``f`` (input -> 64-d embedding), classifier ``c`` and attention ``A``.

    ``inference`` returns ``z = f(x)`` and ``logits = c(z)``: the attention network and the
    class centers are used only by the sparse center loss during training. Module attributes
    ``encoder`` and ``classifier`` make :func:`labeltransfer.tl.integrated_gradients` work on
    CellPredX (the paper's interpreter uses the same feature extractor + classifier).

    Parameters
    ----------
    n_input
        Number of registered genes.
    n_labels
        Number of reference cell types.
    feature_idx
        Indices of the genes used as input.
    input_type
        ``"counts"`` (log-normalised to 10,000 counts per cell, per minibatch) or
        ``"lognorm"``.
    n_latent
        Embedding dimensionality (CellPredX: 64).
    n_hidden
        ``None`` (default): the feature extractor is one linear layer, as in the reference
        implementation (the paper does not give its depth). An integer adds a hidden layer of
        that width with ReLU and dropout.
    dropout_rate
        Dropout of the hidden layer (only with ``n_hidden``).
    n_context
        Width of the attention network's CE-Unit (default: ``n_latent``).
    """

    #: Count input is log-normalised to 10,000 counts per cell, as in the reference
    #: implementation (``normalize_total(target_sum=1e4)`` + ``log1p``); the paper only says
    #: "log-normalization". With log(CPM + 1), inputs twice as large, the linear extractor
    #: under the projection regularisation reached 0.63 instead of 0.92 on Kang ctrl -> stim.
    target_sum: float = TARGET_SUM

    def __init__(
        self,
        n_input: int,
        n_labels: int,
        *,
        feature_idx: Sequence[int],
        input_type: str,
        peak_weights: Sequence[float] | None = None,
        n_latent: int = 64,
        n_hidden: int | None = None,
        dropout_rate: float = 0.2,
        n_context: int | None = None,
    ):
        super().__init__(
            n_input,
            n_labels,
            feature_idx=feature_idx,
            input_type=input_type,
            peak_weights=peak_weights,
        )
        self.n_latent = n_latent
        if n_hidden is None:
            self.encoder = nn.Linear(self.n_features, n_latent)
        else:
            self.encoder = nn.Sequential(
                nn.Linear(self.n_features, n_hidden),
                nn.ReLU(),
                nn.Dropout(dropout_rate),
                nn.Linear(n_hidden, n_latent),
            )
        self.classifier = nn.Linear(n_latent, n_labels)
        self.attention = AttentionNetwork(n_latent, n_context)
        self.centers = nn.Parameter(torch.empty(n_labels, n_latent))
        nn.init.kaiming_normal_(self.centers.data.T)  # as DACL and the reference code

    def inference_norms(self) -> list[nn.modules.batchnorm._BatchNorm]:
        """None: the only batch norm is the attention network's, which :meth:`inference` skips.

        So the query's own statistics change no output, and annotation computes none (their
        passes took 0.21 s of a profiled 2.35 s annotating 200,000 cells).
        """
        return []

    @auto_move_data
    def inference(self, x: torch.Tensor, normalized: bool = False) -> dict[str, torch.Tensor]:
        """Embedding ``z`` (the feature extractor's output) and class ``logits``.

        ``normalized``: ``x`` is already the model's input (:meth:`transform`).
        """
        z = self.encoder(self.transform(x, normalized))
        return {"z": z, "logits": self.classifier(z)}

    def loss(
        self,
        tensors: dict[str, torch.Tensor],
        inference_outputs: dict[str, torch.Tensor] | None = None,
        generative_outputs: dict | None = None,
        *,
        config: CellPredXLossConfig | None = None,
        query: dict[str, torch.Tensor] | None = None,
    ) -> LossOutput:
        """CellPredX's training objective (Eq. 7), or the validation loss of a reference minibatch.

        scvi's loss hook, in two modes:

        * **training** (``config`` given; :class:`~labeltransfer.cellpredx.CellPredXTrainingPlan`):
          ``L = L_CE + pr_weight L_PR + cl_weight L_CL + fa_weight L_FA + sc_weight L_SC``
          with the hyper-parameters of ``config`` (the only source of their values), on the
          reference minibatch ``tensors`` and the query minibatch ``query``: cross-entropy on
          the reference; projection regularisation on both minibatches; the kNN contrastive
          loss between each query cell and its neighbour (``query["X_positive"]``); feature
          alignment of the top-``top_p`` query cells to their most similar reference cells;
          and the sparse center loss on the reference cells (true labels) and the most
          confident query cells (pseudo-labels), weighted by the attention network. Without
          a query minibatch only CE, PR (reference) and SC (reference) remain.
          ``inference_outputs`` is not used (both minibatches go through the network here).
        * **evaluation** (``config=None``, as scvi's ``module(tensors)`` calls it for the
          validation metrics): cross-entropy and accuracy of the labelled cells from
          ``inference_outputs``, plus their sparse center loss (true labels, attention
          weights of the cells) as ``center_loss``: what early stopping watches (CellPredX
          stops when the sparse loss stops changing).

        Parameters
        ----------
        tensors
            Reference (labelled) minibatch.
        inference_outputs
            :meth:`inference` of ``tensors``; used in evaluation only.
        generative_outputs
            Unused (scvi's signature).
        config
            The objective's hyper-parameters; ``None`` for evaluation.
        query
            Query minibatch (training only; ``None`` trains on the reference alone).

        Returns
        -------
        :class:`~scvi.module.base.LossOutput`. In training its extra metrics are ``ce_loss``,
        ``pr_loss``, ``contrastive_loss``, ``alignment_loss``, ``center_loss``, ``accuracy``
        (on the reference minibatch) and ``pseudo_labelled_fraction``.
        """
        if config is None:
            output = super().loss(tensors, inference_outputs, generative_outputs)
            labels = tensors[REGISTRY_KEYS.LABELS_KEY].long().ravel()
            known = labels < self.n_labels
            z = inference_outputs["z"][known]
            if z.shape[0] > 1:
                center = sparse_center_loss(z, self.attention(z), labels[known], self.centers)
            else:
                center = z.new_zeros(())
            output.extra_metrics["center_loss"] = center.detach()
            return output
        reference = tensors
        x_ref = self.transform(reference[REGISTRY_KEYS.X_KEY])
        labels = reference[REGISTRY_KEYS.LABELS_KEY].long().ravel()
        if (labels >= self.n_labels).any():
            raise ValueError("The reference minibatch contains unlabelled cells.")
        z_ref = self.encoder(x_ref)
        logits_ref = self.classifier(z_ref)
        ce = F.cross_entropy(logits_ref, labels)
        pr = projection_regularization(z_ref)
        zero = ce.new_zeros(())
        cl = fa = zero
        z_center, a_center, y_center = z_ref, self.attention(z_ref), labels
        fraction = zero
        if query is not None:
            z_query = self.encoder(self.transform(query[REGISTRY_KEYS.X_KEY]))
            pr = pr + projection_regularization(z_query)
            if POSITIVE_KEY in query:
                z_positive = self.encoder(self.transform(query[POSITIVE_KEY]))
                cl = knn_contrastive_loss(z_query, z_positive, config.temperature)
            fa = feature_alignment_loss(z_ref, z_query, config.top_p)
            selected, pseudo = pseudo_label_selection(
                self.classifier(z_query), config.pseudo_label_quantile
            )
            a_query = self.attention(z_query)
            z_center = torch.cat([z_ref, z_query[selected]])
            a_center = torch.cat([a_center, a_query[selected]])
            y_center = torch.cat([labels, pseudo[selected]])
            fraction = selected.float().mean()
        sc = sparse_center_loss(z_center, a_center, y_center, self.centers)
        loss = (
            ce
            + config.pr_weight * pr
            + config.cl_weight * cl
            + config.fa_weight * fa
            + config.sc_weight * sc
        )
        accuracy = (logits_ref.argmax(dim=1) == labels).float().mean()
        return LossOutput(
            loss=loss,
            n_obs_minibatch=x_ref.shape[0],
            extra_metrics={
                "ce_loss": ce.detach(),
                "pr_loss": pr.detach(),
                "contrastive_loss": cl.detach(),
                "alignment_loss": fa.detach(),
                "center_loss": sc.detach(),
                "accuracy": accuracy.detach(),
                "pseudo_labelled_fraction": fraction.detach(),
            },
        )
