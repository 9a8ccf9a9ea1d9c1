"""Gallery indexes on disk: encode a gallery once, then answer queries against it.

An index is a folder (manifest.json, sets.npy, ids.json, texts.json, and an engine's files such as
elements.faiss); a gallery too large for one machine is a folder of shard folders searched as one. The modules,
from the bottom up:

================  ===========================================================================================
format            the folder's files, the manifest schema and version, reading and checking them, the
                  checkpoint fingerprint
interface         :class:`SearchEngine`, what an engine provides; the search options all engines accept
exact             the ``exact`` engine: exhaustive exact scoring (always available)
faiss_engine      the ``faiss`` engine: element index build and read, candidates and their depth rules
                  (:func:`default_candidates`, :func:`search_depth`), exact re-ranking
milvus/           the ``milvus`` engine: the set elements in a Milvus collection (milvus-lite file or server),
                  resumable batched inserts, candidates from Milvus re-ranked exactly on vectors fetched back
engines           :data:`SEARCH_ENGINES`, the engines by name, and :func:`search_sets`
metadata          what results show besides ids: image files (paths.json) and each caption's image
                  (owners.json, which marks an image's own captions)
folder            :class:`Index`: one index folder opened, searched with an engine
shards            :class:`ShardedIndex` and :func:`fan_out`; shard names and rows
build             :func:`build_index`: streamed, resumable (``.NAME.partial``) builds published whole
query             :func:`load_index` (one index or a folder of shards), :func:`query_index`, and
                  :func:`answer_queries` (both, and how the engine searched: ``maxmatch query``)
================  ===========================================================================================

Adding a search engine takes one file and one table entry: a module with a class satisfying
:class:`~maxmatch_cli.retrieval.index.interface.SearchEngine` (its name, its rank for ``--engine auto``, the
files it writes, how it checks and builds its part, whether an index can use it, and its search), and one
instance added to :data:`~maxmatch_cli.retrieval.index.engines.SEARCH_ENGINES`. ``maxmatch index --engine`` and
``maxmatch query --engine`` take every name of the table.

Every name below is importable from this package (``from maxmatch_cli.retrieval.index import load_index``);
constants a test monkeypatches must be patched in the module that reads them (e.g.
``faiss_engine.DEFAULT_CANDIDATES``).
"""

from maxmatch_cli.retrieval.index.build import PROGRESS_FILE, build_index
from maxmatch_cli.retrieval.index.engines import ENGINES, SEARCH_ENGINES, search_sets
from maxmatch_cli.retrieval.index.faiss_engine import (CANDIDATES_PER_ITEMS, DEFAULT_CANDIDATES, DEFAULT_NPROBE,
                                                       ELEMENTS_FILE, FAISS_GPU_MAX_K, build_element_index,
                                                       default_candidates, default_nlist, faiss_candidates,
                                                       read_element_index, search_depth)
from maxmatch_cli.retrieval.index.folder import Index
from maxmatch_cli.retrieval.index.format import ENGINE, FORMAT, FORMAT_VERSION, KINDS, checkpoint_fingerprint
from maxmatch_cli.retrieval.index.interface import SearchEngine
from maxmatch_cli.retrieval.index.query import (QUERY_KINDS, Hit, QueryAnswer, answer_queries, load_index,
                                                query_index)
from maxmatch_cli.retrieval.index.shards import ShardedIndex, fan_out, parse_shard, shard_name, shard_rows

__all__ = ["CANDIDATES_PER_ITEMS", "DEFAULT_CANDIDATES", "DEFAULT_NPROBE", "ELEMENTS_FILE", "ENGINE", "ENGINES",
           "FAISS_GPU_MAX_K", "FORMAT", "FORMAT_VERSION", "Hit", "Index", "KINDS", "PROGRESS_FILE", "QUERY_KINDS",
           "QueryAnswer", "SEARCH_ENGINES", "SearchEngine", "ShardedIndex", "answer_queries", "build_element_index",
           "build_index", "checkpoint_fingerprint", "default_candidates", "default_nlist", "faiss_candidates",
           "fan_out", "load_index", "parse_shard", "query_index", "read_element_index", "search_depth", "search_sets",
           "shard_name", "shard_rows"]
