"""The built-in data sets and models: one torch-free catalog entry each
(:mod:`trainers.catalog.data`, :mod:`trainers.catalog.models`)."""

from trainers.catalog.data import (
    DATASETS,
    DataConfig,
    DataSet,
    DatasetRef,
    check_data,
    data_config,
    data_facts,
    data_identity,
    data_knobs,
    dataset_ref,
    known_datasets,
)
from trainers.catalog.models import MODELS, Model, ModelConf, known_models

__all__ = [
    "DATASETS",
    "MODELS",
    "DataConfig",
    "DataSet",
    "DatasetRef",
    "Model",
    "ModelConf",
    "check_data",
    "data_config",
    "data_facts",
    "data_identity",
    "data_knobs",
    "dataset_ref",
    "known_datasets",
    "known_models",
]
