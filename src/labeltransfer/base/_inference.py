"""Inference shared by every model: in memory, backed h5ad and zarr, chunk by chunk."""

from __future__ import annotations

import os
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scipy.special import softmax

from labeltransfer._constants import REGISTRY_KEYS
from labeltransfer.data._checks import _csr_rows, _is_csr
from labeltransfer.dataloaders import labelled_mask

from ._batches import INFERENCE_BATCH_SIZE
from ._domain_stats import DomainStatisticsMixin
from ._query import (
    EMPTY_CELLS_WARNING,
    empty_cells,
    is_registered,
    prepare_query,
    warn_empty_cells,
)
from ._save_load import NO_DATA_MESSAGE
from ._zarr import is_lazy, is_zarr_path, open_zarr

if TYPE_CHECKING:
    from collections.abc import Sequence

#: Cells read at a time from an AnnData opened in backed mode, a zarr store, or an in-memory
#: query with more cells: its reindexed copy never exists whole, only one chunk's. JIND
#: annotating 200,000 reordered cells (one thread, per_type): 50,000 added 0.72x the query's
#: CSR, 25,000 0.48x (about the outputs alone), in the same time.
BACKED_CHUNK_SIZE = 25_000


class Outputs(NamedTuple):
    """Per-cell outputs of the network (and of the open-set layer's projection)."""

    logits: np.ndarray
    latent: np.ndarray | None
    coords: np.ndarray | None


class Inference(NamedTuple):
    """:class:`Outputs` of a query with its gene-overlap report and cell names.

    ``query``: which cells are query cells; ``False`` only for the labelled (reference) cells
    of the registered data, or of a copy of it.
    """

    logits: np.ndarray
    latent: np.ndarray | None
    coords: np.ndarray | None
    overlap: dict | None
    names: pd.Index
    query: np.ndarray


class Target(NamedTuple):
    """Where a pass writes its outputs: rows ``start:`` of arrays of ``n_cells`` rows.

    ``filled`` maps an :class:`Outputs` field to its array, allocated by the first batch.
    """

    filled: dict[str, np.ndarray]
    start: int
    n_cells: int


def _fill(target: Target, part: Outputs, start: int) -> None:
    """Copy a batch's outputs into preallocated arrays: no list of batches, no concatenation."""
    for field, values in zip(Outputs._fields, part, strict=True):
        if values is None:
            continue
        if field not in target.filled:
            target.filled[field] = np.empty((target.n_cells, values.shape[1]), dtype=np.float32)
        row = target.start + start
        target.filled[field][row : row + values.shape[0]] = values


class InferenceMixin(DomainStatisticsMixin):
    """Logits, embeddings and predictions of any query, batch by batch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # scvi keeps each model's managers, and so its data (the reference, a CellPredX
        # training AnnData), in a class-level store by model id, also once the model is
        # gone; no public call can act on a collected model, so they go with it here
        weakref.finalize(self, type(self)._per_instance_manager_store.pop, self.id, None)

    def _inference_kwargs(self, adata: AnnData, **options) -> dict[str, Any]:
        """Extra ``module.inference`` arguments for ``adata`` (JIND selects its alignment).

        ``options`` are the model-specific keyword arguments of :meth:`annotate`,
        :meth:`predict` and :meth:`get_latent_representation` (JIND: ``alignment``); a model
        without any refuses them as Python refuses an unknown keyword.
        """
        if options:
            raise TypeError(
                f"{type(self).__name__} got unexpected keyword argument(s) {sorted(options)}."
            )
        return {}

    def _own_data(self) -> AnnData:
        """Return the registered AnnData, for a call given ``adata=None``.

        Raises
        ------
        ValueError
            If the model was loaded without data (``model.adata`` is ``None``).
        """
        if self.adata is None:
            raise ValueError(NO_DATA_MESSAGE.format(cls=type(self).__name__))
        return self.adata

    def _inference_for(
        self, adata: AnnData | str | os.PathLike[str] | None, options: dict[str, Any]
    ) -> tuple[AnnData | None, dict[str, Any]]:
        """Open a zarr path, and select the ``module.inference`` arguments for the data."""
        if is_zarr_path(adata):
            adata = open_zarr(adata)
        return adata, self._inference_kwargs(
            self._own_data() if adata is None else adata, **options
        )

    def _query_options(self) -> dict[str, Any]:
        return {"input_type": self.module.input_type}

    def _prepare(self, adata: AnnData | None, **harmonize_kwargs) -> tuple[AnnData, dict | None]:
        """Return ``adata`` registered (``None``: the model's own data, checked like a query)."""
        target = self._own_data() if adata is None else adata
        return prepare_query(self, target, **self._query_options(), **harmonize_kwargs)

    def _infer(
        self,
        adata: AnnData | None,
        *,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        return_latent: bool = True,
        return_coords: bool = False,
        inference_kwargs: dict[str, Any] | None = None,
        **harmonize_kwargs,
    ) -> Inference:
        """Return the outputs, gene-overlap report and cell names of a query (or own data).

        ``inference_kwargs`` are passed to ``module.inference``; by default they are
        :meth:`_inference_kwargs` of the data (selected once, before the first minibatch).
        ``return_coords`` adds the cells' coordinates in the open-set layer's coverage space.

        An AnnData opened in backed mode (``anndata.read_h5ad(path, backed="r")``), the path of
        a zarr store, or an AnnData from :func:`~labeltransfer.base._zarr.open_zarr` is read
        :data:`BACKED_CHUNK_SIZE` cells at a time: each chunk is loaded, harmonised and passed
        through the network, so memory holds one chunk of expression plus the outputs. So is
        a query in memory with more cells than one chunk: its reindexed, normalised copy then
        never exists whole, only one chunk's.
        """
        if is_zarr_path(adata):
            adata = open_zarr(adata)
        if inference_kwargs is None:
            inference_kwargs = self._inference_kwargs(self._own_data() if adata is None else adata)
        forward = {
            "batch_size": batch_size,
            "inference_kwargs": inference_kwargs,
            "return_latent": return_latent,
            "return_coords": return_coords,
        }
        by_chunks = adata is not None and (
            is_lazy(adata) or (adata.n_obs > BACKED_CHUNK_SIZE and not is_registered(self, adata))
        )
        if not by_chunks:
            registered, overlap = self._prepare(adata, **harmonize_kwargs)
            rows = slice(None) if indices is None else np.asarray(indices)
            try:
                query = ~labelled_mask(self.get_anndata_manager(registered))[rows]
                if overlap is not None:  # a query: annotate() rejects its cells without counts
                    empty = empty_cells(self, registered)
                    overlap = {**overlap, "empty": empty[rows]}
                if return_coords:  # passed down, not stored: threads may share the model
                    forward["residual_axes"] = self._query_residual_axes(registered, indices)
                outputs = self._forward_by_domain(registered, indices, query, forward)
            finally:  # also on an error or Ctrl+C
                self._release(registered)
            names = registered.obs_names
            return Inference(*outputs, overlap, names[rows], query)
        positions = np.arange(adata.n_obs) if indices is None else np.asarray(indices)
        if positions.size == 0:
            raise ValueError("No cells to annotate: the AnnData or the indices are empty.")
        filled: dict[str, np.ndarray] = {}
        names, overlap, empty, query = [], None, [], []
        step = BACKED_CHUNK_SIZE
        if return_coords:
            forward["residual_axes"] = self._chunked_residual_axes(
                adata, positions, harmonize_kwargs
            )
        with self._chunked_query_statistics(adata, positions, harmonize_kwargs):
            for start in range(0, positions.size, step):
                stop = min(start + step, positions.size)
                # a slice reads a contiguous range; an index array is 20-40x slower on zarr
                rows = slice(start, stop) if indices is None else positions[start:stop]
                chunk = _read_chunk(adata, rows)
                with warnings.catch_warnings():  # one warning for the whole query, below
                    warnings.filterwarnings("ignore", message=f".*{EMPTY_CELLS_WARNING}")
                    registered, overlap = self._prepare(chunk, **harmonize_kwargs)
                try:
                    empty.append(empty_cells(self, registered))
                    query.append(~labelled_mask(self.get_anndata_manager(registered)))
                    # straight into the query's arrays: no chunk-sized copy
                    self._forward(
                        registered, target=Target(filled, start, positions.size), **forward
                    )
                finally:
                    self._release(registered)
                names.append(registered.obs_names)
                del chunk, registered  # before the next chunk is read
        empty = np.concatenate(empty)
        if empty.any():
            genes = self.adata_manager.get_state_registry(REGISTRY_KEYS.X_KEY).column_names
            warn_empty_cells(int(empty.sum()), positions.size, len(genes), stacklevel=4)
        overlap = {**(overlap or {}), "empty": empty}
        outputs = Outputs(*(filled.get(field) for field in Outputs._fields))
        return Inference(*outputs, overlap, names[0].append(names[1:]), np.concatenate(query))

    @contextmanager
    def _registered_sample(
        self, adata: AnnData, rows: np.ndarray, harmonize_kwargs: dict[str, Any]
    ) -> Iterator[AnnData]:
        """Within the block, ``rows`` of a query read by chunks, in memory and registered.

        Its cells without counts are not reported here: the chunks report them.
        """
        sample = adata[np.unique(rows)].to_memory()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=f".*{EMPTY_CELLS_WARNING}")
            registered, _ = self._prepare(sample, **harmonize_kwargs)
        try:
            yield registered
        finally:
            self._release(registered)

    def _release(self, registered: AnnData) -> None:
        """Forget a query AnnData registered only for one inference call.

        scvi-tools keeps a manager, and so the data, of every AnnData registered with a
        model or its class; without this, each annotated query (or backed chunk) would stay in
        memory as long as the process. ``registered`` was registered by
        :func:`~labeltransfer.base._query.register_for_one_call`, so scvi's public
        ``deregister_manager`` finds it and removes it from both stores.
        """
        if registered is not self.adata and registered.uns.get("_lt_query", False):
            self.deregister_manager(registered)

    @torch.inference_mode()
    def _forward(
        self,
        adata: AnnData,
        *,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        inference_kwargs: dict[str, Any] | None = None,
        return_latent: bool = True,
        return_coords: bool = False,
        residual_axes: np.ndarray | None = None,
        target: Target | None = None,
    ) -> Outputs:
        """Logits, embeddings and coverage coordinates of ``adata`` (registered), by batch.

        ``residual_axes``: the query's own axes appended to the coverage coordinates
        (:meth:`~labeltransfer.base._openset_mixin.OpenSetMixin._query_residual_axes`).
        ``target``: the arrays to write into (a chunk of a larger query); by default new ones.
        The returned outputs are the written rows.
        """
        self._check_if_trained(warn=False)
        self.module.eval()
        loader = self._batches(
            adata,
            indices,
            batch_size or INFERENCE_BATCH_SIZE,
            normalized=True,
            coverage=return_coords,
        )
        n_cells = adata.n_obs if indices is None else len(indices)
        target = target or Target({}, 0, n_cells)
        start = 0
        for tensors in loader:
            outputs = self.module.inference(
                **self.module._get_inference_input(tensors), **(inference_kwargs or {})
            )
            part = Outputs(
                outputs["logits"].float().cpu().numpy(),
                outputs["z"].float().cpu().numpy() if return_latent else None,
                self._coords(tensors, residual_axes) if return_coords else None,
            )
            _fill(target, part, start)
            start += part.logits.shape[0]
        rows = slice(target.start, target.start + n_cells)
        return Outputs(
            *(None if f not in target.filled else target.filled[f][rows] for f in Outputs._fields)
        )

    def _probabilities(self, logits: np.ndarray, temperature: float | None = None) -> np.ndarray:
        """Softmax of ``logits`` at ``temperature`` (the calibrated one by default)."""
        if temperature is None:
            temperature = getattr(self, "calibration_", {}).get("temperature", 1.0)
        # float64: float32 saturates at exactly 1.0 for logit gaps of ~17, which ties confidences
        return softmax(logits.astype(np.float64) / temperature, axis=1)

    def predict(
        self,
        adata: AnnData | str | os.PathLike[str] | None = None,
        indices: Sequence[int] | None = None,
        soft: bool = False,
        batch_size: int | None = None,
        layer: str | None = None,
        **inference_options,
    ) -> np.ndarray | pd.DataFrame:
        """Predict reference cell types (the argmax, before any rejection).

        Parameters
        ----------
        adata
            Query AnnData (any gene order; missing genes are zero-filled; backed or in
            memory), the path of a zarr store (read in chunks) or ``None`` for the AnnData the
            model was set up with.
        indices
            Cells of ``adata`` to use; all by default.
        soft
            Return the probability matrix instead of labels.
        batch_size
            Minibatch size for inference (1024 cells by default).
        layer
            Layer of the query holding its expression data; by default the layer the model
            was set up with (``X`` if none). ``"X"`` reads the query's ``X``.
        **inference_options
            Model-specific options: JIND's ``alignment`` (which stored alignment to use,
            see :meth:`~labeltransfer.JIND.align`). The other models take none.

        Returns
        -------
        Labels (``np.ndarray`` of str) or, with ``soft=True``, a DataFrame cells x reference
        types (registry order) whose rows sum to one (temperature-calibrated where the model
        calibrates).
        """
        adata, inference_kwargs = self._inference_for(adata, inference_options)
        inference = self._infer(
            adata,
            indices=indices,
            batch_size=batch_size,
            return_latent=False,
            layer=layer,
            inference_kwargs=inference_kwargs,
        )
        probs = self._probabilities(inference.logits)
        if soft:
            return pd.DataFrame(probs, index=inference.names, columns=self.output_classes)
        return np.asarray(self.output_classes, dtype=object)[probs.argmax(axis=1)]

    def get_latent_representation(
        self,
        adata: AnnData | str | os.PathLike[str] | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        layer: str | None = None,
        **inference_options,
    ) -> np.ndarray:
        """Return the model's cell embedding (see the model's docstring for which layer).

        Parameters
        ----------
        adata
            Query AnnData, the path of a zarr store (read in chunks) or ``None`` for the
            AnnData the model was set up with.
        indices
            Cells of ``adata`` to use; all by default.
        batch_size
            Minibatch size for inference (1024 cells by default).
        layer
            Layer of the query holding its expression data; by default the layer the model
            was set up with (``X`` if none). ``"X"`` reads the query's ``X``.
        **inference_options
            Model-specific options: JIND's ``alignment`` (which stored alignment to use,
            see :meth:`~labeltransfer.JIND.align`). The other models take none.

        Returns
        -------
        Array of shape ``(n_cells, n_latent)``.
        """
        adata, inference_kwargs = self._inference_for(adata, inference_options)
        return self._infer(
            adata,
            indices=indices,
            batch_size=batch_size,
            layer=layer,
            inference_kwargs=inference_kwargs,
        ).latent


def _read_chunk(adata: AnnData, rows: slice | np.ndarray) -> AnnData:
    """Rows of a query as an AnnData in memory, with what annotation reads: X, layers, obs, var.

    A range of an in-memory query (not a view) shares its CSR arrays instead of copying them
    (scipy's row slice copies element by element); its other matrices are copied, and anything
    else is read with ``to_memory``. With :func:`~labeltransfer.data._checks._csr_rows`:
    JIND, 200,000 cells, ``"per_type"``, 10.2-10.6 s -> 9.3-9.4 s.
    """
    if isinstance(rows, np.ndarray) or is_lazy(adata) or adata.is_view:
        return adata[rows].to_memory()

    def part(matrix: Any) -> Any:
        return _csr_rows(matrix, rows.start, rows.stop) if _is_csr(matrix) else matrix[rows].copy()

    return AnnData(
        X=None if adata.X is None else part(adata.X),
        obs=adata.obs.iloc[rows].copy(),
        var=adata.var.copy(),
        layers={name: part(value) for name, value in adata.layers.items()},
    )
