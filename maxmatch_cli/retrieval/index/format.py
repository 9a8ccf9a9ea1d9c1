"""The index folder on disk: its files, the manifest schema, and reading and checking them.

An index is a folder:

==============  ===========================================================================================
manifest.json   ``format``, ``format_version``, the checkpoint (path and fingerprint), ``kind`` (images or
                captions), ``K``, ``D``, the similarity and its options, ``n_items``, the feature file and
                split it was built from, the engine, the maxmatch version and the date; ``sets_check``: the
                size and modification time of sets.npy when the build found all of it finite (a sets.npy
                without a matching record is scanned for NaN/inf at load,
                :func:`~maxmatch_cli.retrieval.index.folder.check_finite_sets`)
sets.npy        ``(N, K, D)`` float16 sets with L2-normalised elements (similarities compare cosines, so
                normalising first loses nothing and keeps float16 in range); memory-mapped on load
ids.json        the N item ids: image ids of the feature file, or caption indices
texts.json      captions only: the N caption strings
paths.json      optional, images only: the N image files, when the feature file lists them
owners.json     optional, captions only: the image id of each caption (both listed in the manifest's
                ``metadata_files``, :mod:`~maxmatch_cli.retrieval.index.metadata`)
elements.faiss  optional (``--engine faiss``): a faiss IVF index over all N x K set elements; memory-mapped on
                load (:mod:`~maxmatch_cli.retrieval.index.faiss_engine`)
==============  ===========================================================================================

An index built with ``--engine milvus`` has no sets.npy: its vectors (and a copy of the ids and captions) are in a
Milvus collection that the manifest's ``element_index`` record names (``kind`` "milvus", ``uri``, ``db``,
``collection``, ``build``, ``index_type``; :mod:`~maxmatch_cli.retrieval.index.milvus`).

The manifest is written last (:mod:`~maxmatch_cli.retrieval.index.build`): a folder with one is whole. Its
``format_version`` is :data:`FORMAT_VERSION`; an index of another version is refused, one of this version loads
whatever maxmatch release wrote it.

The checkpoint fingerprint is the SHA-256 of the checkpoint's safetensors header (tensor layout plus metadata:
recipe, vocabulary, provenance with its creation time), cheap to read and unchanged by copying or touching the
file; a query that would encode its text with another checkpoint is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.fileio import file_inside

FORMAT = "maxmatch-index"
FORMAT_VERSION = 1
"""Version of the folder layout; an index of another version is refused (rebuild it)."""
KINDS = ("images", "captions")
ENGINE = "exhaustive-exact"
"""The manifest's ``engine``: exact scoring is always available; ``element_index`` records an optional faiss part."""
MANIFEST_FILE = "manifest.json"
SETS_FILE = "sets.npy"
IDS_FILE = "ids.json"
TEXTS_FILE = "texts.json"
BUILD_HINT = "build one with `maxmatch index CKPT --data F.h5 --split test --out INDEX`"


def checkpoint_fingerprint(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a safetensors file's header: its 8-byte length and the JSON it announces.

    Raises:
        MaxMatchError: the file is missing or too short to be a safetensors file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            header = fh.read(size) if 0 <= size <= 100 * 2**20 else b""
    except OSError as exc:
        raise MaxMatchError(f"cannot read checkpoint {path}: {exc.strerror or exc}",
                            hint="check the path (or pass --checkpoint)") from None
    if size < 0 or len(header) != size or not header:
        raise MaxMatchError(f"{path} is not a safetensors checkpoint (no valid header)",
                            hint="pass a checkpoint written by `maxmatch train`")
    return hashlib.sha256(head + header).hexdigest()


def read_json(path: Path, what: str, index: Path) -> Any:
    """The JSON file ``path`` of index folder ``index``, described as ``what`` in errors.

    Raises:
        MaxMatchError: the file is missing or unreadable (a damaged index).
    """
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MaxMatchError(f"index {index} has no {path.name}",
                            hint=f"it is damaged; rebuild it ({BUILD_HINT})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MaxMatchError(f"cannot read the {what} {path} ({exc})",
                            hint=f"the index is damaged; rebuild it ({BUILD_HINT})") from None


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` as one line of UTF-8 JSON (captions keep their characters)."""
    path.write_text(json.dumps(value, ensure_ascii=False) + "\n", encoding="utf-8")


def json_value(value: Any) -> Any:
    """Item ids as plain JSON values (numpy ints and bytes included)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value.item() if hasattr(value, "item") else value


def index_file(path: Path, name: str, named_by: str = "") -> Path:
    """File ``name`` of index folder ``path``, refused unless it lies inside the folder (links resolved too): a
    manifest or a link in a copied index must not lead the reader to other files.

    Raises:
        MaxMatchError: ``name`` is absolute, has a ``..`` part, or resolves outside ``path``.
    """
    return file_inside(path, name, named_by=f"the {named_by or 'file ' + name} of index {path}",
                       hint=f"an index reads only files inside its folder; rebuild it ({BUILD_HINT})")


def read_manifest(path: Path) -> tuple[dict[str, Any], tuple[int, int, int]]:
    """The checked manifest of index folder ``path`` and the ``(N, K, D)`` it announces.

    Raises:
        MaxMatchError: no manifest, another format or version, or a field missing or garbled.
    """
    index_file(path, MANIFEST_FILE)
    if not (path / MANIFEST_FILE).is_file():
        run_files = [name for name in ("best.safetensors", "last.safetensors", "metrics.jsonl")
                     if (path / name).is_file()]
        if run_files:  # the run folder is the one a newcomer has at hand
            raise MaxMatchError(f"{path} is a training run folder (it holds {', '.join(run_files)}), not an index",
                                hint=f"index it first: `maxmatch index {path} --split test --out INDEX`, then "
                                     f"`maxmatch query INDEX --text ...`")
        if not (path / SETS_FILE).is_file():
            raise MaxMatchError(f"{path} is not a maxmatch index (no {MANIFEST_FILE})", hint=BUILD_HINT)
        raise MaxMatchError(f"{path} is not a complete maxmatch index (no {MANIFEST_FILE})",
                            hint=f"its build may have been interrupted; {BUILD_HINT}")
    manifest = read_json(path / MANIFEST_FILE, "index manifest", path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise MaxMatchError(f"{path}/{MANIFEST_FILE} is not a maxmatch index manifest", hint=BUILD_HINT)
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise MaxMatchError(f"index {path} has format version {version}; this maxmatch reads version {FORMAT_VERSION}",
                            hint=f"rebuild it with this maxmatch ({BUILD_HINT})")
    try:
        n, k, d = int(manifest["n_items"]), int(manifest["K"]), int(manifest["D"])
        manifest["checkpoint"]["path"], manifest["checkpoint"]["fingerprint"]
        if manifest["kind"] not in KINDS:
            raise ValueError(f"kind {manifest['kind']!r}")
        from maxmatch_cli.method.similarity import list_similarities

        if manifest["similarity"] not in {name for name, _ in list_similarities()}:
            raise ValueError(f"similarity {manifest['similarity']!r}")
        if not isinstance(manifest.get("similarity_options", {}), dict):
            raise ValueError(f"similarity_options {manifest['similarity_options']!r}")
        element = manifest.get("element_index")
        if is_milvus(manifest):
            if not all(isinstance(element.get(name), str) for name in ("uri", "collection", "build", "index_type")):
                raise ValueError(f"element_index {element!r}")
        elif element is not None and not (isinstance(element, dict) and isinstance(element.get("file"), str)
                                          and isinstance(element.get("nlist"), int)
                                          and isinstance(element.get("n_elements"), int)):
            raise ValueError(f"element_index {element!r}")
    except (KeyError, TypeError, ValueError) as exc:
        raise MaxMatchError(f"the manifest of index {path} lacks or garbles a field ({exc})",
                            hint=f"rebuild the index ({BUILD_HINT})") from None
    if element is not None and not is_milvus(manifest):
        index_file(path, element["file"], "element_index.file of the manifest")
    return manifest, (n, k, d)


def is_milvus(manifest: dict[str, Any]) -> bool:
    """Whether the manifest's index keeps its vectors in a Milvus collection (``--engine milvus``: no sets.npy)."""
    element = manifest.get("element_index")
    return isinstance(element, dict) and element.get("kind") == "milvus"


def read_folder(path: Path) -> tuple[dict[str, Any], np.ndarray | None, list[Any], list[str] | None]:
    """``(manifest, sets, ids, texts)`` of index folder ``path``: the sets memory-mapped read-only (None for an
    index whose vectors are in Milvus), texts None for an images index.

    Raises:
        MaxMatchError: a file missing, unreadable, or disagreeing with the manifest.
    """
    manifest, (n, k, d) = read_manifest(path)
    if is_milvus(manifest):
        return (manifest, None, *_read_ids_texts(path, manifest, n))
    try:
        sets = np.load(index_file(path, SETS_FILE), mmap_mode="r")
    except (OSError, ValueError, EOFError) as exc:  # EOFError: an empty or cut file
        raise MaxMatchError(f"cannot read the sets of index {path} ({exc or type(exc).__name__})",
                            hint=f"the index is damaged; rebuild it ({BUILD_HINT})") from None
    if sets.shape != (n, k, d) or sets.dtype != np.float16:
        raise MaxMatchError(f"index {path}: {SETS_FILE} holds {sets.dtype} {sets.shape}, the manifest announces "
                            f"float16 {(n, k, d)}", hint=f"the index is damaged; rebuild it ({BUILD_HINT})")
    return (manifest, sets, *_read_ids_texts(path, manifest, n))


def _read_ids_texts(path: Path, manifest: dict[str, Any], n: int) -> tuple[list[Any], list[str] | None]:
    ids = read_json(index_file(path, IDS_FILE), "index ids", path)
    texts = read_json(index_file(path, TEXTS_FILE), "index captions", path) if manifest["kind"] == "captions" \
        else None
    for name, values in ((IDS_FILE, ids), (TEXTS_FILE, texts)):
        if values is not None and (not isinstance(values, list) or len(values) != n):
            raise MaxMatchError(f"index {path}: {name} does not hold {n} entries",
                                hint=f"the index is damaged; rebuild it ({BUILD_HINT})")
    return ids, texts
