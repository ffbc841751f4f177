"""Data splitters and loaders that feed reference and query minibatches."""

from ._data_splitting import RefQueryDataSplitter, labelled_mask
from ._paired import PairedDataLoader

__all__ = ["PairedDataLoader", "RefQueryDataSplitter", "labelled_mask"]
