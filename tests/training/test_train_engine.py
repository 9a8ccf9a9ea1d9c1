"""The training loop's own behaviour: AMP precision of the loss, early checks, and the loop under a real
two-process gloo run (validation on rank 0 only, resume, per-rank random streams)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from maxmatch_cli.training import trainer as train_mod
from maxmatch_cli.cli.app import app
from maxmatch_cli.method.similarity import set_similarity


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_autocast_keeps_similarities_and_losses_in_float32(monkeypatch):
    """bf16 cosines are multiples of 2^-8 near 1: the exact assignment and hardest negatives would see ties."""
    if str(Path(__file__).parent) not in sys.path:  # pytest's default import mode has put it there already
        sys.path.insert(0, str(Path(__file__).parent))
    from test_distributed import global_batch, tiny_model, tiny_recipe

    recipe = tiny_recipe("maxmatch")
    model = tiny_model(recipe).float()
    b = global_batch()
    batch = type(b)(b.feats.float(), b.feat_mask, b.tokens, b.token_mask, b.image_index, b.caption_index)
    seen = {}
    real_total = train_mod.total_loss

    def total_loss(sims, img_sets, *args, **kwargs):
        seen.update(sims=sims, img_sets=img_sets, txt_sets=args[0])
        return real_total(sims, img_sets, *args, **kwargs)

    monkeypatch.setattr(train_mod, "total_loss", total_loss)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = train_mod.loss_on_batch(model, batch, recipe, hardest=True)
    assert seen["img_sets"].dtype == torch.float32 and seen["sims"].dtype == torch.float32
    expected = set_similarity(seen["img_sets"].detach(), seen["txt_sets"].detach(), kind="maxmatch")
    torch.testing.assert_close(seen["sims"].detach(), expected, rtol=0, atol=0)
    assert loss.dtype == torch.float32
    loss.backward()  # the gradient reaches the bf16 encoders through the casts
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_validation_layout_is_checked_before_training(tiny_h5, tiny_overrides, tmp_path, monkeypatch):
    """A validation split the evaluation cannot read must fail at start, not after the first epoch."""
    steps = []
    real = train_mod.loss_on_batch
    monkeypatch.setattr(train_mod, "loss_on_batch", lambda *a, **k: steps.append(1) or real(*a, **k))
    result = invoke("train", "--recipe", "demo", "--set", f"data.path={tiny_h5}", *tiny_overrides,
                    "--set", "train.epochs=2", "--set", "data.captions_per_image=4", "--out", tmp_path / "run")
    assert result.exit_code == 2, result.output
    assert "split 'dev'" in result.output and "Traceback" not in result.output
    assert steps == []


def test_val_max_images_zero_validates_the_whole_split(tiny_h5, tiny_overrides, tmp_path):
    """0 means no limit, as for train.max_steps (it used to slice the split to nothing and crash after an epoch)."""
    out = tmp_path / "run"
    result = invoke("train", "--recipe", "demo", "--set", f"data.path={tiny_h5}", *tiny_overrides,
                    "--set", "train.epochs=2", "--set", "train.max_steps=2", "--set", "train.val_max_images=0",
                    "--out", out)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["val/rsum"] > 0
    result = invoke("train", "--recipe", "demo", "--set", "train.val_max_images=-1")
    assert result.exit_code == 2 and "train.val_max_images" in result.output


def test_epoch_sampler_resumed_past_the_end_is_empty():
    """A resume with more processes than the checkpoint's run can start past the new, shorter epoch."""
    from maxmatch_cli.data.samplers import EpochSampler

    sampler = EpochSampler(100, 10, world_size=2)  # 5 steps per epoch
    sampler.set_epoch(0, start_step=8)
    assert len(sampler) == 0 and list(sampler) == []


# ------------------------------------------------------------------------------------------------------------
# The whole loop in two gloo processes: rank 0 validates (slowly) while rank 1 waits in the next step's
# collectives; a run stopped mid-epoch and resumed ends where a straight run ends.

WORLD = 2


def _worker(data: str, out: str, resume: str, *overrides: str) -> None:
    """Entry point of each rank (``python tests/training/test_train_engine.py DATA OUT RESUME [KEY=VALUE ...]``)."""
    from maxmatch_cli.training import distributed as dist
    from maxmatch_cli.config.recipes import load_recipe, parse_overrides

    torch.set_num_threads(1)
    dist.init()
    rank = dist.rank()
    real_validate = train_mod._validate
    first_rng = []

    def slow_validate(*args, **kwargs):
        time.sleep(1.5)  # rank 1 runs ahead into the next epoch's collectives meanwhile
        return real_validate(*args, **kwargs)

    class ProbedImages(train_mod.ImageCaptionsDataset):
        def __getitem__(self, i):
            if not first_rng:  # the CPU generator as the first training item starts drawing its dropout
                first_rng.append(hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest())
            return super().__getitem__(i)

    train_mod._validate, train_mod.ImageCaptionsDataset = slow_validate, ProbedImages
    tiny = ["model.embed_dim=16", "model.word_dim=8", "model.set_depth=1", "model.set_heads=2",
            "model.set_head_dim=8", "model.set_ff_dim=16", "data.num_workers=0", "train.batch_size=4",
            "data.vocab_min_count=1", "eval.batch_size=64", "model.image_feature_dim=32", "loss.warmup_epochs=1",
            "train.epochs=2", f"data.path={data}"]
    recipe = load_recipe("demo", parse_overrides(tiny + list(overrides)))
    result = train_mod.train(recipe, Path(out), resume=resume == "1", show_progress=False)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"steps": result.steps, "first_rng": first_rng}))
    torch.distributed.destroy_process_group()


def _launch(tmp_path: Path, *args: str, timeout: float = 180.0) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs, logs = [], []
    for r in range(WORLD):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r), LOCAL_RANK=str(r),
                   WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        if Path("/sys/class/net/lo").exists():
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        logs.append(tmp_path / f"launch{len(list(tmp_path.glob('launch*')))}-rank{r}.log")
        procs.append(subprocess.Popen([sys.executable, __file__, *args], env=env, stdout=logs[-1].open("w"),
                                      stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[2]))
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 1.0))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    codes = [p.returncode for p in procs]
    text = "\n".join(f"--- {log.name} ---\n{log.read_text()[-3000:]}" for log in logs)
    assert codes == [0] * WORLD, f"exit codes {codes} (negative: killed after {timeout:.0f} s)\n{text}"


@pytest.mark.slow
def test_gloo_training_loop_validates_on_rank0_and_resumes(tiny_h5, tmp_path):
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this build")
    from safetensors.torch import load_file

    # No dropout anywhere: rank 1's random stream is not in the checkpoint, so only then is a resume exact.
    exact = ["data.word_dropout=0", "data.region_dropout=0", "model.set_dropout=0", "model.text_dropout=0",
             "model.image_dropout=0"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    _launch(tmp_path, str(tiny_h5), str(straight), "0", *exact)
    _launch(tmp_path, str(tiny_h5), str(stopped), "0", *exact, "train.max_steps=3")  # mid-epoch
    _launch(tmp_path, str(tiny_h5), str(stopped), "1", *exact, "train.max_steps=0")
    steps_per_epoch = 40 // (4 * WORLD)  # 40 training images, 4 images (x 5 captions) per rank
    for run in (straight, stopped):
        assert [json.loads((run / f"rank{r}.json").read_text())["steps"] for r in range(WORLD)] == [
            2 * steps_per_epoch] * WORLD
        assert (run / "best.safetensors").is_file()
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert "val/rsum" in records[-1]
    a, b = load_file(str(straight / "last.safetensors")), load_file(str(stopped / "last.safetensors"))
    for name in (k for k in a if k.startswith("model.")):
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")

    # With dropout on, each rank draws from its own stream (the same seed would give every rank the same masks).
    own = tmp_path / "own"
    _launch(tmp_path, str(tiny_h5), str(own), "0", "train.max_steps=2")
    first = [json.loads((own / f"rank{r}.json").read_text())["first_rng"] for r in range(WORLD)]
    assert first[0] != first[1]


if __name__ == "__main__":
    _worker(*sys.argv[1:])
