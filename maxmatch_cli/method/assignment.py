"""Exact maximum-trace assignment for batches of small score matrices.

Given scores ``c`` of shape ``(..., R, C)``, find for every matrix the one-to-one matching of rows to columns
that maximises the summed score (eq. 2 of the paper: ``pi* = argmax_pi tr(S(V, pi(T)))``). The result is a
long tensor ``(..., R)``: row ``r`` is matched to column ``perm[..., r]``. Rectangular matrices match
``min(R, C)`` pairs; when ``R > C`` the unmatched rows hold ``-1``.

Exact solvers, chosen per problem size by ``solver="auto"`` (numbers in ``benchmarks/RESULTS.md``):

* ``"enumerate"`` -- every injective row-to-column map at once: the matrices, laid out as columns
  ``(R*C, N)``, are multiplied by a cached ``(P, R*C)`` one-hot table of the ``P = C!/(C-R)!`` maps, and the
  best map is read off with a max. One GEMM plus a few passes over ``(P, N)``; it stays on the input's device,
  so it also runs on a GPU without a host round trip. Used while ``P <= ENUMERATION_MAX_MAPS`` (K <= 4).
* ``"split"`` -- meet-in-the-middle enumeration for square K x K: the first ``h = K // 2`` rows take some
  column set S and the rest its complement, each half in its best order; scoring all (S, order) pairs of both
  halves needs ``C(K, h) * (h! + (K-h)!)`` rows instead of ``K!`` (80 vs 120 at K = 5, 240 vs 720 at K = 6).
  Same device story as enumeration. Used up to K = ``SPLIT_MAX_K`` (rectangular inputs are padded).
* ``"scipy"`` -- ``scipy.optimize.linear_sum_assignment`` in a loop over matrices (a compiled
  shortest-augmenting-path solver, O(K^3) per matrix, about 1 us of call overhead). Used for larger K.
* ``"lapx"`` -- ``lap.lapjvr_batch`` from the optional ``lapx`` package, a batched compiled solver; ``auto``
  prefers it over the scipy loop when it is installed.
* ``"torch"`` -- the Hungarian algorithm run on the whole batch in tensor operations (float64, a fixed number of
  masked steps, no host sync); ``auto`` picks it for K > 7 on CUDA tensors, where the CPU solvers would copy
  every matrix to the host.

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

#: Largest number of injective maps ``C!/(C-R)!`` that ``auto`` enumerates in full (square: K <= 4; at K = 5
#: the split enumeration below is already faster).
ENUMERATION_MAX_MAPS = 60

#: Largest K (columns) that ``auto`` solves by meet-in-the-middle enumeration; above it a compiled solver wins.
#: Both switch-overs were measured on a 2-core CPU at B = 128 (benchmarks/RESULTS.md, "Similarity").
SPLIT_MAX_K = 7

#: Upper bound on the ``(P, N)`` enumeration buffer, in elements, so memory stays bounded for any batch.
_ENUMERATION_CHUNK_ELEMENTS = 1 << 20


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


def _first_max(totals: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Index of the first maximum along dim 0 of ``(P, n)`` (overwrites ``totals``); NaN columns give 0.

    Avoids ``argmax(0)``, which is several times slower on CPU than these passes: maximal entries become their
    weight ``P - p``, others 0, and the largest surviving weight names the first maximal row.
    """
    p = totals.shape[0]
    top = totals.amax(0)
    marked = totals.sub_(top).sign_().add_(1).mul_(weights[-p:])
    return (p - marked.amax(0).long()).clamp_(0, p - 1)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _columns(c: torch.Tensor) -> torch.Tensor:
    """``(..., R, C) -> (R*C, N)``: column ``n`` is matrix ``n`` flattened row-major.

    For the permuted GEMM output of set_similarity this is one cheap copy with long contiguous runs, and the
    reductions then run over the outer dimension, vectorised across matrices.
    """
    rows, cols = c.shape[-2:]
    return c.movedim((-2, -1), (0, 1)).reshape(rows * cols, -1).to(_work_dtype(c.dtype))


def _solve_enumerate(c: torch.Tensor) -> torch.Tensor:
    """(..., R, C) with R <= C -> (N, R): score all ``C!/(C-R)!`` injective maps with one GEMM, keep the best."""
    rows, cols = c.shape[-2:]
    columns = _columns(c)
    table = _one_hot_table(rows, cols, columns.device, columns.dtype)
    weights = _descending_weights(table.shape[0], columns.device, columns.dtype)
    n = columns.shape[1]
    chunk = max(1, _ENUMERATION_CHUNK_ELEMENTS // table.shape[0])
    best = torch.empty(n, dtype=torch.long, device=columns.device)
    for start in range(0, n, chunk):
        best[start : start + chunk] = _first_max(table @ columns[:, start : start + chunk], weights)
    return F.embedding(best, _map_table(rows, cols, columns.device))


@dataclass(frozen=True)
class _SplitTables:
    """Meet-in-the-middle tables for square K x K: the first ``h`` rows go to a column set S, the rest to its
    complement. ``first``/``second``: one-hot ``(n_sets * orders, rows_part * K)`` over the entries of each
    half; ``first_cols``/``second_cols``: the matched column of every row for every (set, order)."""

    h: int
    n_sets: int
    first: torch.Tensor
    first_cols: torch.Tensor
    second: torch.Tensor
    second_cols: torch.Tensor


@functools.lru_cache(maxsize=16)
def _split_tables(k: int, device: torch.device, dtype: torch.dtype) -> _SplitTables:
    h = k // 2
    sets = list(itertools.combinations(range(k), h))
    parts = []
    for targets in (sets, [tuple(c for c in range(k) if c not in s) for s in sets]):
        size = len(targets[0])
        cols = [[t[i] for i in order] for t in targets for order in itertools.permutations(range(size))]
        cols = torch.tensor(cols, dtype=torch.long, device=device).reshape(len(cols), size)
        table = torch.zeros(cols.shape[0], size * k, dtype=dtype, device=device)
        table.scatter_(1, cols + torch.arange(size, device=device) * k, 1.0)
        parts += [table, cols]
    return _SplitTables(h, len(sets), *parts)


def _solve_split(c: torch.Tensor) -> torch.Tensor:
    """(..., K, K) -> (N, K) by meet-in-the-middle enumeration.

    The best permutation sends the first ``h = K // 2`` rows onto some column set S and the others onto its
    complement, each half in its best order. So: score every (S, order) of each half with one GEMM, keep the best
    order per S, add the halves, pick S. That is ``C(K, h) * (h! + (K-h)!)`` rows instead of ``K!`` (240 vs 720
    at K = 6), with the same exact answer.
    """
    rows, k = c.shape[-2:]
    if rows < k:  # constant padding rows change no matching's relative score
        return _solve_split(F.pad(c, (0, 0, 0, k - rows)))[:, :rows]
    columns = _columns(c)
    t = _split_tables(k, columns.device, columns.dtype)
    orders_a, orders_b = t.first.shape[0] // t.n_sets, t.second.shape[0] // t.n_sets
    weights = _descending_weights(max(t.n_sets, orders_a, orders_b), columns.device, columns.dtype)
    n = columns.shape[1]
    chunk = max(1, _ENUMERATION_CHUNK_ELEMENTS // (t.first.shape[0] + t.second.shape[0]))
    out = torch.empty(n, k, dtype=torch.long, device=columns.device)
    for start in range(0, n, chunk):
        block = columns[:, start : start + chunk]
        m = block.shape[1]
        first = (t.first @ block[: t.h * k]).view(t.n_sets, orders_a, m)
        second = (t.second @ block[t.h * k :]).view(t.n_sets, orders_b, m)
        best_set = _first_max(first.amax(1) + second.amax(1), weights)
        picked = best_set.view(1, 1, m)
        order_a = _first_max(first.gather(0, picked.expand(1, orders_a, m)).squeeze(0), weights)
        order_b = _first_max(second.gather(0, picked.expand(1, orders_b, m)).squeeze(0), weights)
        out[start : start + chunk, : t.h] = F.embedding(best_set * orders_a + order_a, t.first_cols)
        out[start : start + chunk, t.h :] = F.embedding(best_set * orders_b + order_b, t.second_cols)
    return out


def _solve_scipy(c: torch.Tensor) -> torch.Tensor:
    """(N, R, C) with R <= C -> (N, R) with scipy's linear_sum_assignment, one call per matrix."""
    from scipy.optimize import linear_sum_assignment

    # Negated once here rather than per call (maximize=True copies every matrix); rows come back sorted.
    costs = np.negative(_finite_cpu64(c))
    out = np.stack([linear_sum_assignment(matrix)[1] for matrix in costs])
    return torch.from_numpy(out.reshape(costs.shape[:2]).astype(np.int64, copy=False)).to(c.device)


def _finite_cpu64(c: torch.Tensor) -> np.ndarray:
    """float64 NumPy copy with NaN -> 0 and +-inf -> +-1e30: compiled solvers reject or mis-handle non-finite."""
    return torch.nan_to_num(c.detach().to("cpu", torch.float64), nan=0.0, posinf=1e30, neginf=-1e30).numpy()


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
            hint="pip install 'lapx>=0.11', or use solver='scipy'",
        )
    n, rows, cols = c.shape
    costs = np.ascontiguousarray(np.negative(_finite_cpu64(c)))
    _, col_lists = lap.lapjvr_batch(costs, extend_cost=rows != cols, return_cost=False)
    return torch.from_numpy(np.stack(col_lists).reshape(n, rows)).to(c.device)


def _solve_torch(c: torch.Tensor) -> torch.Tensor:
    """(..., R, C) with R <= C -> (N, R), batch flattened: the Hungarian algorithm (shortest augmenting paths with row and column
    potentials, O(R^2 C) per matrix) run on all N matrices at once with tensor operations on ``c``'s device.

    Rows are added one at a time; each search adds one column to its tree per step, so a fixed R x C steps (masked
    where a matrix's search has finished) and C steps of path reversal solve every matrix without reading a value
    back to the host: no device sync, so a GPU keeps its queue full during training. In float64 for exactness.
    """
    rows, cols = c.shape[-2:]
    c = c.reshape(-1, rows, cols)
    n = c.shape[0]
    dev = c.device
    cost = -torch.nan_to_num(c.to(torch.float64), nan=0.0, posinf=1e30, neginf=-1e30)
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=dev)
    batch = torch.arange(n, device=dev)
    # 1-based rows and columns as in the textbook form; row 0 / column 0 are the search's virtual start.
    u = torch.zeros(n, rows + 1, dtype=torch.float64, device=dev)
    v = torch.zeros(n, cols + 1, dtype=torch.float64, device=dev)
    p = torch.zeros(n, cols + 1, dtype=torch.long, device=dev)  # row matched to each column (0 = free)
    way = torch.zeros(n, cols + 1, dtype=torch.long, device=dev)
    for i in range(1, rows + 1):
        p[:, 0] = i
        j0 = torch.zeros(n, dtype=torch.long, device=dev)
        minv = torch.full((n, cols + 1), float("inf"), dtype=torch.float64, device=dev)
        used = torch.zeros(n, cols + 1, dtype=torch.bool, device=dev)
        active = torch.ones(n, dtype=torch.bool, device=dev)
        for _ in range(cols):
            used[batch, j0] |= active
            i0 = p[batch, j0]  # (n,) the row whose edges are relaxed
            cur = cost[batch, (i0 - 1).clamp(min=0)] - u[batch, i0].unsqueeze(1) - v[:, 1:]
            free = ~used[:, 1:] & active.unsqueeze(1)
            better = free & (cur < minv[:, 1:])
            minv[:, 1:] = torch.where(better, cur, minv[:, 1:])
            way[:, 1:] = torch.where(better, j0.unsqueeze(1), way[:, 1:])
            masked = torch.where(~used[:, 1:], minv[:, 1:], inf)
            delta, j1 = masked.min(dim=1)
            delta = torch.where(active, delta, torch.zeros_like(delta))
            # Potentials: rows of the tree rise by delta, its columns fall by it, the rest's slack shrinks.
            tree = used & active.unsqueeze(1)
            u.scatter_add_(1, p, torch.where(tree, delta.unsqueeze(1), torch.zeros_like(minv)))
            v = torch.where(tree, v - delta.unsqueeze(1), v)
            minv = torch.where(~used & active.unsqueeze(1), minv - delta.unsqueeze(1), minv)
            j0 = torch.where(active, j1 + 1, j0)
            active = active & (p[batch, j0] != 0)
        # Reverse the augmenting path from the free column reached back to the virtual column 0.
        for _ in range(cols):
            moving = j0 != 0
            j1 = way[batch, j0]
            p[batch, j0] = torch.where(moving, p[batch, j1], p[batch, j0])
            j0 = torch.where(moving, j1, j0)
    out = torch.full((n, rows + 1), -1, dtype=torch.long, device=dev)
    cols_idx = torch.arange(cols + 1, device=dev).expand(n, -1)
    out.scatter_(1, p[:, 1:], cols_idx[:, 1:] - 1)  # free columns write into the unused slot 0
    return out[:, 1:]


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
        Solver("enumerate", "all injective maps at once as one GEMM + max (K <= 4; any device)", _solve_enumerate),
        Solver("split", "meet-in-the-middle enumeration: best half-matchings per column set (K = 5..7; any device)",
               _solve_split),
        Solver("scipy", "scipy.optimize.linear_sum_assignment looped over matrices (CPU)",
               lambda c: _greedy_certified(c, _solve_scipy)),
        Solver("lapx", "lap.lapjvr_batch from the optional lapx package (CPU, batched)",
               lambda c: _greedy_certified(c, _solve_lapx)),
        Solver("torch", "batched Hungarian algorithm in tensor operations, no host sync (any device; K >= 8 on GPU)",
               _solve_torch),
    )
}


def resolve_solver(rows: int, cols: int, solver: str = "auto", device: torch.device | str | None = None) -> Solver:
    """The solver ``max_trace_assignment`` uses for ``rows x cols`` matrices (``rows <= cols``) on ``device``."""
    if solver == "auto":
        if num_maps(rows, cols) <= ENUMERATION_MAX_MAPS:
            return SOLVERS["enumerate"]
        if cols <= SPLIT_MAX_K:
            return SOLVERS["split"]
        if device is not None and torch.device(device).type == "cuda":
            return SOLVERS["torch"]  # stays on the GPU; a CPU solver would copy every matrix to the host
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
        solver: ``"auto"`` (full enumeration while ``C!/(C-R)! <= ENUMERATION_MAX_MAPS``, split enumeration
            while ``C <= SPLIT_MAX_K``, else the torch solver on CUDA, else lapx if installed, else scipy), or a
            name from :data:`SOLVERS`.

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
    chosen = resolve_solver(rows, cols, solver, c.device)
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
