"""Key gene hit rate (KGHR): how many known markers a type's determinant genes recover."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

__all__ = ["kghr"]


def _gene_sets(genes: pd.DataFrame | Mapping[str, Iterable[str]], *, what: str) -> dict:
    if isinstance(genes, pd.DataFrame):
        missing = {"group", "gene"} - set(genes.columns)
        if missing:
            raise ValueError(
                f"{what} as a DataFrame needs columns 'group' and 'gene' (missing "
                f"{sorted(missing)}), as returned by lt.tl.determinant_genes."
            )
        return {
            str(g): list(map(str, sub["gene"])) for g, sub in genes.groupby("group", sort=False)
        }
    if isinstance(genes, Mapping):
        out = {}
        for group, values in genes.items():
            if isinstance(values, str):
                raise TypeError(
                    f"{what}[{group!r}] is a string; give a list of genes (e.g. ['CD14', 'LYZ'])."
                )
            out[str(group)] = [str(v) for v in values]
        return out
    raise TypeError(
        f"{what} must be a DataFrame with 'group' and 'gene' columns or a dict type -> genes, "
        f"got {type(genes).__name__}."
    )


def kghr(
    determinant: pd.DataFrame | Mapping[str, Iterable[str]],
    markers: Mapping[str, Iterable[str]],
    *,
    features: Sequence[str] | None = None,
) -> pd.Series:
    r"""Key gene hit rate of each cell type (CellPredX, S7 Fig).

    .. math::

        \mathrm{KGHR}_t = \frac{|D_t \cap M_t|}{|M_t|}

    where :math:`D_t` are the determinant genes of type :math:`t` (e.g. the 50 of
    :func:`labeltransfer.tl.determinant_genes`) and :math:`M_t` the user's known markers of
    :math:`t`: the fraction of the known markers that the model's interpreter recovers.

    Parameters
    ----------
    determinant
        Determinant genes per type: the table of ``lt.tl.determinant_genes`` (columns
        ``group`` and ``gene``) or a dict type -> genes.
    markers
        Known marker genes per type (dict type -> list of genes).
    features
        The model's input genes. When given, markers that are not among them (which no
        determinant gene can hit) are left out of :math:`M_t`.

    Returns
    -------
    Series named ``"kghr"`` indexed by the types present in both ``determinant`` and
    ``markers`` (in ``markers``' order), values in ``[0, 1]``; NaN for a type none of whose
    markers is a model feature.

    Raises
    ------
    ValueError
        If no type is shared between ``determinant`` and ``markers``.

    Notes
    -----
    The paper defines KGHR as the overlap between the determinant genes and reference marker
    genes (higher is better, up to 0.9 with 50 determinant genes); it gives no formula. The
    denominator here is the number of known markers, the only reading under which a rate of
    0.9 is reachable with short marker lists.
    """
    found = _gene_sets(determinant, what="determinant")
    known = _gene_sets(markers, what="markers")
    shared = [t for t in known if t in found]
    if not shared:
        raise ValueError(
            f"No cell type is in both the determinant genes ({sorted(found)[:5]}) and the "
            f"markers ({sorted(known)[:5]}); name the types the same way."
        )
    universe = set(map(str, features)) if features is not None else None
    values = []
    for t in shared:
        marker_set = set(known[t])
        if universe is not None:
            marker_set &= universe
        if not marker_set:
            values.append(np.nan)
            continue
        values.append(len(marker_set & set(found[t])) / len(marker_set))
    return pd.Series(values, index=pd.Index(shared, name="cell_type"), name="kghr", dtype=float)
