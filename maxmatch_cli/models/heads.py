"""Set prediction heads: local features (B, N, D) + global (B, D) -> a set of K embeddings (B, K, D).

- ``setdiv``: SetDiv's embedding set prediction module (Kim et al. 2023; MaxMatch §3.2). K learnable slot
  queries cross-attend to the local features through L pre-norm aggregation blocks; the attention is
  normalised over the *slots* (slots compete for each key) and then renormalised over the keys.
- ``pvse``: PVSE's polysemous instance embedding (Song & Soleymani 2019): K self-attention maps over the
  local features, each attended sum through fc + sigmoid, added to the global feature and layer-normalised.
- ``pooled``: a single vector (K = 1), the encoder's global feature L2-normalised, as VSE++ (Faghri et al.
  2018) embeds an image (a linear projection of the pooled CNN feature) and a caption (the GRU's final state).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as nnf

from maxmatch_cli.models.common import SetOutput


def slot_competition_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, eps: float = 1e-7
                               ) -> tuple[Tensor, Tensor]:
    """SetDiv's cross-attention where slots compete for keys, with padded keys excluded.

    Scaled logits are soft-maxed over the slot axis (each key distributes one unit of attention among the
    slots), padded keys are zeroed, then each slot's weights are renormalised over the keys. Because the
    first softmax runs per key, a padded key cannot change any valid key's weights, so the result does not
    depend on how much padding the batch adds (SetDiv itself lets padded keys take part).

    Args:
        q: (B, H, K, d) slot queries.
        k: (B, H, N, d) keys.
        v: (B, H, N, d) values.
        mask: (B, N) bool, True for real keys.
        eps: added to each slot's total before renormalising (a slot no key chose stays ~0).

    Returns:
        out (B, H, K, d) attended values and attn (B, H, K, N) the weights (rows sum to ~1 over keys).
    """
    logits = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    # Half-precision logits (AMP) are normalised in float32; float32/64 stay as they are.
    attn = torch.softmax(logits, dim=-2, dtype=torch.promote_types(logits.dtype, torch.float32))
    attn = attn * mask[:, None, None, :].to(attn.dtype)
    attn = attn / (attn.sum(dim=-1, keepdim=True) + eps)
    attn = attn.to(v.dtype)
    return torch.matmul(attn, v), attn


class AggregationBlock(nn.Module):
    """One pre-norm aggregation block: x = CrossAttn(LN(x), LN(ctx)) + x; x = FF(LN(x)) + x.

    Args:
        dim: slot width D.
        heads: attention heads.
        head_dim: width of each head (heads x head_dim is the attention width D_h).
        ff_dim: hidden width of the feed-forward network (D -> ff_dim -> D, GELU).
        dropout: dropout after the attention output projection and inside the feed-forward network.
        context_dim: width of the local features attended to (D; the word-vector width for a Bi-GRU's words).
    """

    def __init__(self, dim: int, heads: int, head_dim: int, ff_dim: int, dropout: float,
                 context_dim: int | None = None):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        context_dim = context_dim or dim
        self.norm_slots = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(context_dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim)
        self.attn_dropout = nn.Dropout(dropout)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ff_dim, dim))

    def _split(self, t: Tensor) -> Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.head_dim).transpose(1, 2)

    def keys_values(self, context: Tensor, key_pos: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Projects the context (B, N, C) to keys and values, each (B, H, N, head_dim).

        ``key_pos`` (B, N, C) is added to the normalised context for the keys only (DivE: k = W_k (LN(ctx) + pos),
        v = W_v LN(ctx)); the key projection has no bias, so that is W_k LN(ctx) + W_k pos.
        """
        k, v = self.to_kv(self.norm_context(context)).chunk(2, dim=-1)
        if key_pos is not None:
            inner = self.heads * self.head_dim
            k = k + nn.functional.linear(key_pos.to(k.dtype), self.to_kv.weight[:inner])
        return self._split(k), self._split(v)

    def forward(self, x: Tensor, kv: tuple[Tensor, Tensor], mask: Tensor) -> Tensor:
        """x: (B, K, D) slots; kv from :meth:`keys_values`; mask (B, N) -> (B, K, D)."""
        q = self._split(self.to_q(self.norm_slots(x)))
        out, _ = slot_competition_attention(q, kv[0], kv[1], mask)
        out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        x = self.attn_dropout(self.to_out(out)) + x
        return self.ff(self.norm_ff(x)) + x


class SetDivHead(nn.Module):
    """SetDiv's embedding set prediction module; sets = LN(E^L) + K copies of LN(global).

    Args:
        dim: D, width of the local features, the global feature and the set elements.
        num_embeds: K, slots per set.
        depth: L, aggregation blocks applied in sequence.
        heads: attention heads per block.
        head_dim: width of each head.
        ff_dim: feed-forward hidden width.
        dropout: dropout inside the blocks.
        share_weights: apply one block's weights L times (SetDiv's default) instead of L separate blocks.
        context_dim: width of the local features (default D; the word-vector width when a Bi-GRU's words are
            attended to, DivE ``txt_attention_input wemb``).
    """

    def __init__(self, dim: int, num_embeds: int, depth: int, heads: int, head_dim: int, ff_dim: int,
                 dropout: float = 0.1, share_weights: bool = True, context_dim: int | None = None):
        super().__init__()
        self.depth = depth
        self.share_weights = share_weights
        self.queries = nn.Parameter(torch.randn(num_embeds, dim))
        n_blocks = 1 if share_weights else depth
        self.blocks = nn.ModuleList(AggregationBlock(dim, heads, head_dim, ff_dim, dropout, context_dim)
                                    for _ in range(n_blocks))
        self.norm_out = nn.LayerNorm(dim)
        self.norm_global = nn.LayerNorm(dim)

    def forward(self, local: Tensor, global_: Tensor, mask: Tensor, key_pos: Tensor | None = None) -> SetOutput:
        """local (B, N, C), global_ (B, D), mask (B, N) bool, key_pos (B, N, C) or None
        -> SetOutput with sets/slots (B, K, D)."""
        local = local.masked_fill(~mask.unsqueeze(-1), 0.0)
        x = self.queries.unsqueeze(0).expand(local.shape[0], -1, -1).to(global_.dtype)
        kv = None
        for i in range(self.depth):
            block = self.blocks[0 if self.share_weights else i]
            # Shared weights see the same context every step, so its keys/values are computed once.
            if kv is None or not self.share_weights:
                kv = block.keys_values(local, key_pos)
            x = block(x, kv, mask)
        slots = self.norm_out(x)
        sets = slots + self.norm_global(global_).unsqueeze(1)
        return SetOutput(sets=sets, global_=global_, slots=slots)


class PVSEHead(nn.Module):
    """PVSE's multi-head self-attention head; sets = LN(global + sigmoid(fc(attended locals))).

    Args:
        dim: D, width of the local features, the global feature and the set elements.
        num_embeds: K, attention maps (= set elements).
        hidden_dim: width of the attention MLP (PVSE: D / 2).
        dropout: dropout on the per-element residuals.
        context_dim: width of the local features (default D).
    """

    def __init__(self, dim: int, num_embeds: int, hidden_dim: int, dropout: float = 0.1,
                 context_dim: int | None = None):
        super().__init__()
        context_dim = context_dim or dim
        self.w1 = nn.Linear(context_dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, num_embeds, bias=False)
        self.fc = nn.Linear(context_dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)
        for lin in (self.w1, self.w2, self.fc):
            nn.init.xavier_uniform_(lin.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, local: Tensor, global_: Tensor, mask: Tensor, key_pos: Tensor | None = None) -> SetOutput:
        """local (B, N, C), global_ (B, D), mask (B, N) bool -> SetOutput with sets/slots (B, K, D).

        ``key_pos`` is accepted for the common seam and unused (PVSE has no positional encoding)."""
        local = local.masked_fill(~mask.unsqueeze(-1), 0.0)
        logits = self.w2(torch.tanh(self.w1(local)))  # (B, N, K)
        logits = logits.masked_fill(~mask.unsqueeze(-1), torch.finfo(logits.dtype).min)
        attn = torch.softmax(logits, dim=1, dtype=torch.promote_types(logits.dtype, torch.float32)).to(local.dtype)
        attended = torch.matmul(attn.transpose(1, 2), local)  # (B, K, D)
        residual = self.dropout(torch.sigmoid(self.fc(attended)))
        sets = self.norm(global_.unsqueeze(1) + residual)
        return SetOutput(sets=sets, global_=global_, slots=residual)


class PooledHead(nn.Module):
    """VSE++'s single embedding: the encoder's global feature as a set of one, L2-normalised.

    The encoder already computes what VSE++ embeds: for images the projection of the locals pooled over the
    valid positions (with ``model.image_mlp = false`` and ``model.image_pool = "mean"`` that is one linear map of
    the mean-pooled features, VSE++'s fc on the average-pooled CNN feature), for captions the text encoder's
    global output (the Bi-GRU's final states, BERT's pooled states). The head adds no weights, so the model has
    exactly VSE++'s parameters. With K = 1 every set similarity is a function of the one cosine; MIL is exactly it.
    """

    def forward(self, local: Tensor, global_: Tensor, mask: Tensor, key_pos: Tensor | None = None) -> SetOutput:
        """local (B, N, C) and mask (B, N) unused; global_ (B, D) -> SetOutput with sets/slots (B, 1, D) unit rows."""
        embedding = nnf.normalize(global_, dim=-1).unsqueeze(1)
        return SetOutput(sets=embedding, global_=global_, slots=embedding)
