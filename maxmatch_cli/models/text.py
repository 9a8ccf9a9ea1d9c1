"""Text encoders: a Bi-GRU over word embeddings, or a BERT-family transformer from a local folder.

Both take token ids (B, L) and a mask (B, L) that is True for real tokens (right padding) and return
:class:`~maxmatch_cli.models.common.Features` with D-wide local features and a global feature.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.models.common import Features, masked_max, sine_positions
from maxmatch_cli.models.glove import WordVectors
from maxmatch_cli.models.paths import BERT_HINT, resolve_bert_path

log = logging.getLogger(__name__)


class BiGRUEncoder(nn.Module):
    """Word embeddings -> bidirectional GRU (hidden D, directions averaged).

    The global feature is the mean of the last layer's final hidden states of both directions (B, D). The local
    features the set head attends to are the word embeddings (B, L, word_dim) with a sine positional encoding for
    the keys (paper §3.1: "300-dimensional word vectors as local features"; DivE ``txt_attention_input wemb``,
    ``spm_txt_pos_enc_type sine``), or with ``local="gru"`` the per-token GRU outputs, directions averaged
    (B, L, D), without one. Dropout (DivE: 0.1) hits the word embeddings before the GRU and its outputs.
    Sequences are packed, so padding never enters the recurrence.

    Args:
        vocab_size: rows of the embedding table.
        word_dim: embedding width (must equal the word vectors' width when they are given).
        dim: D, the GRU hidden size.
        num_layers: stacked GRU layers.
        word_vectors: optional pre-trained rows copied into the table where found (others stay random).
        local: 'words' or 'gru', see above.
        dropout: dropout rate on the embeddings and on the GRU outputs.
        pos_encoding: 'sine' or 'none', the keys' positional encoding when local='words'.
    """

    def __init__(self, vocab_size: int, word_dim: int, dim: int, num_layers: int = 1,
                 word_vectors: WordVectors | None = None, local: str = "words", dropout: float = 0.0,
                 pos_encoding: str = "sine"):
        super().__init__()
        if word_vectors is not None and word_vectors.dim != word_dim:
            raise MaxMatchError(f"word vectors {word_vectors.source} are {word_vectors.dim}-dimensional but "
                                f"model.word_dim is {word_dim}",
                                hint=f"set model.word_dim={word_vectors.dim} (the recipe must describe the "
                                     f"architecture so a checkpoint can be rebuilt without the vectors)")
        self.embed = nn.Embedding(vocab_size, word_dim)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        self.coverage: float | None = None
        if word_vectors is not None:
            found = torch.from_numpy(word_vectors.found)
            with torch.no_grad():
                self.embed.weight[found] = torch.from_numpy(word_vectors.vectors[word_vectors.found])
        self.gru = nn.GRU(word_dim, dim, num_layers=num_layers, batch_first=True, bidirectional=True)
        self.dim = dim
        self.local = local
        self.pos_encoding = pos_encoding
        self.dropout = nn.Dropout(dropout)

    @property
    def local_dim(self) -> int:
        """Width of the local features handed to the set head."""
        return self.embed.embedding_dim if self.local == "words" else self.dim

    def forward(self, tokens: Tensor, mask: Tensor) -> Features:
        """tokens (B, L) long, mask (B, L) bool (True = real token, right-padded) -> Features."""
        mask = mask.to(torch.bool)
        lengths = mask.sum(dim=1)
        if bool((lengths == 0).any()):
            raise ValueError("every caption needs at least one real token (mask row all False)")
        emb = self.dropout(self.embed(tokens))
        packed = pack_padded_sequence(emb, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, h_n = self.gru(packed)
        global_ = self.dropout((h_n[-2] + h_n[-1]) / 2)  # last layer, forward and backward
        if self.local == "words":
            pos = sine_positions(mask, emb.shape[-1]) if self.pos_encoding == "sine" else None
            return Features(emb.masked_fill(~mask.unsqueeze(-1), 0.0), global_, mask, pos)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=tokens.shape[1])
        local = self.dropout((out[..., : self.dim] + out[..., self.dim:]) / 2)
        return Features(local, global_, mask)


class BertEncoder(nn.Module):
    """A transformers encoder (BERT family) -> Linear(hidden, D) per token; masked max-pool as the global.

    Args:
        backbone: a loaded transformers model whose output has ``last_hidden_state`` (B, L, hidden).
        hidden_size: its hidden width.
        dim: D.
    """

    backbone_lr_group = "text"
    """The backbone trains at lr x optim.lr_scale_text."""

    def __init__(self, backbone: nn.Module, hidden_size: int, dim: int):
        super().__init__()
        self.backbone = backbone
        self.proj = nn.Linear(hidden_size, dim)

    def forward(self, tokens: Tensor, mask: Tensor) -> Features:
        """tokens (B, L) long, mask (B, L) bool (True = real token) -> Features."""
        mask = mask.to(torch.bool)
        hidden = self.backbone(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
        local = self.proj(hidden).masked_fill(~mask.unsqueeze(-1), 0.0)
        return Features(local, masked_max(local, mask), mask)


def load_bert_backbone(spec: str, weights: bool = True) -> tuple[nn.Module, int]:
    """Loads a BERT-family model from a local folder (or ``pkg:`` spec) with no network access.

    The pooler, if any, is dropped: it is unused and would leave parameters without gradients (DDP).

    Args:
        spec: folder, file inside it, or ``pkg:`` spec (see :func:`resolve_bert_path`).
        weights: load the pre-trained weights; False builds the architecture from config.json alone.

    Returns:
        The model (float32) and its hidden size.
    """
    folder = resolve_bert_path(spec)
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    try:
        hf_logging.disable_progress_bar()
        if weights:
            model = AutoModel.from_pretrained(str(folder), local_files_only=True)
        else:
            model = AutoModel.from_config(AutoConfig.from_pretrained(str(folder), local_files_only=True))
    except (OSError, ValueError) as exc:
        raise MaxMatchError(f"cannot load a transformers model from {folder}: {exc}", hint=BERT_HINT) from None
    finally:
        hf_logging.enable_progress_bar()
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    hidden = getattr(model.config, "hidden_size", None) or getattr(model.config, "dim", None)
    if hidden is None:
        raise MaxMatchError(f"{folder}/config.json has no hidden_size", hint="use a BERT-family checkpoint")
    return model.float(), int(hidden)


def build_bigru(vocab_words: Sequence[str] | None, word_dim: int, dim: int, num_layers: int,
                glove_path: str, local: str = "words", dropout: float = 0.0, pos_encoding: str = "sine"
                ) -> BiGRUEncoder:
    """A Bi-GRU for ``vocab_words``, with GloVe rows copied in when ``glove_path`` is given."""
    if not vocab_words:
        raise MaxMatchError("the Bi-GRU text encoder needs the vocabulary (vocab_words) to size its embeddings",
                            hint="build it from the training captions (data.Vocab) or restore it from the checkpoint")
    vectors = None
    if glove_path:
        from maxmatch_cli.models.glove import load_word_vectors

        vectors = load_word_vectors(glove_path, vocab_words)
    enc = BiGRUEncoder(len(vocab_words), word_dim, dim, num_layers, vectors, local, dropout, pos_encoding)
    if vectors is not None:
        enc.coverage = vectors.coverage(vocab_words)
        log.info("word vectors from %s: %.1f%% of %d vocabulary words found (dim %d)", vectors.source,
                 100 * enc.coverage, len(vocab_words), vectors.dim)
    return enc
