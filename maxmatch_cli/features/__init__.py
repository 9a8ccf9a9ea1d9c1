"""Feature files: the HDF5 store every source becomes, its importers and the synthetic demo data.

The store (schema v1) is documented in :mod:`maxmatch_cli.features.store.schema`.
"""

from maxmatch_cli.features.store import (
    SCHEMA_VERSION,
    FeatureStore,
    StoreWriter,
    args_fingerprint,
    describe_store,
    open_store,
    partial_path,
    store_state,
)
from maxmatch_cli.features.synthetic import (
    PRESETS,
    SyntheticConfig,
    generate_synthetic,
    make_plan,
    read_synthetic_truth,
    synthetic_config,
)

__all__ = [
    "PRESETS",
    "SCHEMA_VERSION",
    "FeatureStore",
    "StoreWriter",
    "SyntheticConfig",
    "args_fingerprint",
    "describe_store",
    "generate_synthetic",
    "make_plan",
    "open_store",
    "partial_path",
    "read_synthetic_truth",
    "store_state",
    "synthetic_config",
]
