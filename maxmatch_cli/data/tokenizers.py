"""Caption tokenisation behind one seam (:class:`TextTokenizer`): SCAN's word vocabulary (:class:`Vocab`, for the
Bi-GRU) or a local BERT tokenizer (:class:`BertTokenizerAdapter`), both with VSE-infinity's caption augmentation.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Protocol, Sequence

import torch

from maxmatch_cli.errors import MaxMatchError

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize(text: str) -> list[str]:
    """Lowercase word tokens (letters and digits; punctuation dropped), as SCAN's vocabulary expects."""
    return _WORD.findall(text.lower())


def corrupt_tokens(ids: list[int], rate: float, generator: torch.Generator | None, mask_id: int,
                   random_range: tuple[int, int]) -> list[int]:
    """VSE-infinity/DivE caption augmentation: each inner token (not the first or last) is hit with probability
    ``rate``; a hit becomes ``mask_id`` (50%), a random id from ``random_range`` (10%) or is deleted (40%)."""
    if rate <= 0 or len(ids) <= 3:
        return ids
    out = [ids[0]]
    draws = torch.rand(len(ids) - 2, 2, generator=generator).tolist()
    for tok, (p, q) in zip(ids[1:-1], draws):
        if p >= rate:
            out.append(tok)
        elif q < 0.5:
            out.append(mask_id)
        elif q < 0.6:
            out.append(int(torch.randint(*random_range, (1,), generator=generator)))
    out.append(ids[-1])
    return out


class TextTokenizer(Protocol):
    """Turns captions into token ids; both the Bi-GRU vocabulary and BERT's tokenizer fit this seam."""

    pad_id: int

    def encode(self, text: str, max_len: int) -> list[int]: ...

    def drop_tokens(self, ids: list[int], rate: float, generator: torch.Generator | None) -> list[int]: ...


class Vocab:
    """Word vocabulary: ``<pad> <start> <end> <unk>`` then words with count >= min_count, most frequent first."""

    def __init__(self, words: Sequence[str]):
        if list(words[: len(SPECIALS)]) != list(SPECIALS):
            raise MaxMatchError("vocabulary does not start with the special tokens <pad> <start> <end> <unk>",
                                hint="rebuild it with Vocab.build(...) or use the checkpoint's own vocabulary")
        self.words = list(words)
        self.index = {w: i for i, w in enumerate(self.words)}
        self.pad_id, self.start_id, self.end_id, self.unk_id = (self.index[s] for s in SPECIALS)

    @classmethod
    def build(cls, captions: Sequence[str], min_count: int = 4) -> "Vocab":
        counts = Counter(tok for cap in captions for tok in tokenize(cap))
        kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(list(SPECIALS) + kept)

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, text: str, max_len: int) -> list[int]:
        ids = [self.index.get(tok, self.unk_id) for tok in tokenize(text)][: max_len - 2]
        return [self.start_id, *ids, self.end_id]

    def drop_tokens(self, ids: list[int], rate: float, generator: torch.Generator | None) -> list[int]:
        """VSE-infinity's caption augmentation: each inner token with prob. `rate` is masked (<unk>, 50%),
        replaced by a random word (10%) or deleted (40%)."""
        return corrupt_tokens(ids, rate, generator, self.unk_id, (len(SPECIALS), len(self.words)))

    def to_json(self) -> str:
        return json.dumps(self.words)

    @classmethod
    def from_json(cls, text: str) -> "Vocab":
        return cls(json.loads(text))


class BertTokenizerAdapter:
    """Wraps a transformers tokenizer loaded from a local folder (never downloaded)."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        from maxmatch_cli.models import resolve_bert_path

        folder = resolve_bert_path(path)
        try:
            self.tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise MaxMatchError(f"cannot load a tokenizer from {folder}: {exc}",
                                hint="model.bert_path must be a folder with config.json and the tokenizer files "
                                     "(vocab.txt or tokenizer.json)") from None
        self.pad_id = int(self.tok.pad_token_id or 0)
        self.mask_id = self.tok.mask_token_id
        self.path = str(path)

    def encode(self, text: str, max_len: int) -> list[int]:
        return list(self.tok(text, truncation=True, max_length=max_len)["input_ids"])

    def drop_tokens(self, ids: list[int], rate: float, generator: torch.Generator | None) -> list[int]:
        """VSE-infinity/DivE caption augmentation for BERT: each inner token with prob. `rate` becomes [MASK] (50%),
        a random token (10%) or is deleted (40%). DivE draws per word (all word pieces together); this draws per
        word piece."""
        if self.mask_id is None:
            return ids
        return corrupt_tokens(ids, rate, generator, self.mask_id, (1000, self.tok.vocab_size))


def build_tokenizer(text_encoder: str, vocab_json: str | None = None, bert_path: str = "",
                    captions: Sequence[str] | None = None, min_count: int = 4) -> TextTokenizer:
    """The tokenizer a text encoder needs: a vocabulary (restored from JSON or built from captions) or BERT's."""
    if text_encoder == "bert":
        return BertTokenizerAdapter(bert_path)
    if vocab_json:
        return Vocab.from_json(vocab_json)
    if captions is None:
        raise MaxMatchError("no vocabulary and no captions to build one from")
    return Vocab.build(captions, min_count=min_count)
