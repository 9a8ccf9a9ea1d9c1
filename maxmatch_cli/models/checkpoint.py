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
    # A full disk: one message naming the file, its size and the space free; the earlier file stays whole.
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=meta),
                 size=_serialised_size(tensors, meta))
    return Path(path)


def _serialised_size(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> int:
    """About the bytes of the safetensors file (the tensors' bytes, the JSON header: a little over)."""
    header = sum(len(k) + 96 for k in tensors) + sum(len(k) + len(json.dumps(v)) + 8 for k, v in meta.items())
    return sum(t.numel() * t.element_size() for t in tensors.values()) + header + 8


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
"""The first bytes of an HDF5 file (a feature file), which is sometimes passed where a checkpoint belongs."""


def _refuse_feature_file(path: Path) -> None:
    """Name a feature file passed as a checkpoint as such (safetensors would call it "header too large")."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(HDF5_SIGNATURE))
    except OSError:
        return  # the reader below reports it
    if head == HDF5_SIGNATURE:
        raise MaxMatchError(f"{path} is an HDF5 feature file, not a checkpoint",
                            hint="pass a checkpoint written by `maxmatch train` (RUN/best.safetensors or the run "
                                 "folder); give the feature file with --data")


def load_checkpoint(path: Path | str) -> Checkpoint:
    """Read and validate a checkpoint written by :func:`save_checkpoint` (no unpickling)."""
    path = _checkpoint_file(Path(path))
    meta, tensors = _read_safetensors(path)
    _check_format(path, meta)
    recipe = _recipe_of(path, meta)
    model_state = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    rng = {k[4:]: v for k, v in tensors.items() if k.startswith("rng.")}
    optim_state = _optim_state_of(path, meta, tensors)
    vocab = _vocab_of(path, meta)
    return Checkpoint(path=path, recipe=recipe, model_state=model_state, vocab_json=vocab,
                      provenance=_json_meta(meta, "provenance", path, dict),
                      train_state=_checked_train_state(_json_meta(meta, "train_state", path, dict), path),
                      optim_state=optim_state, rng_state=rng)


def _checkpoint_file(path: Path) -> Path:
    """The checkpoint file ``path`` names: itself, or a run folder's best (else last) checkpoint.

    Raises:
        MaxMatchError: no such file, a folder without a checkpoint (saying so if its run is still going), or a
            feature file passed in place of a checkpoint.
    """
    if path.is_dir():
        for name in ("best.safetensors", "last.safetensors"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            from maxmatch_cli.locks import live_holder, lock_inside

            if (holder := live_holder(lock_inside(path))) is not None:
                raise MaxMatchError(f"{path} is a training run in progress ({holder.describe()}) that has not "
                                    "saved a checkpoint yet", hint="wait for its first epoch to end, then re-run")
            raise MaxMatchError(f"{path} is a folder without best.safetensors or last.safetensors",
                                hint="pass a checkpoint file written by `maxmatch train`")
    if not path.is_file():
        raise MaxMatchError(f"checkpoint {path} does not exist", hint="pass a file written by `maxmatch train`")
    _refuse_feature_file(path)
    return path


def _read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """A safetensors file's header metadata and its tensors; an unreadable file is one clear error."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise MaxMatchError(f"{path} is not a readable maxmatch checkpoint ({exc})",
                            hint="it may be truncated or another format; re-run training or pass another file") from None
    return meta, tensors


def _check_format(path: Path, meta: dict[str, str]) -> None:
    """Refuse a safetensors file that is no maxmatch checkpoint, or one of a newer format than this maxmatch's."""
    if meta.get("format") != FORMAT:
        raise MaxMatchError(f"{path} is a safetensors file but not a maxmatch checkpoint",
                            hint="pass a file written by `maxmatch train`")
    version = meta.get("format_version", "0")
    if not version.isdigit():
        raise _garbled(path, "format_version", version, "a whole number")
    if int(version) > FORMAT_VERSION:
        raise MaxMatchError(f"{path} was written by a newer maxmatch (format {meta['format_version']})",
                            hint="upgrade maxmatch")


def _recipe_of(path: Path, meta: dict[str, str]) -> Recipe:
    """The recipe saved in the checkpoint, validated as a recipe file would be."""
    if "recipe" not in meta:
        raise _garbled(path, "recipe", None, "the recipe JSON")
    raw = _json_meta(meta, "recipe", path, dict)
    name = str(raw.pop("name", "custom"))
    try:
        return recipe_from_dict({"recipe": {"description": raw.pop("description", "")}, **raw}, name=name,
                                source=f"the recipe of checkpoint {path}")
    except MaxMatchError as exc:
        if str(path) in exc.message:
            raise
        raise MaxMatchError(f"checkpoint {path} holds a recipe this maxmatch cannot use: {exc.message}",
                            hint="the file is damaged or from another maxmatch version; use another checkpoint of "
                                 "the run, or re-train") from None


def _optim_state_of(path: Path, meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The optimiser state (its ``optim.*`` tensors and ``optim`` header layout); empty when none was saved."""
    optim_tensors = {k: v for k, v in tensors.items() if k.startswith("optim.")}
    try:
        return _unflatten_optim(optim_tensors, _json_meta(meta, "optim", path, dict)) if "optim" in meta else {}
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise _garbled(path, "optim", meta["optim"], f"the optimiser state ({type(exc).__name__}: {exc})") from None


def _vocab_of(path: Path, meta: dict[str, str]) -> str | None:
    """The vocabulary JSON saved with the checkpoint (a list of words), or None."""
    vocab = meta.get("vocab") or None
    if vocab is not None:
        words = _json_meta(meta, "vocab", path, list)
        if not all(isinstance(w, str) for w in words):
            raise _garbled(path, "vocab", vocab, "a JSON list of words")
    return vocab


def load_model_state(model: torch.nn.Module, ckpt: Checkpoint) -> None:
    """Load a checkpoint's weights into the model its recipe builds.

    Raises:
        MaxMatchError: naming the checkpoint and the first tensor that is missing, unexpected, or of another shape
            than the recipe's model has (a damaged or hand-edited file, or one from another maxmatch version).
    """
    expected = model.state_dict()
    saved = ckpt.model_state
    problems = [f"{key} has shape {tuple(value.shape)}, the recipe's model {tuple(expected[key].shape)}"
                for key, value in saved.items() if key in expected and value.shape != expected[key].shape]
    problems += [f"{key} is missing" for key in expected if key not in saved]
    problems += [f"{key} is not part of the recipe's model" for key in saved if key not in expected]
    if problems:
        raise MaxMatchError(f"checkpoint {ckpt.path} does not fit the model of its own recipe: {problems[0]}"
                            + (f" ({len(problems) - 1} more tensors differ)" if len(problems) > 1 else ""),
                            hint="the file is damaged or from another maxmatch version; use another checkpoint "
                                 "of the run, or re-train")
    model.load_state_dict(saved)


def _garbled(path: Path, key: str, value: Any, expected: str) -> MaxMatchError:
    """The error for a checkpoint whose header metadata ``key`` is missing (``value`` None) or garbled."""
    shown = "missing" if value is None else f"{str(value)[:60]!r}{'...' if len(str(value)) > 60 else ''}"
    return MaxMatchError(f"checkpoint {path} is damaged: its metadata '{key}' is {shown}, not {expected}",
                         hint="use another checkpoint of the run (best / last) or re-run training")


def _json_meta(meta: dict[str, str], key: str, path: Path, kind: type) -> Any:
    """Header metadata ``key`` parsed as JSON of type ``kind`` (an empty value of a missing key when absent)."""
    text = meta.get(key, "")
    if not text:
        return kind()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _garbled(path, key, text, f"JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(value, kind):
        raise _garbled(path, key, text, f"a JSON {'object' if kind is dict else 'list'}")
    return value


def _checked_train_state(state: dict[str, Any], path: Path) -> dict[str, Any]:
    """The ``train_state`` of a checkpoint, its counters and history checked."""
    for key in ("epoch", "step_in_epoch", "global_step"):
        value = state.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise _garbled(path, "train_state", json.dumps(state), f"a training state ({key} = {value!r})")
    best = state.get("best_rsum")
    if best is not None and (isinstance(best, bool) or not isinstance(best, (int, float))):
        raise _garbled(path, "train_state", json.dumps(state), f"a training state (best_rsum = {best!r})")
    history = state.get("history", [])
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise _garbled(path, "train_state", json.dumps(state), "a training state (history is not a list of records)")
    return state
