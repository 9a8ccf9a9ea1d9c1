"""MaxMatch (paper eq. 2-4): exact one-to-one matching of set elements, then the mean of ``exp(c) - 1``."""

from __future__ import annotations

import torch

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.method.assignment import ENUMERATION_MAX_MAPS, SOLVERS, max_trace_assignment, num_maps
from maxmatch_cli.method.similarity.base import SimilarityKind

Tensor = torch.Tensor


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


def maxmatch_slabs(g: Tensor, solver: str = "auto") -> Tensor | None:
    """No-grad kernel (:mod:`~maxmatch_cli.method.similarity.slabs`): ``(bi, K, K', bt) -> (bi, bt)``.

    Where the autograd path enumerates every injective map of the smaller side (``solver`` ``auto`` or
    ``enumerate`` and at most ``ENUMERATION_MAX_MAPS`` maps), this walks the same maps in the same lexicographic
    order as a depth-first tree of slab additions (a map's total shares its prefix's partial sum), keeps the
    first maximal total with a strict ``>`` (the enumeration's tie rule) and carries the matched cosines along,
    then takes ``mean(exp(c) - 1)`` of them. ``None`` (the solver path) otherwise.
    """
    k_img, k_txt = g.shape[1:3]
    rows, cols = min(k_img, k_txt), max(k_img, k_txt)
    if solver not in ("auto", "enumerate") or num_maps(rows, cols) > ENUMERATION_MAX_MAPS:
        return None
    if k_img <= k_txt:
        slabs = [[g[:, r, c] for c in range(cols)] for r in range(rows)]
    else:  # the score is symmetric; match the smaller (text) side completely, as maxmatch_score does
        slabs = [[g[:, c, r] for c in range(cols)] for r in range(rows)]
    matched = _best_matching(slabs)
    total = torch.exp(matched[0]).sub_(1.0)
    for value in matched[1:]:
        total.add_(torch.exp(value).sub_(1.0))
    return total.div_(rows)


def _best_matching(slabs: list[list[Tensor]]) -> list[Tensor]:
    """The cosines ``slabs[r][m(r)]`` of the first (lexicographic) map ``m`` of rows into distinct columns with
    the largest total, elementwise over the slabs; ``slabs[r][c]`` is a ``(bi, bt)`` tensor."""
    rows, cols = len(slabs), len(slabs[0])
    partial = [torch.empty_like(slabs[0][0]) for _ in range(rows)]
    gain = torch.empty_like(partial[0])
    best: list[Tensor] = []  # [best total, matched cosine of row 0, ..., of row rows-1]
    prefix: list[int] = []

    def visit(r: int) -> None:
        for c in range(cols):
            if c in prefix:
                continue
            total = slabs[0][c] if r == 0 else torch.add(partial[r - 1], slabs[r][c], out=partial[r])
            prefix.append(c)
            if r + 1 < rows:
                partial[r] = total  # row 0's "sum" is its slab itself (a view, never written)
                visit(r + 1)
            elif not best:
                best.extend(x.clone() for x in (total, *(slabs[i][m] for i, m in enumerate(prefix))))
            else:
                torch.gt(total, best[0], out=gain)  # 1 where this map is strictly better: ties keep the first
                torch.maximum(best[0], total, out=best[0])
                for i, m in enumerate(prefix):
                    best[i + 1].lerp_(slabs[i][m], gain)
            prefix.pop()

    visit(0)
    return best[1:]


def solver_name(name: str, value: object) -> str:
    """Option check: ``"auto"`` or a key of :data:`maxmatch_cli.method.assignment.SOLVERS`."""
    if value != "auto" and value not in SOLVERS:
        raise MaxMatchError(f"option {name}={value!r} is not an assignment solver",
                            hint=f"choose one of: auto, {', '.join(SOLVERS)}")
    return str(value)


KIND = SimilarityKind(
    "maxmatch", "MaxMatch (eq. 2-4): exact one-to-one matching, mean of exp(c)-1 over matches",
    maxmatch_score, defaults={"solver": "auto"}, checks={"solver": solver_name}, slab_score=maxmatch_slabs,
)
