"""``annotate``: the standard output fields written back to the AnnData (or zarr store)."""

from __future__ import annotations

import logging
import os
import warnings
from importlib.metadata import version
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData
from scvi import settings

from labeltransfer._constants import NOVEL_PREFIX, OUTPUT_KEYS, UNASSIGNED

from ._openset import novelty_score
from ._openset_mixin import Rejection
from ._uns import h5ad_safe
from ._zarr import is_lazy, is_zarr_path, open_zarr, write_annotation

logger = logging.getLogger(__name__)


class AnnotateMixin:
    """Write calls, confidences, novelty, probabilities and the embedding of a query."""

    def annotate(
        self,
        adata: AnnData | str | os.PathLike[str] | None = None,
        *,
        key_added: str | None = None,
        rejection: Rejection = "default",
        novel: str | bool = "auto",
        copy: bool = False,
        batch_size: int | None = None,
        gene_symbols: str | None = None,
        id_map: Any = None,
        layer: str | None = None,
        **inference_options,
    ) -> AnnData | None:
        """Annotate cells and write the standard output fields.

        Parameters
        ----------
        adata
            Query AnnData (any gene order; missing genes are zero-filled and reported), or
            ``None`` for the AnnData the model was set up with. An AnnData opened in backed
            mode (``anndata.read_h5ad(path, backed="r+")``) is read 25,000 cells at a time,
            so its expression is never loaded whole; the results go to its in-memory
            ``obs``/``obsm``/``uns``, and ``adata.write()`` then stores them in the file
            without rewriting ``X``. The path of a zarr store (written by
            ``AnnData.write_zarr``) is read the same way, chunk by chunk, and the results are
            written into the store (``obs``, the two ``obsm`` entries and ``uns[key]``),
            leaving ``X`` untouched.
        key_added
            Prefix of the written fields; the model's name by default (e.g. ``"jind"``).
        rejection
            ``"default"`` (the model's rule: ``"openset"`` for every model), ``"openset"``
            (the shared layer: per-type confidence thresholds that reject about ``theta`` of
            the held-out reference, and cells the reference does not cover),
            ``"per_type"`` (the confidence thresholds only), ``"paper"`` (the rule of the
            model's paper), a float (one global confidence cut) or ``None``. Only
            ``"openset"`` runs the coverage test (novelty score, novel groups); the others are
            the faster choice for a large query whose types the reference all has.
        novel
            ``"auto"``: rejected cells the reference does not cover that form groups of at
            least 10 cells are called ``"novel_<i>"`` (the other rejected cells stay
            ``"Unassigned"``); ``False``: every rejected cell is ``"Unassigned"``. Only with
            the ``"openset"`` rule; scDET's novel classes are its own.
        copy
            Write into a copy of ``adata`` and return it.
        batch_size
            Minibatch size for inference (1024 cells by default).
        gene_symbols
            Column of ``adata.var`` holding gene names matching the reference's.
        id_map
            Ensembl-to-symbol table (path or DataFrame) used when the query and the reference
            name genes differently.
        layer
            Layer of the query holding its expression data (e.g. ``"counts"`` when the
            model was set up on ``X`` but the query's ``X`` is log-normalised); by default the
            layer the model was set up with (``X`` if none). ``"X"`` reads the query's ``X``.
            Not for the registered AnnData, which is read as it was set up.
        **inference_options
            Model-specific options: JIND's ``alignment`` (which stored alignment to use,
            see :meth:`~labeltransfer.JIND.align`). The other models take none.

        Returns
        -------
        ``None``, or the annotated copy if ``copy=True``. Sets the following fields:

        ``obs[key]``
            final call (categorical): a reference type, ``"Unassigned"`` when rejected, or
            ``"novel_<i>"`` for a group of cells the reference does not cover.
        ``obs[f"{key}_prediction"]``
            argmax reference type, before rejection.
        ``obs[f"{key}_confidence"]``
            probability of the predicted type (temperature-calibrated on held-out reference
            cells).
        ``obs[f"{key}_novelty"]``
            out-of-distribution score of the open-set layer (0 to about 1; higher = further
            from every reference type): the fraction of the cell's neighbourhood without a
            mutual nearest reference neighbour of its predicted type, ties broken by the
            confidence. Only with the ``"openset"`` rule: the other rules do not run the
            coverage test (most of the time annotating a large query takes), and a score
            left by an earlier annotation under ``key`` is removed.
        ``obs[f"{key}_rejected"]``
            whether the rejection rule rejected the cell (a query cell without any count in
            the model's genes is always rejected, with a warning).
        ``obsm[f"{key}_probabilities"]``
            DataFrame cells x reference types (registry order).
        ``obsm[f"X_{key}"]``
            the model's embedding.
        ``uns[key]``
            method, package version, seed, rejection rule and thresholds, calibration,
            gene-overlap report, input type and training summary.
        """
        key = key_added or self._default_key
        if "/" in key:
            raise ValueError(
                f"key_added={key!r} contains '/', which anndata cannot store in a field name "
                "(h5ad turns it into nested groups, zarr refuses it). Choose a key without '/'."
            )
        zarr_path = adata if is_zarr_path(adata) else None
        if zarr_path is not None:
            if copy:
                raise ValueError(
                    "copy=True needs an AnnData in memory, but a zarr path was given: its "
                    "results are written into the store. Pass copy=False, or read it with "
                    "`anndata.read_zarr(path)` first."
                )
            adata = open_zarr(zarr_path)
        if adata is not None and not isinstance(adata, AnnData):
            raise TypeError(
                f"Expected an AnnData or the path of a zarr store, got {type(adata).__name__}. "
                "Read your data with `anndata.read_h5ad` (or build an AnnData) first."
            )
        target = self._own_data() if adata is None else adata
        if copy and is_lazy(target):
            raise ValueError(
                "copy=True needs the data in memory, but this AnnData is backed (read with "
                "backed=...). Annotate it in place (results go to obs/obsm in memory) and "
                "store them with `adata.write()` (the file must be opened with backed='r+'), "
                "or load it with `adata.to_memory()` first."
            )
        if copy:
            target = target.copy()
        self._check_output_key(target, key, store=zarr_path)
        self._check_if_trained(warn=False)
        # a wrong rule fails before any inference; only "openset" reads the coverage test,
        # the costliest part of annotating a large query, so the other rules skip it
        tests_coverage = self._resolve_rule(rejection) == "openset"
        self._check_novel(novel)
        inference_kwargs = self._inference_kwargs(target, **inference_options)
        logits, latent, coords, overlap, _, query = self._infer(
            target if adata is not None else None,
            batch_size=batch_size,
            gene_symbols=gene_symbols,
            id_map=id_map,
            layer=layer,
            return_coords=tests_coverage,
            inference_kwargs=inference_kwargs,
        )
        probs = self._probabilities(logits)
        prediction = probs.argmax(axis=1)
        confidence = probs.max(axis=1)
        centred = uncovered = coverage = None
        if tests_coverage:
            domains = self._coverage_groups(None if adata is None else target, query)
            centred, uncovered, coverage = self._coverage(coords, domains, prediction)
        rejected, rule = self._reject(confidence, prediction, rejection, uncovered, query=query)
        if coverage is not None:
            rule = {**rule, "coverage": coverage}
        empty = overlap.pop("empty") if overlap is not None else np.zeros_like(rejected)
        if empty.any():  # no count in the model's genes: nothing to base a call on
            rejected = rejected | empty
            rule = {**rule, "n_rejected_without_counts": int(empty.sum())}

        types = self.output_classes
        calls = np.asarray(types, dtype=object)[prediction]
        final = calls.copy()
        final[rejected] = UNASSIGNED
        if rule["rule"] == "openset":
            final, rule["n_novel_groups"] = self._open_set_calls(
                final, rejected & ~empty, centred, uncovered, novel
            )
        self._warn_if_most_rejected(rejected, rule)
        novel_names = sorted({c for c in final if c.startswith(NOVEL_PREFIX)} - set(types))
        target.obs[key] = pd.Categorical(
            final, categories=list(dict.fromkeys([*types, *novel_names, UNASSIGNED]))
        )
        target.obs[key + OUTPUT_KEYS.PREDICTION] = pd.Categorical(calls, categories=types)
        target.obs[key + OUTPUT_KEYS.CONFIDENCE] = confidence.astype(np.float32)
        target.obs[key + OUTPUT_KEYS.REJECTED] = rejected
        if uncovered is not None:
            target.obs[key + OUTPUT_KEYS.NOVELTY] = novelty_score(uncovered, confidence).astype(
                np.float32
            )
        else:  # a previous annotation's score would not belong to these calls
            target.obs.drop(columns=key + OUTPUT_KEYS.NOVELTY, errors="ignore", inplace=True)
        target.obsm[key + OUTPUT_KEYS.PROBABILITIES] = pd.DataFrame(
            probs.astype(np.float32), index=target.obs_names, columns=types
        )
        target.obsm[OUTPUT_KEYS.EMBEDDING_PREFIX + key] = latent.astype(np.float32, copy=False)
        target.uns[key] = h5ad_safe(
            {
                "method": type(self).__name__,
                "package_version": version("labeltransfer"),
                "seed": self.training_summary_.get("seed"),
                "classes": types,
                "rejection": rule,
                "calibration": self.calibration_,
                "input_type": (
                    "peaks" if self.module.peak_weights is not None else self.module.input_type
                ),
                "gene_overlap": overlap if overlap is not None else {"overlap": 1.0},
                "n_cells": int(target.n_obs),
                "n_rejected": int(rejected.sum()),
                "training": self.training_summary_,
                **self._extra_uns(target, inference_kwargs),
            }
        )
        logger.info(
            "Annotated %d cells with %s: %d rejected (%.1f%%).",
            target.n_obs,
            type(self).__name__,
            rejected.sum(),
            100 * rejected.mean(),
        )
        if zarr_path is not None:
            obsm_keys = [key + OUTPUT_KEYS.PROBABILITIES, OUTPUT_KEYS.EMBEDDING_PREFIX + key]
            write_annotation(zarr_path, target, key, obsm_keys)
        return target if copy else None

    def _extra_uns(self, adata: AnnData, inference_kwargs: dict[str, Any]) -> dict[str, Any]:
        """Model-specific entries of ``uns[key]``."""
        return {}

    def _check_output_key(self, adata: AnnData, key: str, store: str | None = None) -> None:
        """Refuse a ``key_added`` whose fields would overwrite data that are not ours.

        The registered label and batch columns and scvi's ``_scvi_*`` columns are never
        overwritten. Existing ``obs``/``obsm``/``uns`` entries of the written names are
        overwritten (with a warning) only when ``uns[key]`` is a previous annotation by a
        model of this package; anything else (e.g. ``key_added="pca"`` over
        ``obsm["X_pca"]`` and ``uns["pca"]``) is refused. ``store`` is the path of a zarr
        store being annotated, whose ``obsm`` and ``uns`` are not loaded in ``adata``.
        """
        setup_args = self.adata_manager.registry["setup_args"]
        registered = {setup_args["labels_key"], setup_args.get("batch_key")} - {None}
        protected = registered | {c for c in adata.obs.columns if c.startswith("_scvi")}
        written = [
            key + s
            for s in (
                "",
                OUTPUT_KEYS.PREDICTION,
                OUTPUT_KEYS.CONFIDENCE,
                OUTPUT_KEYS.REJECTED,
                OUTPUT_KEYS.NOVELTY,
            )
        ]
        clash = protected.intersection(written)
        if key.startswith("_scvi") or clash:
            raise ValueError(
                f"key_added={key!r} would overwrite {sorted(clash) or key!r}, which the model "
                "registered. Choose another key_added."
            )
        obsm_names = [key + OUTPUT_KEYS.PROBABILITIES, OUTPUT_KEYS.EMBEDDING_PREFIX + key]
        obsm_keys, previous = set(adata.obsm.keys()), adata.uns.get(key)
        if store is not None:
            obsm_keys, previous = _stored_outputs(store, key)
        existing = [f"obs[{c!r}]" for c in written if c in adata.obs.columns]
        existing += [f"obsm[{n!r}]" for n in obsm_names if n in obsm_keys]
        existing += [f"uns[{key!r}]"] if previous is not None else []
        if not existing:
            return
        if not (isinstance(previous, dict) and previous.get("method") in _model_names()):
            raise ValueError(
                f"key_added={key!r} would overwrite {existing}, which no labeltransfer model "
                f"wrote (uns[{key!r}]['method'] does not name one). Choose another key_added, "
                "or delete those entries first if they may go."
            )
        warnings.warn(
            f"Overwriting the previous annotation in {existing} (key_added={key!r}). Pass "
            "another key_added to keep both.",
            UserWarning,
            stacklevel=settings.warnings_stacklevel,
        )


def _model_names() -> set[str]:
    """Class names of the package's models (every class built on :class:`AnnotateMixin`)."""
    names, todo = set(), [AnnotateMixin]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return {name for name in names if not name.endswith("Mixin")}


def _stored_outputs(store: str | os.PathLike[str], key: str) -> tuple[set[str], Any]:
    """Return the ``obsm`` keys and ``uns[key]`` (``None`` if absent) of a zarr store."""
    import zarr
    from anndata.io import read_elem

    group = zarr.open_group(store, mode="r", use_consolidated=False)
    obsm_keys = set(group["obsm"].keys()) if "obsm" in group else set()
    uns = group["uns"] if "uns" in group else None
    return obsm_keys, read_elem(uns[key]) if uns is not None and key in uns else None
