"""Exact max-trace assignment against scipy's linear_sum_assignment on random, tied and adversarial matrices."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from maxmatch_cli.method import assignment
from maxmatch_cli.method.assignment import (
    ENUMERATION_MAX_MAPS,
    SOLVERS,
    SPLIT_MAX_K,
    assignment_objective,
    max_trace_assignment,
    num_maps,
    permutation_table,
    resolve_solver,
)
from maxmatch_cli.errors import MaxMatchError

HAVE_LAPX = importlib.util.find_spec("lap") is not None


def scipy_objective(c: torch.Tensor) -> np.ndarray:
    """Optimal objective of every matrix in a (N, R, C) batch, by scipy."""
    out = []
    for matrix in c.double().numpy():
        rows, cols = linear_sum_assignment(matrix, maximize=True)
        out.append(matrix[rows, cols].sum())
    return np.array(out)


def solvers_for(k: int) -> list[str]:
    names = ["auto", "scipy", "torch"] + (["lapx"] if HAVE_LAPX else [])
    if num_maps(k, k) <= 5040:  # enumeration stays cheap enough for a test up to K = 7
        names += ["enumerate", "split"]
    return names


def assert_valid_and_optimal(c: torch.Tensor, perm: torch.Tensor) -> None:
    n, k, _ = c.shape
    assert perm.shape == (n, k) and perm.dtype == torch.long
    assert torch.equal(perm.sort(-1).values, torch.arange(k).expand(n, k)), "not a permutation"
    got = assignment_objective(c.double(), perm).numpy()
    np.testing.assert_allclose(got, scipy_objective(c), rtol=0, atol=1e-9)


def random_matrices(k: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, k, generator=g, dtype=torch.float64)


def tied_matrices(k: int, n: int, seed: int) -> torch.Tensor:
    """Integer matrices from a tiny range: many entries and many optimal matchings tie."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(0, 3, (n, k, k), generator=g).double()
    c[0] = 1.0  # all equal: every permutation is optimal
    return c


def greedy_traps(k: int, n: int, seed: int) -> torch.Tensor:
    """Matrices where taking each row's best column greedily is suboptimal.

    A hidden permutation scores 5 on each row; row 0 additionally has a decoy of 5.5 on row 1's optimal column
    and row 1 can fall back only to a column worth nothing, so greedy row-by-row loses.
    """
    g = torch.Generator().manual_seed(seed)
    c = torch.rand(n, k, k, generator=g, dtype=torch.float64)
    for i in range(n):
        hidden = torch.randperm(k, generator=g)
        c[i, torch.arange(k), hidden] = 5.0
        if k >= 2:
            c[i, 0, hidden[1]] = 5.5
            c[i, 1, :] = torch.where(torch.arange(k) == hidden[1], 5.0, -3.0)
    return c


@pytest.mark.parametrize("k", range(1, 11))
@pytest.mark.parametrize("family", [random_matrices, tied_matrices, greedy_traps])
def test_objective_equals_scipy(k, family):
    c = family(k, 24 if k <= 8 else 12, seed=k)
    for solver in solvers_for(k):
        assert_valid_and_optimal(c, max_trace_assignment(c, solver=solver))


def test_float32_half_and_integer_inputs():
    c = random_matrices(4, 32, seed=1)
    expected = scipy_objective(c)
    for variant in (c.float(), c.to(torch.bfloat16).float()):
        perm = max_trace_assignment(variant)
        np.testing.assert_allclose(assignment_objective(variant.double(), perm).numpy(),
                                   scipy_objective(variant), atol=1e-5)
    perm = max_trace_assignment(c.half())  # enumerated in float32
    assert torch.equal(perm.sort(-1).values, torch.arange(4).expand(32, 4))
    ints = tied_matrices(5, 16, seed=2).long()
    np.testing.assert_allclose(assignment_objective(ints.double(), max_trace_assignment(ints)).numpy(),
                               scipy_objective(ints))
    assert np.isfinite(expected).all()


def test_batch_dims_and_single_matrix():
    c = random_matrices(5, 6, seed=3).reshape(2, 3, 5, 5)
    perm = max_trace_assignment(c)
    assert perm.shape == (2, 3, 5)
    assert torch.equal(perm.reshape(6, 5), max_trace_assignment(c.reshape(6, 5, 5)))
    assert max_trace_assignment(torch.tensor([[0.9, 0.8], [0.85, 0.1]])).tolist() == [1, 0]
    assert max_trace_assignment(torch.empty(0, 3, 3)).shape == (0, 3)


@pytest.mark.parametrize("shape", [(3, 5), (5, 3), (1, 4), (4, 1), (2, 9)])
def test_rectangular(shape):
    rows, cols = shape
    g = torch.Generator().manual_seed(rows * 10 + cols)
    c = torch.randn(20, rows, cols, generator=g, dtype=torch.float64)
    for solver in ("auto", "scipy", "enumerate", "split", "torch") + (("lapx",) if HAVE_LAPX else ()):
        perm = max_trace_assignment(c, solver=solver)
        assert perm.shape == (20, rows)
        matched = perm[perm >= 0].reshape(20, min(rows, cols))
        assert (matched.sort(-1).values[:, 1:] != matched.sort(-1).values[:, :-1]).all(), "column used twice"
        assert ((perm >= 0).sum(-1) == min(rows, cols)).all()
        np.testing.assert_allclose(assignment_objective(c, perm).numpy(), scipy_objective(c), atol=1e-9)


@pytest.mark.parametrize("solver,k,chunk_elements", [("enumerate", 4, 24 * 7), ("split", 6, 240 * 7)])
def test_enumeration_chunks_agree(monkeypatch, solver, k, chunk_elements):
    c = random_matrices(k, 50, seed=4)
    whole = max_trace_assignment(c, solver=solver)
    monkeypatch.setattr(assignment, "_ENUMERATION_CHUNK_ELEMENTS", chunk_elements)  # chunks of 7, last one short
    assert torch.equal(max_trace_assignment(c, solver=solver), whole)


def test_first_maximal_map_on_ties():
    # every permutation ties: enumeration returns the first map, the identity
    assert max_trace_assignment(torch.zeros(3, 4, 4), solver="enumerate").tolist() == [[0, 1, 2, 3]] * 3
    assert max_trace_assignment(torch.zeros(2, 6, 6), solver="split").tolist() == [list(range(6))] * 2


def test_greedy_certificate_skips_the_solver(monkeypatch):
    calls = []

    def spy(c):
        calls.append(c.shape[0])
        return SOLVERS["enumerate"].solve(c)

    monkeypatch.setattr(assignment, "_solve_scipy", spy)
    c = random_matrices(7, 10, seed=5)
    c[:6] += 10.0 * torch.eye(7, dtype=torch.float64)[torch.randperm(7)]  # argmax rows are a permutation
    perm = max_trace_assignment(c, solver="scipy")
    assert calls == [4]
    assert_valid_and_optimal(c, perm)


def test_non_finite_scores_give_valid_permutations():
    c = random_matrices(4, 5, seed=6)
    c[0, 1, 2] = float("nan")
    c[1, 0, 0] = float("inf")
    for solver in ("auto", "split", "scipy") + (("lapx",) if HAVE_LAPX else ()):
        perm = max_trace_assignment(c, solver=solver)
        assert torch.equal(perm.sort(-1).values, torch.arange(4).expand(5, 4)), solver


def test_switch_over_and_tables():
    assert resolve_solver(4, 4).name == "enumerate" and num_maps(4, 4) <= ENUMERATION_MAX_MAPS
    assert resolve_solver(5, 5).name == "split"
    assert resolve_solver(SPLIT_MAX_K, SPLIT_MAX_K).name == "split"
    assert resolve_solver(SPLIT_MAX_K + 1, SPLIT_MAX_K + 1).name in {"scipy", "lapx"}
    assert resolve_solver(4, SPLIT_MAX_K).name == "split"  # padded to square
    assert resolve_solver(3, SPLIT_MAX_K + 1).name in {"scipy", "lapx"}  # too wide to pad cheaply
    assert resolve_solver(2, 8).name == "enumerate"  # 8*7 = 56 injective maps
    assert resolve_solver(5, 6).name == "split"  # 720 maps: padded to 6 x 6
    table = permutation_table(4)
    assert table.shape == (24, 4) and len({tuple(r) for r in table.tolist()}) == 24
    assert permutation_table(4) is table  # cached


def test_user_errors():
    with pytest.raises(MaxMatchError, match="unknown assignment solver"):
        max_trace_assignment(torch.zeros(2, 2), solver="hungarian")
    with pytest.raises(MaxMatchError, match=r"\(\.\.\., R, C\)"):
        max_trace_assignment(torch.zeros(3))
    with pytest.raises(MaxMatchError, match="real scores"):
        max_trace_assignment(torch.zeros(2, 2, dtype=torch.complex64))


def test_lapx_missing_is_a_user_error(monkeypatch):
    """With lapx hidden from the import system: solver='lapx' is a user error naming the package, and 'auto' falls
    back to scipy where it would take lapx."""
    import sys

    monkeypatch.setitem(sys.modules, "lap", None)  # `import lap` raises ImportError, find_spec("lap") is None
    assignment._import_lap.cache_clear()
    try:
        with pytest.raises(MaxMatchError, match="solver 'lapx' needs the lapx package") as info:
            max_trace_assignment(random_matrices(7, 2, seed=7), solver="lapx")
        assert "pip install 'lapx" in info.value.hint and "solver='scipy'" in info.value.hint
        k = SPLIT_MAX_K + 1
        assert resolve_solver(k, k).name == "scipy"
        c = random_matrices(k, 3, seed=7)
        assert_valid_and_optimal(c, max_trace_assignment(c))
    finally:
        assignment._import_lap.cache_clear()  # the next caller finds the real lapx again, if installed


@pytest.mark.parametrize("k", [8, 12, 16])
def test_torch_solver_is_exact_at_large_k_with_float32_and_extremes(k):
    """The GPU solver for K >= 8, on CPU tensors: exact against scipy, also for float32 cosines, ties and
    non-finite entries (which must still give a valid permutation)."""
    c = torch.cat([random_matrices(k, 16, seed=k), tied_matrices(k, 8, seed=k), greedy_traps(k, 8, seed=k)])
    perm = max_trace_assignment(c, solver="torch")
    assert_valid_and_optimal(c, perm)
    cos = torch.tanh(random_matrices(k, 16, seed=k + 1)).float()
    np.testing.assert_allclose(assignment_objective(cos.double(), max_trace_assignment(cos, solver="torch")).numpy(),
                               scipy_objective(cos.double()), atol=1e-6)
    bad = random_matrices(k, 2, seed=0)
    bad[0, 0, 0], bad[1, 1, :] = float("nan"), float("-inf")
    perm = max_trace_assignment(bad, solver="torch")
    assert torch.equal(perm.sort(-1).values, torch.arange(k).expand(2, k))


def test_every_solver_takes_any_batch_shape():
    """Solvers receive (..., R, C): the similarity layer hands them (Bi, Bt, K, K) blocks."""
    c = random_matrices(8, 12, seed=4).reshape(3, 4, 8, 8)
    want = max_trace_assignment(c.reshape(12, 8, 8), solver="scipy")
    for name in SOLVERS:
        if name == "lapx" and not HAVE_LAPX:
            continue
        perm = max_trace_assignment(c, solver=name)
        assert perm.shape == (3, 4, 8)
        torch.testing.assert_close(assignment_objective(c.reshape(12, 8, 8), perm.reshape(12, 8)),
                                   assignment_objective(c.reshape(12, 8, 8), want))


def test_auto_keeps_cuda_tensors_on_the_gpu_solver():
    assert resolve_solver(8, 8, device="cuda").name == "torch"
    assert resolve_solver(8, 8, device="cpu").name in {"scipy", "lapx"}
    assert resolve_solver(6, 6, device="cuda").name == "split"  # enumeration already runs on any device
