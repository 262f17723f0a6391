"""Datasets in the kompot_dask schema: build, validate, store and ingest from AnnData,
and the estimators' inputs for two conditions (:func:`condition_inputs`).

Importing this package does not import anndata, h5py or distributed; readers import
them when called.
"""

from __future__ import annotations

from .anndata import dataset_from_anndata
from .inputs import ConditionInputs, condition_inputs
from .schema import make_dataset, validate_dataset
from .store import open_dataset, write_dataset

__all__ = [
    "ConditionInputs",
    "condition_inputs",
    "dataset_from_anndata",
    "make_dataset",
    "open_dataset",
    "validate_dataset",
    "write_dataset",
]
