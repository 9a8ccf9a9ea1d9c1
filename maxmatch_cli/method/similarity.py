"""Set-to-set similarities between image and text embedding sets.

Every similarity is a pure function of the cosine matrices ``c`` of shape ``(..., K, K')`` (entry ``[k, l]`` is
the cosine between element ``k`` of the image set and element ``l`` of the text set) and returns one score per
matrix. :func:`set_similarity` computes all ``Bi x Bt`` pairs of two batches of sets blockwise, with one GEMM per
block; :func:`paired_similarity` scores row-aligned pairs. Kinds are looked up by name in :data:`SIMILARITIES`:

=========  ==============================================================================================
maxmatch   eq. 2-4: exact one-to-one assignment maximising the trace, score ``mean_k(exp(c[k, pi*(k)]) - 1)``
chamfer    eq. 1: smooth-Chamfer with temperature ``alpha`` (SetDiv: 16)
mil        max over the ``K x K'`` entries (PVSE)
topk       inference variant: mean of ``exp(x) - 1`` over the ``k`` largest entries, no matching
sinkhorn   extension: entropic-OT soft assignment; tends to ``maxmatch`` as ``tau -> 0``
=========  ==============================================================================================

Sets of different sizes (``K != K'``) are allowed: ``maxmatch`` then matches ``min(K, K')`` pairs (a rectangular
assignment) and averages over them; ``sinkhorn`` uses uniform marginals ``1/K`` and ``1/K'``.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
import torch.nn.functional as F

from maxmatch_cli.method.assignment import SOLVERS, max_trace_assignment
from maxmatch_cli.errors import MaxMatchError

Tensor = torch.Tensor

#: One block of pairs holds at most this many cosine entries (64 MiB in float32); the default ``block_size``
#: follows from it: 1024 sets a side at K = 4, 512 at K = 8, 256 at K = 16.
BLOCK_ENTRIES = 1 << 24


# ----------------------------------------------------------------------------------------- score functions


def maxmatch_score(c: Tensor, solver: str = "auto") -> Tensor:
    """MaxMatch (eq. 2-4): exact maximum-trace matching, then the mean of ``exp(c) - 1`` over matched entries.

    The matching is found on detached values (:func:`maxmatch_cli.method.assignment.max_trace_assignment`); the
    gradient flows through the ``min(K, K')`` matched entries only.

    Args:
        c: ``(..., K, K')`` cosine matrices.
        solver: assignment solver, ``"auto"`` or a name from :data:`maxmatch_cli.method.assignment.SOLVERS`.

    Returns:
        ``(...)`` scores in ``[exp(-1) - 1, e - 1]``.
    """
    if c.shape[-2] > c.shape[-1]:
        c = c.transpose(-1, -2)  # the score is symmetric; match the smaller side completely
    perm = max_trace_assignment(c, solver=solver)
    return _matched_expm1_mean(c, perm)


def _matched_expm1_mean(c: Tensor, perm: Tensor) -> Tensor:
    if not (torch.is_grad_enabled() and c.requires_grad):
        return torch.expm1(c.gather(-1, perm.unsqueeze(-1)).squeeze(-1)).mean(-1)
    return _MatchedExpm1MeanFn.apply(c, perm)


class _MatchedExpm1MeanFn(torch.autograd.Function):
    """``mean_k expm1(c[..., k, perm[..., k]])`` with the gradient on the matched entries only.

    A custom function rather than gather + expm1 + mean: the backward scatters straight into a zero tensor with
    ``c``'s own strides, so the (usually permuted) GEMM output needs no extra copy and autograd runs one node
    instead of four.
    """

    @staticmethod
    def forward(ctx, c: Tensor, perm: Tensor) -> Tensor:
        index = perm.unsqueeze(-1)
        scaled = torch.expm1(c.gather(-1, index).squeeze(-1))
        ctx.save_for_backward(c, index, scaled)
        return scaled.mean(-1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        c, index, scaled = ctx.saved_tensors
        local = (scaled + 1.0) * (grad / scaled.shape[-1]).unsqueeze(-1)  # d expm1(x)/dx = exp(x)
        grad_c = torch.zeros_like(c, memory_format=torch.preserve_format)  # c's strides when dense
        return grad_c.scatter_(-1, index, local.unsqueeze(-1).to(grad_c.dtype)), None


def chamfer_score(c: Tensor, alpha: float = 16.0) -> Tensor:
    """Smooth-Chamfer similarity (eq. 1, SetDiv) with a stable log-sum-exp.

    ``S = 1/(2 alpha K) sum_k log sum_l e^(alpha c_kl) + 1/(2 alpha K') sum_l log sum_k e^(alpha c_kl)``.

    Args:
        c: ``(..., K, K')`` cosine matrices.
        alpha: inverse temperature (> 0); large values approach the mean of row and column maxima.

    Returns:
        ``(...)`` scores.
    """
    x = _entries_first(c) * alpha
    # Stable log-sum-exp with the max detached: the gradient of log sum exp(x - m) + m is the softmax for any m.
    row_max = x.detach().amax(1, keepdim=True)
    col_max = x.detach().amax(0, keepdim=True)
    rows = (x - row_max).exp().sum(1).log().add(row_max.squeeze(1)).mean(0)
    cols = (x - col_max).exp().sum(0).log().add(col_max.squeeze(0)).mean(0)
    return ((rows + cols) / (2.0 * alpha)).reshape(c.shape[:-2])


def mil_score(c: Tensor) -> Tensor:
    """MIL similarity (PVSE): the largest of the ``K x K'`` cosines. ``c: (..., K, K')`` -> ``(...)``."""
    return _entries_first(c).amax(dim=(0, 1)).reshape(c.shape[:-2])


def topk_score(c: Tensor, k: int | None = None) -> Tensor:
    """Inference variant (paper §3.4): mean of ``exp(x) - 1`` over the ``k`` largest of the ``K x K'`` entries.

    Unlike MaxMatch, no one-to-one constraint: one element may take part in several of the ``k`` entries.

    Args:
        c: ``(..., K, K')`` cosine matrices.
        k: how many entries, ``1 <= k <= K*K'``; default ``min(K, K')`` (as many as MaxMatch matches).

    Returns:
        ``(...)`` scores.
    """
    n_entries = c.shape[-2] * c.shape[-1]
    k = min(c.shape[-2], c.shape[-1]) if k is None else k
    if not 1 <= k <= n_entries:
        raise MaxMatchError(
            f"topk similarity: k={k} is outside 1..{n_entries} (K x K' entries of each pair)",
            hint=f"pass k between 1 and {n_entries}, or leave it unset for k = min(K, K')",
        )
    top = c.flatten(-2).topk(k, dim=-1, sorted=False).values
    return torch.expm1(top).mean(-1)


def sinkhorn_score(c: Tensor, tau: float = 0.05, iters: int = 10) -> Tensor:
    """Differentiable soft assignment by entropic optimal transport (an extension beyond the paper).

    ``P = argmax_P <P, c> + tau H(P)`` over plans with uniform marginals (rows ``1/K``, columns ``1/K'``),
    approximated by ``iters`` log-domain Sinkhorn iterations (the last one fits the columns exactly). The score is
    ``sum_kl P_kl (exp(c_kl) - 1)``, i.e. ``(1/K) sum_kl Q_kl (exp(c_kl) - 1)`` with ``Q = K P`` doubly
    stochastic for ``K = K'``. For a permutation plan this is exactly the MaxMatch score, and as ``tau -> 0``
    (with enough iterations) ``P`` tends to the optimal matching, so the score tends to MaxMatch. Unlike MaxMatch,
    every entry receives gradient, through the unrolled iterations.

    Args:
        c: ``(..., K, K')`` cosine matrices.
        tau: entropy temperature (> 0); smaller is sharper and needs more iterations.
        iters: Sinkhorn iterations (>= 1).

    Returns:
        ``(...)`` scores.
    """
    rows, cols = c.shape[-2], c.shape[-1]
    x = _entries_first(c)
    logits = x / tau
    log_a, log_b = -math.log(rows), -math.log(cols)
    g = torch.zeros(1, cols, x.shape[-1], dtype=c.dtype, device=c.device)
    for _ in range(iters):
        f = log_a - torch.logsumexp(logits + g, dim=1, keepdim=True)
        g = log_b - torch.logsumexp(logits + f, dim=0, keepdim=True)
    plan = torch.exp(logits + f + g)
    return (plan * torch.expm1(x)).sum(dim=(0, 1)).reshape(c.shape[:-2])


def _entries_first(c: Tensor) -> Tensor:
    """``(..., K, K') -> (K, K', N)`` contiguous: reductions over set elements then run over outer dimensions,
    vectorised across the ``N`` pairs, which on CPU is several times faster than reducing a 4-wide inner axis."""
    return c.movedim((-2, -1), (0, 1)).reshape(c.shape[-2], c.shape[-1], -1)


# ----------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class SimilarityKind:
    """A named similarity: a score function of cosine matrices and the options it accepts."""

    name: str
    description: str
    score: Callable[..., Tensor]
    defaults: Mapping[str, object] = field(default_factory=dict)


def _positive_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise MaxMatchError(f"option {name}={value!r} must be a positive number", hint=f"e.g. {name}=16")
    return float(value)


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MaxMatchError(f"option {name}={value!r} must be a positive integer", hint=f"e.g. {name}=8")
    return value


def _optional_positive_int(name: str, value: object) -> int | None:
    return None if value is None else _positive_int(name, value)


def _solver_name(name: str, value: object) -> str:
    if value != "auto" and value not in SOLVERS:
        raise MaxMatchError(f"option {name}={value!r} is not an assignment solver",
                            hint=f"choose one of: auto, {', '.join(SOLVERS)}")
    return str(value)


_OPTION_CHECKS: dict[str, Callable[[str, object], object]] = {
    "alpha": _positive_float,
    "tau": _positive_float,
    "iters": _positive_int,
    "k": _optional_positive_int,
    "solver": _solver_name,
    "block_size": _optional_positive_int,
}

SIMILARITIES: Mapping[str, SimilarityKind] = MappingProxyType({
    kind.name: kind
    for kind in (
        SimilarityKind("maxmatch", "MaxMatch (eq. 2-4): exact one-to-one matching, mean of exp(c)-1 over matches",
                       maxmatch_score, {"solver": "auto"}),
        SimilarityKind("chamfer", "smooth-Chamfer (eq. 1, SetDiv): log-sum-exp with temperature alpha",
                       chamfer_score, {"alpha": 16.0}),
        SimilarityKind("mil", "MIL (PVSE): the largest element-to-element cosine", mil_score),
        SimilarityKind("topk", "top-k inference variant: mean of exp(c)-1 over the k largest cosines, no matching",
                       topk_score, {"k": None}),
        SimilarityKind("sinkhorn", "entropic-OT soft matching (extension; tends to maxmatch as tau -> 0)",
                       sinkhorn_score, {"tau": 0.05, "iters": 10}),
    )
})


def list_similarities() -> list[tuple[str, str]]:
    """``(name, one-line description)`` of every registered similarity, in registry order."""
    return [(kind.name, kind.description) for kind in SIMILARITIES.values()]


def _resolve(kind: str, options: Mapping[str, object]) -> tuple[SimilarityKind, dict[str, object], int | None]:
    """Look up ``kind`` and validate ``options``; returns the kind, its score options and the block size."""
    if kind not in SIMILARITIES:
        close = difflib.get_close_matches(str(kind), SIMILARITIES, n=1)
        raise MaxMatchError(
            f"unknown similarity {kind!r}" + (f" (did you mean {close[0]!r}?)" if close else ""),
            hint=f"choose one of: {', '.join(SIMILARITIES)}",
        )
    spec = SIMILARITIES[kind]
    allowed = [*spec.defaults, "block_size"]
    resolved = dict(spec.defaults)
    block_size = None
    for name, value in options.items():
        if name not in allowed:
            close = difflib.get_close_matches(name, allowed, n=1)
            raise MaxMatchError(
                f"unknown option {name!r} for similarity {kind!r}" + (f" (did you mean {close[0]!r}?)" if close else ""),
                hint=f"{kind} accepts: {', '.join(allowed)}",
            )
        value = _OPTION_CHECKS[name](name, value)
        if name == "block_size":
            block_size = value
        else:
            resolved[name] = value
    return spec, resolved, block_size


# ----------------------------------------------------------------------------------------- batched entry points


def _normalised_sets(img: Tensor, txt: Tensor, *, paired: bool) -> tuple[Tensor, Tensor]:
    for name, x in (("img", img), ("txt", txt)):
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise MaxMatchError(f"{name} must be a (B, K, D) tensor of embedding sets, got {shape}",
                                hint="one set of K embeddings of size D per image / caption")
        if not x.is_floating_point():
            raise MaxMatchError(f"{name} must be floating point, got {x.dtype}", hint="call .float() first")
        if 0 in x.shape[1:]:
            raise MaxMatchError(f"{name} has an empty set or embedding dimension: {tuple(x.shape)}",
                                hint="K and D must be at least 1")
    if img.shape[-1] != txt.shape[-1]:
        raise MaxMatchError(f"embedding sizes differ: img D={img.shape[-1]}, txt D={txt.shape[-1]}",
                            hint="both modalities must be projected to the same D")
    if paired and img.shape[0] != txt.shape[0]:
        raise MaxMatchError(f"paired_similarity needs as many images as texts, got {img.shape[0]} and {txt.shape[0]}",
                            hint="use set_similarity for all pairs of two batches")
    if img.device != txt.device:
        raise MaxMatchError(f"img is on {img.device} but txt on {txt.device}", hint="move both to one device")
    # Elements are compared by cosine, so any input scale is allowed.
    return F.normalize(img, dim=-1), F.normalize(txt, dim=-1)


def _default_block(k_img: int, k_txt: int) -> int:
    return max(1, math.isqrt(BLOCK_ENTRIES // (k_img * k_txt)))


def _cosine_block(img: Tensor, txt: Tensor) -> Tensor:
    """``(bi, K, D) x (bt, K', D) -> (bi, bt, K, K')``: one GEMM, returned as a permuted view (no copy)."""
    (bi, k_img, dim), (bt, k_txt, _) = img.shape, txt.shape
    flat = img.reshape(bi * k_img, dim) @ txt.reshape(bt * k_txt, dim).T
    return flat.view(bi, k_img, bt, k_txt).permute(0, 2, 1, 3)


def _blockwise(img: Tensor, txt: Tensor, block: int, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """Apply ``fn`` to the cosine matrices of every (image block, text block) and stitch the results."""
    # split() rather than slicing: one backward node per input that concatenates the block gradients, instead
    # of one full-size zero tensor per slice (with a single block it is a no-op view either way).
    txt_blocks = txt.split(block) if txt.shape[0] > block else (txt,)
    rows = []
    for img_block in img.split(block) if img.shape[0] > block else (img,):
        cols = [fn(_cosine_block(img_block, txt_block)) for txt_block in txt_blocks]
        rows.append(cols[0] if len(cols) == 1 else torch.cat(cols, dim=1))
    return rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)


def set_similarity(img: Tensor, txt: Tensor, kind: str = "maxmatch", **options: object) -> Tensor:
    """Similarity of every image set to every text set.

    Args:
        img: ``(Bi, K, D)`` image embedding sets, any scale (elements are L2-normalised inside).
        txt: ``(Bt, K', D)`` text embedding sets, any scale.
        kind: a name from :data:`SIMILARITIES` (``maxmatch``, ``chamfer``, ``mil``, ``topk``, ``sinkhorn``).
        **options: the kind's options (``alpha`` for chamfer, ``k`` for topk, ``tau``/``iters`` for sinkhorn,
            ``solver`` for maxmatch) and, for every kind, ``block_size``: sets per block on each side (default:
            a block holds at most ``BLOCK_ENTRIES`` cosines). Blocking bounds memory and leaves results
            unchanged.

    Returns:
        ``(Bi, Bt)`` scores, differentiable with respect to ``img`` and ``txt``.

    Raises:
        MaxMatchError: unknown kind or option, invalid option value, or malformed inputs.

    Example:
        >>> img, txt = torch.randn(3, 4, 8), torch.randn(5, 4, 8)
        >>> set_similarity(img, txt, "chamfer", alpha=16).shape
        torch.Size([3, 5])
    """
    spec, opts, block = _resolve(kind, options)
    img, txt = _normalised_sets(img, txt, paired=False)
    block = block or _default_block(img.shape[1], txt.shape[1])
    return _blockwise(img, txt, block, lambda c: spec.score(c, **opts))


def paired_similarity(img: Tensor, txt: Tensor, kind: str = "maxmatch", **options: object) -> Tensor:
    """Similarity of row-aligned pairs: ``out[b] = set_similarity(img[b:b+1], txt[b:b+1])``.

    Args:
        img: ``(B, K, D)`` image sets; txt: ``(B, K', D)`` text sets (any scale).
        kind, **options: as for :func:`set_similarity` (``block_size`` = pairs per chunk here).

    Returns:
        ``(B,)`` scores, equal (up to float rounding) to the diagonal of ``set_similarity(img, txt, kind)``.
    """
    spec, opts, block = _resolve(kind, options)
    img, txt = _normalised_sets(img, txt, paired=True)
    block = block or _default_block(1, 1)
    out = [spec.score(a @ b.transpose(1, 2), **opts) for a, b in zip(img.split(block), txt.split(block))]
    return out[0] if len(out) == 1 else torch.cat(out)


def cosine_matrices(img: Tensor, txt: Tensor) -> Tensor:
    """All element-to-element cosines, ``(Bi, K, D) x (Bt, K', D) -> (Bi, Bt, K, K')`` (for analysis; memory
    grows as ``Bi*Bt*K*K'``)."""
    img, txt = _normalised_sets(img, txt, paired=False)
    return _cosine_block(img, txt).contiguous()


@torch.no_grad()
def maxmatch_assignment(img: Tensor, txt: Tensor, solver: str = "auto", block_size: int | None = None) -> Tensor:
    """The MaxMatch matching of every image set to every text set (for analysis tools).

    Args:
        img: ``(Bi, K, D)``; txt: ``(Bt, K', D)`` (any scale).
        solver: assignment solver (see :func:`maxmatch_cli.method.assignment.max_trace_assignment`).
        block_size: sets per block on each side.

    Returns:
        ``(Bi, Bt, K)`` long: ``out[i, j, k]`` is the text element matched to image element ``k`` of pair
        ``(i, j)``; ``-1`` when ``K > K'`` leaves element ``k`` unmatched.
    """
    _solver_name("solver", solver)
    block = _optional_positive_int("block_size", block_size)
    img, txt = _normalised_sets(img, txt, paired=False)
    block = block or _default_block(img.shape[1], txt.shape[1])
    return _blockwise(img, txt, block, lambda c: max_trace_assignment(c, solver=solver))
