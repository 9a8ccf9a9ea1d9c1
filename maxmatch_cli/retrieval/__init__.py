"""Retrieval: the Python API over a checkpoint, index format, build, search engines and shards."""
