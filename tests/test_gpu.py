"""The CUDA path: run by benchmarks/gpu_check.sh where a GPU is present, skipped elsewhere (marker `gpu`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from maxmatch_cli.method.assignment import assignment_objective, max_trace_assignment
from maxmatch_cli.cli.app import app
from maxmatch_cli.method.similarity import set_similarity

pytestmark = pytest.mark.gpu


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("k", [4, 6, 8, 16])
def test_exact_assignment_on_cuda_matches_scipy(k):
    from scipy.optimize import linear_sum_assignment

    c = torch.randn(512, k, k, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    perm = max_trace_assignment(c.cuda())
    assert perm.device.type == "cuda"
    best = np.array([m[linear_sum_assignment(m, maximize=True)].sum() for m in c.numpy()])
    np.testing.assert_allclose(assignment_objective(c, perm.cpu()).numpy(), best, atol=1e-9)


@pytest.mark.parametrize("kind", ["maxmatch", "chamfer", "mil"])
def test_similarities_on_cuda_equal_the_cpu(kind):
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(40, 8, 64, generator=g), torch.randn(60, 8, 64, generator=g)
    torch.testing.assert_close(set_similarity(img.cuda(), txt.cuda(), kind).cpu(), set_similarity(img, txt, kind),
                               rtol=1e-4, atol=1e-5)


def test_amp_training_and_cuda_evaluation(tiny_h5, tiny_overrides, tmp_path):
    out = tmp_path / "run"
    result = invoke("train", "--recipe", "demo", "--set", f"data.path={tiny_h5}", *tiny_overrides,
                    "--set", "train.device=cuda", "--set", "train.amp=true", "--set", "train.epochs=2",
                    "--set", "train.max_steps=6", "--out", out)
    assert result.exit_code == 0, result.output
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == 6 and all(np.isfinite(s["loss/total"]) for s in steps)
    metrics = {}
    for device in ("cuda", "cpu"):
        js = tmp_path / f"{device}.json"
        result = invoke("evaluate", out / "best.safetensors", "--split", "test", "--device", device, "--no-cache",
                        "--json", js)
        assert result.exit_code == 0, result.output
        metrics[device] = json.loads(js.read_text())["metrics"]
    assert abs(metrics["cuda"]["rsum"] - metrics["cpu"]["rsum"]) < 1.0  # TF32/bf16 may flip a rare tie


def test_index_search_on_cuda_equals_the_cpu(tiny_h5, tiny_overrides, tmp_path):
    """An index searched on CUDA (exact engine, or faiss, on the GPUs when the faiss build sees them) returns the
    CPU's results."""
    import importlib.util

    def run(*args):
        result = invoke(*args)
        assert result.exit_code == 0, result.output
        return result

    run("train", "--recipe", "demo", "--set", f"data.path={tiny_h5}", "--set", "train.max_steps=2", *tiny_overrides,
        "--out", tmp_path / "run")
    engine = "faiss" if importlib.util.find_spec("faiss") else "exact"
    run("index", tmp_path / "run" / "last.safetensors", "--split", "test", "--engine", engine, "--nlist", 2,
        "--out", tmp_path / "idx")
    answers = {}
    for device in ("cpu", "cuda"):
        out = run("query", tmp_path / "idx", "--text", "a red car", "--text", "people", "-k", 5, "--json",
                  "--device", device, "--nprobe", 2, "--candidates", 1000)
        answers[device] = [[(h["row"], round(h["score"], 4)) for h in q["results"]]
                           for q in json.loads(out.stdout)["queries"]]
    assert answers["cuda"] == answers["cpu"]
