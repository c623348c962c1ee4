"""The public face of the data: hands on the names of :mod:`samlora.data.dataset`, where the code lives.

The package never imports a root module, so the code cannot live here; ``import dataset``
keeps working for users and scripts.
"""
from samlora.data.dataset import (  # noqa: F401
    DATA_OPTIONS,
    DIHEDRAL,
    DataOptions,
    add_data_arguments,
    augment,
    grouping_of,
    load_dataset,
    load_from_options,
    log_mask_kinds,
    log_summary,
    make_patches,
    summarize_dataset,
)

__all__ = [
    'load_dataset',
    'make_patches',
    'DIHEDRAL',
    'augment',
    'log_mask_kinds',
    'summarize_dataset',
    'log_summary',
    'DataOptions',
    'DATA_OPTIONS',
    'add_data_arguments',
    'grouping_of',
    'load_from_options',
]
