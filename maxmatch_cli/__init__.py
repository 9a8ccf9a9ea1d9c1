"""maxmatch: set-based image-text retrieval with Maximal Pair Assignment Similarity (ACL 2025)."""

__version__ = "0.1.0"

__all__ = ["Index", "Model", "Ranking", "ShardedIndex", "__version__", "circular_variance", "load", "load_index",
           "retrieval_metrics", "set_similarity"]

# Public names, wherever their module lives (DESIGN.md section 5).
_API = {"load": "maxmatch_cli.retrieval.api", "Model": "maxmatch_cli.retrieval.api",
        "Ranking": "maxmatch_cli.retrieval.api", "load_index": "maxmatch_cli.retrieval.index",
        "Index": "maxmatch_cli.retrieval.index", "ShardedIndex": "maxmatch_cli.retrieval.index",
        "set_similarity": "maxmatch_cli.method.similarity",
        "retrieval_metrics": "maxmatch_cli.evaluation.metrics",
        "circular_variance": "maxmatch_cli.evaluation.collapse"}


def __getattr__(name: str):
    # Imported on first use: `import maxmatch_cli` (and every CLI command) stays free of torch until asked.
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'maxmatch_cli' has no attribute {name!r}")
