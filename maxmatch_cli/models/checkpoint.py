"""Checkpoints: one safetensors file per checkpoint, nothing pickled.

Tensors: the model's state dict under ``model.``; training checkpoints (``last``) add the optimiser state under
``optim.`` and RNG states under ``rng.``. The safetensors header metadata (string → string) holds JSON for the
resolved recipe, the text vocabulary, provenance (package version, git revision, command line, feature-file
fingerprint) and the training state (epoch, step, best RSUM, metric history). Writes go to a temporary file in
the same folder and are renamed into place, so a checkpoint on disk is always whole.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from maxmatch_cli import __version__
from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.fileio import atomic_write
from maxmatch_cli.config.recipes import Recipe, recipe_from_dict

FORMAT = "maxmatch-checkpoint"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    """A loaded checkpoint."""

    path: Path
    recipe: Recipe
    model_state: dict[str, torch.Tensor]
    vocab_json: str | None
    provenance: dict[str, Any]
    train_state: dict[str, Any] = field(default_factory=dict)
    optim_state: dict[str, torch.Tensor] = field(default_factory=dict)
    rng_state: dict[str, torch.Tensor] = field(default_factory=dict)


def git_revision() -> str | None:
    """The package checkout's git revision, if it is a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def provenance(feature_fingerprint: str | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Where a checkpoint came from."""
    return {
        "package_version": __version__,
        "git_revision": git_revision(),
        "command_line": " ".join(sys.argv),
        "feature_fingerprint": feature_fingerprint,
        "torch_version": torch.__version__,
        "created_unix": time.time(),
        **(extra or {}),
    }


def _flatten_optim(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optim(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    for pid, entry in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(path: Path, model: torch.nn.Module, recipe: Recipe, vocab_json: str | None,
                    prov: dict[str, Any], train_state: dict[str, Any] | None = None,
                    optimizer: torch.optim.Optimizer | None = None,
                    rng_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a checkpoint atomically; with ``optimizer`` it can resume training.

    ``rng_state`` (names ``torch``, ``cudaN``) is stored instead of the current RNG states: the trainer passes the
    states at the last step boundary, so a checkpoint taken mid-step still resumes exactly.
    """
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "recipe": json.dumps(recipe.to_dict() | {"name": recipe.name, "description": recipe.description}),
        "vocab": vocab_json or "",
        "provenance": json.dumps(prov),
        "train_state": json.dumps(train_state or {}),
    }
    if optimizer is not None:
        optim_tensors, optim_meta = _flatten_optim(optimizer.state_dict())
        tensors.update(optim_tensors)
        meta["optim"] = json.dumps(optim_meta)
        if rng_state is not None:
            tensors.update({f"rng.{name}": state for name, state in rng_state.items()})
        else:
            tensors["rng.torch"] = torch.get_rng_state()
            if torch.cuda.is_available():
                for i, state in enumerate(torch.cuda.get_rng_state_all()):
                    tensors[f"rng.cuda{i}"] = state
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return Path(path)


def load_checkpoint(path: Path | str) -> Checkpoint:
    """Read and validate a checkpoint written by :func:`save_checkpoint` (no unpickling)."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.safetensors", "last.safetensors"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise MaxMatchError(f"{path} is a folder without best.safetensors or last.safetensors",
                                hint="pass a checkpoint file written by `maxmatch train`")
    if not path.is_file():
        raise MaxMatchError(f"checkpoint {path} does not exist", hint="pass a file written by `maxmatch train`")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise MaxMatchError(f"{path} is not a readable maxmatch checkpoint ({exc})",
                            hint="it may be truncated or another format; re-run training or pass another file") from None
    if meta.get("format") != FORMAT:
        raise MaxMatchError(f"{path} is a safetensors file but not a maxmatch checkpoint",
                            hint="pass a file written by `maxmatch train`")
    if int(meta.get("format_version", "0")) > FORMAT_VERSION:
        raise MaxMatchError(f"{path} was written by a newer maxmatch (format {meta['format_version']})",
                            hint="upgrade maxmatch")
    raw = json.loads(meta["recipe"])
    name = raw.pop("name", "custom")
    recipe = recipe_from_dict({"recipe": {"description": raw.pop("description", "")}, **raw}, name=name,
                              source=str(path))
    model_state = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    optim_tensors = {k: v for k, v in tensors.items() if k.startswith("optim.")}
    rng = {k[4:]: v for k, v in tensors.items() if k.startswith("rng.")}
    optim_state = _unflatten_optim(optim_tensors, json.loads(meta["optim"])) if "optim" in meta else {}
    return Checkpoint(path=path, recipe=recipe, model_state=model_state, vocab_json=meta.get("vocab") or None,
                      provenance=json.loads(meta.get("provenance", "{}")),
                      train_state=json.loads(meta.get("train_state", "{}")), optim_state=optim_state,
                      rng_state=rng)
