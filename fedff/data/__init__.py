"""Datasets fedff trains on, read from a data directory or embedded."""

from fedff.data.datasets import Dataset, load_dataset
from fedff.data.idx import DataError

__all__ = ["DataError", "Dataset", "load_dataset"]
