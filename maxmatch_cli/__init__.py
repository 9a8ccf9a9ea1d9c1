"""maxmatch: set-based image-text retrieval with Maximal Pair Assignment Similarity (ACL 2025)."""

__version__ = "0.1.0"
