"""Connecting to Milvus: URIs (a milvus-lite file or a server), the cached client, collection names, index types,
and the collection properties a build records."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any

from maxmatch_cli.errors import MaxMatchError

FLAT_MAX_ELEMENTS = 100_000
"""Up to this many elements the default index is exact (``FLAT``); above it ``IVF_FLAT``."""
LITE_INDEX_TYPES = ("FLAT", "IVF_FLAT", "IVF_SQ8", "HNSW", "HNSW_SQ", "AUTOINDEX")
"""Index types milvus-lite 3.2 builds (all but FLAT need faiss-cpu); a Milvus server takes others too."""
DEFAULT_TIMEOUT = 10.0
"""Seconds a Milvus request may take before the server counts as not answering."""
TOKEN_ENV = "MAXMATCH_MILVUS_TOKEN"
"""Environment variable read for the token when none is passed (keeps it out of shell history)."""
URI_HINT = "pass --uri FILE.db (milvus-lite: a local folder, no server) or --uri http://HOST:19530 (a Milvus server)"
PROP = "maxmatch."


def _pymilvus():
    try:
        import pymilvus
    except ImportError:
        raise MaxMatchError("the milvus engine needs the pymilvus package (and milvus-lite for a .db file), which "
                            "is not installed", hint="pip install -e '.[milvus]', or use --engine exact") from None
    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)  # its RPC errors become our MaxMatchError
    return pymilvus


def is_local(uri: str) -> bool:
    """Whether ``uri`` names a milvus-lite file (no scheme) rather than a server."""
    return "://" not in uri and not uri.startswith("unix:")


def normalize_uri(uri: str) -> str:
    """A server URI as given; a milvus-lite file as an absolute path ending in ``.db`` whose folder exists.

    Raises:
        MaxMatchError: a scheme Milvus does not take, a file not ending in ``.db``, a missing parent folder.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise MaxMatchError(f"Milvus URI {uri!r} is empty", hint=URI_HINT)
    if not is_local(uri):
        scheme = uri.split(":", 1)[0].lower()
        if scheme not in ("http", "https", "tcp", "unix"):
            raise MaxMatchError(f"Milvus URI {uri} has the scheme '{scheme}', which Milvus does not take",
                                hint=URI_HINT)
        return uri
    path = Path(uri).expanduser().resolve()
    if path.suffix != ".db":
        raise MaxMatchError(f"Milvus URI {uri} is neither a server (http://...) nor a milvus-lite file (*.db)",
                            hint=URI_HINT)
    if not path.parent.is_dir():
        raise MaxMatchError(f"the folder of milvus-lite file {uri} does not exist ({path.parent})",
                            hint="create it, or choose another --uri")
    return str(path)


_CLIENTS: dict[tuple[str, str, str], Any] = {}


def connect(uri: str, token: str | None = None, db: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> Any:
    """A :class:`pymilvus.MilvusClient` on ``uri`` (cached per URI, token and database; a milvus-lite file is
    served in this process).

    Raises:
        MaxMatchError: a URI Milvus refuses, a server that does not answer within ``timeout``, a bad token or db.
    """
    pymilvus = _pymilvus()
    uri = normalize_uri(uri)
    token = token if token is not None else os.environ.get(TOKEN_ENV, "")
    key = (uri, token or "", db or "")
    if key in _CLIENTS:
        return _CLIENTS[key]
    where = f"milvus-lite file {uri}" if is_local(uri) else f"Milvus server {uri}"
    try:
        client = pymilvus.MilvusClient(uri=uri, token=token or "", db_name=db or "", timeout=timeout)
        client.list_collections(timeout=timeout)
    except pymilvus.exceptions.ConnectionConfigException as exc:
        raise MaxMatchError(f"cannot open {where}: {exc.message}", hint=URI_HINT) from None
    except pymilvus.exceptions.MilvusException as exc:
        if db and re.search(r"database\b.*\bnot (found|exist)", str(exc.message), re.IGNORECASE):
            raise MaxMatchError(f"{where} has no database '{db}' ({exc.message})",
                                hint=f"create it (pymilvus: MilvusClient(uri='{uri}').create_database('{db}')), or "
                                     "leave out --db for the database 'default'") from None
        raise MaxMatchError(f"{where} does not answer ({exc.message})",
                            hint="start it (README, 'Galleries in Milvus'), check the host and port, and --token / --db "
                                 f"(or ${TOKEN_ENV})") from None
    _CLIENTS[key] = client
    return client


def check_collection_name(name: str) -> str:
    """Refuse a name Milvus would refuse (letters, digits and underscores, not starting with a digit)."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,254}", name):
        raise MaxMatchError(f"'{name}' is not a Milvus collection name",
                            hint="use letters, digits and underscores, starting with a letter (--collection)")
    return name


def collection_for(out: Path) -> str:
    """The default collection of an index folder: ``maxmatch_``, the folder's name (other characters as ``_``) and 8
    hex digits of its absolute path, so folders of one name in different places get their own collections."""
    where = hashlib.sha256(str(Path(out).resolve()).encode()).hexdigest()[:8]
    return f"maxmatch_{re.sub(r'[^A-Za-z0-9_]', '_', Path(out).name)[:200]}_{where}"


def check_index_type(index_type: str | None, uri: str) -> None:
    """Refuse an index type milvus-lite does not build (a server decides for itself)."""
    if index_type is None:
        return
    if not isinstance(index_type, str) or not re.fullmatch(r"[A-Z0-9_]+", index_type):
        raise MaxMatchError(f"'{index_type}' is not a Milvus index type",
                            hint=f"use one of {', '.join(LITE_INDEX_TYPES)} (upper case)")
    if is_local(uri) and index_type not in LITE_INDEX_TYPES:
        raise MaxMatchError(f"milvus-lite does not build index type {index_type}",
                            hint=f"use one of {', '.join(LITE_INDEX_TYPES)}, or a Milvus server")


def default_index_type(n_elements: int) -> str:
    """``FLAT`` (exact) up to :data:`FLAT_MAX_ELEMENTS` elements, ``IVF_FLAT`` above."""
    return "FLAT" if n_elements <= FLAT_MAX_ELEMENTS else "IVF_FLAT"


def _props(client: Any, name: str) -> dict[str, str]:
    props = client.describe_collection(name).get("properties") or {}
    return {key[len(PROP):]: str(value) for key, value in props.items() if key.startswith(PROP)}


def _count(client: Any, name: str) -> int:
    return int(client.query(name, filter="", output_fields=["count(*)"])[0]["count(*)"])
