"""Checkpoint format: safetensors + JSON metadata, atomic writes, clear errors, nothing unpickled."""

import pytest
import torch

from maxmatch_cli.models.checkpoint import load_checkpoint, save_checkpoint
from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.config.recipes import Recipe


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))


def test_round_trip_with_optimizer(tmp_path):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    recipe = Recipe().replace(**{"optim.lr": 0.125})
    path = save_checkpoint(tmp_path / "last.safetensors", model, recipe, '["<pad>"]', {"git_revision": "abc"},
                           train_state={"epoch": 2, "global_step": 7}, optimizer=opt)
    ckpt = load_checkpoint(path)
    assert ckpt.recipe == recipe
    assert ckpt.vocab_json == '["<pad>"]'
    assert ckpt.provenance["git_revision"] == "abc"
    assert ckpt.train_state == {"epoch": 2, "global_step": 7}
    for k, v in model.state_dict().items():
        assert torch.equal(ckpt.model_state[k], v)
    opt2 = torch.optim.AdamW(_model().parameters(), lr=0.1)
    opt2.load_state_dict(ckpt.optim_state)
    for a, b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"])
    assert "torch" in ckpt.rng_state
    assert not list(tmp_path.glob(".*.tmp")), "temporary files must not be left behind"


def test_folder_resolves_to_best(tmp_path):
    save_checkpoint(tmp_path / "best.safetensors", _model(), Recipe(), None, {})
    assert load_checkpoint(tmp_path).path.name == "best.safetensors"


def test_bad_checkpoints(tmp_path):
    with pytest.raises(MaxMatchError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(MaxMatchError, match="not a readable maxmatch checkpoint"):
        load_checkpoint(junk)
    good = save_checkpoint(tmp_path / "good.safetensors", _model(), Recipe(), None, {})
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-20])
    with pytest.raises(MaxMatchError, match="not a readable"):
        load_checkpoint(truncated)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(MaxMatchError, match="not a maxmatch checkpoint"):
        load_checkpoint(other)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MaxMatchError, match="without best.safetensors"):
        load_checkpoint(empty)


def test_unwritable_destination(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(MaxMatchError, match="cannot write"):
        save_checkpoint(blocker / "sub" / "best.safetensors", _model(), Recipe(), None, {})
