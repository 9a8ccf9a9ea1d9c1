"""Exact maximum-trace assignment for batches of small score matrices.

Given scores ``c`` of shape ``(..., R, C)``, find for every matrix the one-to-one matching of rows to columns
that maximises the summed score (eq. 2 of the paper: ``pi* = argmax_pi tr(S(V, pi(T)))``). The result is a
long tensor ``(..., R)``: row ``r`` is matched to column ``perm[..., r]``. Rectangular matrices match
``min(R, C)`` pairs; when ``R > C`` the unmatched rows hold ``-1``.

Two exact solvers, chosen per problem size (numbers in ``benchmarks/RESULTS.md``):

* ``"enumerate"`` -- every injective row-to-column map at once: the matrices, laid out as columns
  ``(R*C, N)``, are multiplied by a cached ``(P, R*C)`` one-hot table of the ``P = C!/(C-R)!`` maps, and the
  best map is read off with a max. One GEMM plus a few passes over ``(P, N)``; it stays on the input's device,
  so it also runs on a GPU without a host round trip. Used while ``P <= ENUMERATION_MAX_MAPS`` (K <= 6).
* ``"scipy"`` -- ``scipy.optimize.linear_sum_assignment`` in a loop over matrices (a compiled
  shortest-augmenting-path solver, O(K^3) per matrix, about 1 us of call overhead). Used for larger K.
* ``"lapx"`` -- ``lap.lapjvr_batch`` from the optional ``lapx`` package, a batched compiled solver; ``auto``
  prefers it over the scipy loop when it is installed.

Before a compiled solver runs, matrices whose row-wise argmax is already a permutation are settled on the spot:
such a permutation attains the upper bound ``sum_r max_c c[r, c]`` and is therefore optimal.

With ties any optimal matching may be returned; solvers can disagree on which, never on the objective value.
Non-finite scores give an arbitrary (but valid) matching.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from maxmatch_cli.errors import MaxMatchError

#: Largest number of injective maps ``C!/(C-R)!`` that ``auto`` enumerates (6! = 720, i.e. K <= 6). Above it a
#: compiled solver is faster on a 2-core CPU at B = 128 (see benchmarks/RESULTS.md, "Similarity").
ENUMERATION_MAX_MAPS = 720

#: Upper bound on the ``(P, N)`` enumeration buffer, in elements, so memory stays bounded for any batch.
_ENUMERATION_CHUNK_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------------------------- tables


@functools.lru_cache(maxsize=64)
def _map_table(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """All injective maps of ``rows`` rows into ``cols`` columns, ``(P, rows)`` long, lexicographic order."""
    maps = list(itertools.permutations(range(cols), rows))
    return torch.tensor(maps, dtype=torch.long, device=device).reshape(len(maps), rows)


def permutation_table(k: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """All ``k!`` permutations of ``range(k)`` as a cached ``(k!, k)`` long tensor (lexicographic order)."""
    return _map_table(k, k, torch.device(device))


@functools.lru_cache(maxsize=64)
def _one_hot_table(rows: int, cols: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``(P, rows*cols)`` 0/1 matrix: entry ``[p, r*cols + m_p(r)]`` is 1 for every map ``m_p``."""
    maps = _map_table(rows, cols, device)
    table = torch.zeros(maps.shape[0], rows * cols, device=device, dtype=dtype)
    flat = maps + torch.arange(rows, device=device) * cols
    table.scatter_(1, flat, 1.0)
    return table


@functools.lru_cache(maxsize=64)
def _descending_weights(p: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``(P, 1)`` column ``P, P-1, ..., 1``: the largest weight marks the first maximal map."""
    return torch.arange(p, 0, -1, device=device, dtype=dtype).unsqueeze(1)


def num_maps(rows: int, cols: int) -> int:
    """Number of injective maps of ``rows`` rows into ``cols`` columns, ``cols! / (cols - rows)!``."""
    return math.perm(cols, rows)


# --------------------------------------------------------------------------------------------- solvers


def _enumerate_columns(columns: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Best injective map per problem from column layout.

    Args:
        columns: ``(rows*cols, N)`` scores; column ``n`` is matrix ``n`` flattened row-major.

    Returns:
        ``(N, rows)`` long: the column matched to each row.
    """
    work_dtype = columns.dtype if columns.dtype in (torch.float32, torch.float64) else torch.float32
    columns = columns.to(work_dtype)
    table = _one_hot_table(rows, cols, columns.device, work_dtype)
    weights = _descending_weights(table.shape[0], columns.device, work_dtype)
    maps = _map_table(rows, cols, columns.device)
    p, n = table.shape[0], columns.shape[1]
    chunk = max(1, _ENUMERATION_CHUNK_ELEMENTS // p)
    best = torch.empty(n, dtype=torch.long, device=columns.device)
    for start in range(0, n, chunk):
        totals = table @ columns[:, start : start + chunk]  # (P, n): objective of every map
        top = totals.amax(0)
        # Without a (slow on CPU) argmax over dim 0: maximal maps become their weight, others 0;
        # the largest surviving weight names the first maximal map.
        marked = totals.sub_(top).sign_().add_(1).mul_(weights)
        best[start : start + chunk] = p - marked.amax(0).long()
    best.clamp_(0, p - 1)  # NaN scores: any valid map
    return F.embedding(best, maps)


def _solve_enumerate(c: torch.Tensor) -> torch.Tensor:
    """(..., R, C) with R <= C -> (N, R) by enumeration."""
    rows, cols = c.shape[-2:]
    # Column layout straight from any strides: for the permuted GEMM output of set_similarity this is one
    # cheap copy with long contiguous runs, and the reductions below then run over the outer dimension.
    return _enumerate_columns(c.movedim((-2, -1), (0, 1)).reshape(rows * cols, -1), rows, cols)


def _solve_scipy(c: torch.Tensor) -> torch.Tensor:
    """(N, R, C) with R <= C -> (N, R) with scipy's linear_sum_assignment, one call per matrix."""
    from scipy.optimize import linear_sum_assignment

    # Negated once here rather than per call (maximize=True copies every matrix); rows come back sorted.
    costs = np.negative(c.detach().to("cpu", torch.float64).numpy())
    out = np.stack([linear_sum_assignment(matrix)[1] for matrix in costs])
    return torch.from_numpy(out.reshape(costs.shape[:2]).astype(np.int64, copy=False)).to(c.device)


def _lapx_available() -> bool:
    return hasattr(_import_lap(), "lapjvr_batch")


@functools.lru_cache(maxsize=1)
def _import_lap():
    if importlib.util.find_spec("lap") is None:
        return None
    try:
        import lap
    except ImportError:  # pragma: no cover - a broken install
        return None
    return lap


def _solve_lapx(c: torch.Tensor) -> torch.Tensor:
    """(N, R, C) with R <= C -> (N, R) with lapx's batched Jonker-Volgenant solver."""
    lap = _import_lap()
    if lap is None or not hasattr(lap, "lapjvr_batch"):
        raise MaxMatchError(
            "assignment solver 'lapx' needs the lapx package (lap.lapjvr_batch)",
            hint="pip install 'lapx>=0.9', or use solver='scipy'",
        )
    n, rows, cols = c.shape
    costs = np.ascontiguousarray(-c.detach().to("cpu", torch.float64).numpy())
    _, col_lists = lap.lapjvr_batch(costs, extend_cost=rows != cols, return_cost=False)
    return torch.from_numpy(np.stack(col_lists).reshape(n, rows)).to(c.device)


def _greedy_certified(c: torch.Tensor, solve: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Run ``solve`` only on matrices whose row-wise argmax is not already a one-to-one matching."""
    rows, cols = c.shape[-2:]
    c = c.reshape(-1, rows, cols)
    n = c.shape[0]
    greedy = c.argmax(-1)
    hits = torch.zeros(n, cols, dtype=torch.int64, device=c.device).scatter_add_(
        1, greedy, torch.ones_like(greedy)
    )
    unsettled = (hits > 1).any(-1).nonzero().squeeze(1)
    if unsettled.numel():
        greedy[unsettled] = solve(c[unsettled])
    return greedy


@dataclass(frozen=True)
class Solver:
    """An exact solver: ``(..., R, C)`` scores with ``R <= C`` -> ``(N, R)`` columns, batch flattened."""

    name: str
    description: str
    solve: Callable[[torch.Tensor], torch.Tensor]


SOLVERS: dict[str, Solver] = {
    s.name: s
    for s in (
        Solver("enumerate", "all injective maps at once as one GEMM + max (fast for K <= 6, any device)",
               _solve_enumerate),
        Solver("scipy", "scipy.optimize.linear_sum_assignment looped over matrices (CPU)",
               lambda c: _greedy_certified(c, _solve_scipy)),
        Solver("lapx", "lap.lapjvr_batch from the optional lapx package (CPU, batched)",
               lambda c: _greedy_certified(c, _solve_lapx)),
    )
}


def resolve_solver(rows: int, cols: int, solver: str = "auto") -> Solver:
    """The solver ``max_trace_assignment`` uses for ``rows x cols`` matrices (``rows <= cols``)."""
    if solver == "auto":
        if num_maps(rows, cols) <= ENUMERATION_MAX_MAPS:
            return SOLVERS["enumerate"]
        return SOLVERS["lapx"] if _lapx_available() else SOLVERS["scipy"]
    if solver not in SOLVERS:
        raise MaxMatchError(
            f"unknown assignment solver {solver!r}",
            hint=f"choose one of: auto, {', '.join(SOLVERS)}",
        )
    return SOLVERS[solver]


# --------------------------------------------------------------------------------------------- public API


def max_trace_assignment(c: torch.Tensor, solver: str = "auto") -> torch.Tensor:
    """Exact one-to-one matching maximising the summed score, for a batch of matrices.

    Args:
        c: ``(..., R, C)`` real scores (detached inside; gradients never flow through the choice).
        solver: ``"auto"`` (enumeration while ``C!/(C-R)! <= 720``, else lapx if installed, else scipy),
            or a name from :data:`SOLVERS`.

    Returns:
        ``(..., R)`` long on ``c``'s device: ``perm[..., r]`` is the column matched to row ``r``; ``-1`` marks
        the ``R - C`` unmatched rows when ``R > C``.

    Example:
        >>> c = torch.tensor([[0.9, 0.8], [0.85, 0.1]])
        >>> max_trace_assignment(c).tolist()  # greedy would take 0.9 and then be left with 0.1
        [1, 0]
    """
    if c.dim() < 2:
        raise MaxMatchError(
            f"assignment needs a (..., R, C) score tensor, got shape {tuple(c.shape)}",
            hint="pass one matrix (R, C) or a batch of them (..., R, C)",
        )
    if not (c.is_floating_point() or c.dtype in (torch.int32, torch.int64, torch.int16, torch.int8)):
        raise MaxMatchError(f"assignment needs real scores, got dtype {c.dtype}", hint="pass a float tensor")
    c = c.detach()
    if not c.is_floating_point():
        c = c.to(torch.float64)
    *batch, rows, cols = c.shape
    if rows > cols:
        return _invert_partial(max_trace_assignment(c.transpose(-1, -2), solver), rows)
    if rows == 0 or math.prod(batch) == 0:
        return torch.empty(*batch, rows, dtype=torch.long, device=c.device)
    chosen = resolve_solver(rows, cols, solver)
    perm = chosen.solve(c)
    return perm.reshape(*batch, rows)


def _invert_partial(col_to_row: torch.Tensor, rows: int) -> torch.Tensor:
    """From (..., C) column->row (C < R) to (..., R) row->column with -1 for unmatched rows."""
    *batch, cols = col_to_row.shape
    out = torch.full((*batch, rows), -1, dtype=torch.long, device=col_to_row.device)
    src = torch.arange(cols, device=col_to_row.device).expand_as(col_to_row)
    return out.scatter_(-1, col_to_row, src)


def assignment_objective(c: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Summed score of a matching: ``sum_r c[..., r, perm[..., r]]`` over matched rows (``perm >= 0``)."""
    matched = perm >= 0
    values = c.gather(-1, perm.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(matched, values, torch.zeros_like(values)).sum(-1)
