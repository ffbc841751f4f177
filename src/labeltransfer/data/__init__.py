"""Data preparation for label transfer.

Input checks, gene harmonisation between a reference and a query, their concatenation,
highly variable gene selection, synthetic data and a strong simulated shift of real counts.
Every function reads expression matrices in row chunks, so dense, sparse and backed AnnData
are handled without densifying them, and never modifies its input.
"""

from ._checks import check_input, check_labels
from ._concat import concat_reference_query
from ._features import select_features
from ._gene_activity import add_gene_activity, gene_activity
from ._genes import read_gene_coordinates
from ._harmonize import harmonize_genes, load_id_map
from ._strong_shift import strong_shift
from ._synthetic import synthetic
from ._synthetic_atac import synthetic_multiome

__all__ = [
    "add_gene_activity",
    "gene_activity",
    "read_gene_coordinates",
    "synthetic_multiome",
    "check_input",
    "check_labels",
    "concat_reference_query",
    "harmonize_genes",
    "load_id_map",
    "select_features",
    "strong_shift",
    "synthetic",
]
