"""The ``milvus`` engine: the set elements in a Milvus collection, candidates from Milvus, exact re-ranking here.

Optional (``pip install -e '.[milvus]'``: pymilvus and milvus-lite). ``--uri FILE.db`` builds into milvus-lite,
an embedded Milvus in this process that keeps its data in the folder FILE.db; ``--uri http://HOST:19530`` (with
``--token`` and ``--db`` where the server needs them) builds into a Milvus server or cluster with the same code.

The collection holds one row per set element (Milvus has no multi-vector field): the primary key
``set_id * K + position``, the set id (the index row), the element position, the L2-normalised element as a
float vector (metric COSINE), and on each set's element 0 its item id and caption (``""`` for images). Its
properties record the build's identity, the checkpoint fingerprint, K, D and whether the build completed. The
local index folder keeps the manifest (URI, database, collection, K, D, metric, fingerprint), ids.json and
texts.json; the vectors live only in Milvus (no sets.npy).

A search asks Milvus, per query element, for its nearest gallery elements (the depth of the faiss engine's rule,
:func:`~maxmatch_cli.retrieval.index.faiss_engine.default_candidates`, or ``candidates``), groups them by set,
fetches those sets' element vectors back from Milvus and scores them exactly
(:func:`~maxmatch_cli.retrieval.index.faiss_engine._rerank`). Scores are exact; recall is approximate (an exact
``FLAT`` index at full depth returns the exact engine's results).

A build inserts the encoded sets in batches and records, after each flush, how many sets are durably in the
collection (``milvus.json`` in the partial folder); a re-run after a crash deletes the rows past that point
(rows inserted but not recorded) and continues, so no row is inserted twice. The collection is marked complete
and the local manifest written only at the end; a search refuses a collection that is not complete, not of the
manifest's build, or not of the expected size.

================  ===========================================================================================
connection        URIs (milvus-lite file or server), the cached client, collection names, index types, the
                  collection properties maxmatch writes
building          :func:`build_collection`: the schema, resumable batched inserts, the vector index
search            :class:`MilvusCollection` (an opened, checked collection), :class:`MilvusSets`,
                  :func:`open_collection`, candidates from Milvus and their depth
engine            :class:`MilvusEngine`, the entry of :data:`~maxmatch_cli.retrieval.index.engines.SEARCH_ENGINES`
================  ===========================================================================================

Names a test monkeypatches must be patched in the module that reads them (e.g. ``building.connect``).
"""
