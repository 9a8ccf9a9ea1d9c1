"""maxmatch: set-based image-text retrieval with Maximal Pair Assignment Similarity (ACL 2025)."""

__version__ = "0.1.0"

__all__ = ["Index", "Model", "Ranking", "ShardedIndex", "__version__", "load", "load_index"]

_API = {"load": "maxmatch_cli.api", "Model": "maxmatch_cli.api", "Ranking": "maxmatch_cli.api",
        "load_index": "maxmatch_cli.index", "Index": "maxmatch_cli.index", "ShardedIndex": "maxmatch_cli.index"}


def __getattr__(name: str):
    # Imported on first use: `import maxmatch_cli` (and every CLI command) stays free of torch until asked.
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'maxmatch_cli' has no attribute {name!r}")
