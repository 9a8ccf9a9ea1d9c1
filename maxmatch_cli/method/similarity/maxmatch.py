"""MaxMatch (paper eq. 2-4): exact one-to-one matching of set elements, then the mean of ``exp(c) - 1``."""

from __future__ import annotations

import torch

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.method.assignment import SOLVERS, max_trace_assignment
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


def solver_name(name: str, value: object) -> str:
    """Option check: ``"auto"`` or a key of :data:`maxmatch_cli.method.assignment.SOLVERS`."""
    if value != "auto" and value not in SOLVERS:
        raise MaxMatchError(f"option {name}={value!r} is not an assignment solver",
                            hint=f"choose one of: auto, {', '.join(SOLVERS)}")
    return str(value)


KIND = SimilarityKind(
    "maxmatch", "MaxMatch (eq. 2-4): exact one-to-one matching, mean of exp(c)-1 over matches",
    maxmatch_score, defaults={"solver": "auto"}, checks={"solver": solver_name},
)
