"""One training loop for every recipe.

Each step encodes a batch of images and their captions (or of (image, caption) pairs, ``data.batching``) into
sets, scores every image against every caption with the recipe's set similarity, and minimises eq. 5. Under torchrun each process encodes its share of the global
batch; set embeddings are gathered with gradients so hardest negatives are mined over the global batch
(see :mod:`maxmatch_cli.training.distributed`). Validation RSUM picks ``best.safetensors``; ``last.safetensors`` carries
the optimiser and RNG state so ``--resume`` continues exactly where a run stopped (also after Ctrl-C): weights,
optimiser, step, learning rate and data order always; the random draws too at an epoch boundary, and mid-epoch
with ``data.num_workers=0`` (DataLoader workers restart their augmentation streams). Under torchrun the
checkpoint holds rank 0's RNG state; the other ranks derive their own streams from it (tests/training/test_resume.py).
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from maxmatch_cli.training import distributed as dist
from maxmatch_cli.models.checkpoint import load_checkpoint, provenance, save_checkpoint
from maxmatch_cli.data.datasets import (EpochSampler, ImageCaptionsDataset, PairDataset, build_image_source, build_tokenizer,
                               split_layout)
from maxmatch_cli.devices import resolve_device as _resolve_device
from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.fileio import write_text
from maxmatch_cli.evaluation.evaluate import encode_split, metrics_for, score, similarity_options
from maxmatch_cli.method.losses import LossWeights, set_mmd, total_loss
from maxmatch_cli.progress import console, make_progress
from maxmatch_cli.config.recipes import Recipe, to_toml
from maxmatch_cli.method.similarity import set_similarity
from maxmatch_cli.training.tracking import Trackers, check_available, open_trackers


def resolve_device(name: str = "auto") -> torch.device:
    """The training device from ``train.device``: 'auto' picks CUDA (this process's local rank) when available."""
    return _resolve_device(name, hint="use --set train.device=cpu (or auto)")


def set_cpu_threads(num_workers: int) -> int:
    """Leave one core per DataLoader worker: OpenMP threads spin-wait, so oversubscribing the cores makes
    CPU training several times slower (measured: 0.6 s/step with 1 thread vs 2-12 s with 2 threads and a
    worker on 2 cores). ``MAXMATCH_THREADS`` overrides the choice."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = int(os.environ.get("MAXMATCH_THREADS", "0")) or max(1, cores - num_workers)
    torch.set_num_threads(threads)
    return threads


def lr_factor(step: int, total_steps: int, steps_per_epoch: int, recipe: Recipe) -> float:
    """Learning-rate multiplier at a global step: linear warm-up, then cosine / step / constant."""
    o = recipe.optim
    if o.warmup_steps and step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "cosine":
        progress = min(step / max(total_steps, 1), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if o.schedule == "step":
        return o.gamma ** ((step // max(steps_per_epoch, 1)) // o.step_epochs)
    return 1.0


def loss_on_batch(model, batch, recipe: Recipe, hardest: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Encode a batch and compute eq. 5 for this process's queries against the global batch.

    Single process: one (Bi, Bt) similarity matrix. Under torchrun: local images against every rank's captions
    and every rank's images against the local captions, so the negative pool does not shrink with the world
    size. DDP averages gradients over ranks, so the mean terms (TRI with triplet_reduction='mean', CON, GD, ISD,
    Div) need no scaling, a summed triplet loss is scaled by the world size, and MMD, which is no mean over
    samples, is computed on the gathered sets. The update then equals the single-process one on the
    concatenated batch (tests/training/test_distributed.py).
    """
    img, txt = model(batch.feats, batch.feat_mask, batch.tokens, batch.token_mask)  # forward() so DDP syncs grads
    # Under AMP the encoders run in bf16/fp16, but the similarities and losses run in float32: bf16 cosines are
    # multiples of 2^-8 near 1, so the exact assignment would pick among ties and hardest-negative mining among equal
    # scores. The K x K cosine GEMM is cheap next to the encoders.
    if _autocast_enabled(batch.tokens.device.type):
        with torch.autocast(batch.tokens.device.type, enabled=False):
            return _loss_from_sets(img.to(torch.float32), txt.to(torch.float32), batch, recipe, hardest)
    return _loss_from_sets(img, txt, batch, recipe, hardest)


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 has no device argument
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def _loss_from_sets(img, txt, batch, recipe: Recipe, hardest: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    kind = recipe.loss.similarity
    opts = similarity_options(recipe, kind)
    l = recipe.loss
    # LossWeights' fields are named after the recipe's [loss] keys; only `hardest` follows the epoch.
    weights = {f.name: getattr(l, f.name) for f in fields(LossWeights) if hasattr(l, f.name)}
    weights["hardest"] = hardest
    if dist.world_size() == 1:
        sims = set_similarity(img.sets, txt.sets, kind=kind, **opts)
        return total_loss(sims, img.sets, txt.sets, img.global_, txt.global_, img.slots, txt.slots,
                          image_ids=batch.image_index, caption_owner=batch.caption_owner, **weights)
    all_txt = dist.gather_with_grad(txt.sets)
    all_img = dist.gather_with_grad(img.sets)
    sims_i2t = set_similarity(img.sets, all_txt, kind=kind, **opts)  # (Bi, W·Bt)
    sims_t2i = set_similarity(all_img, txt.sets, kind=kind, **opts)  # (W·Bi, Bt), image rows
    owner = batch.caption_owner
    caption_ids = batch.image_index if owner is None else batch.image_index[owner]
    tri_weight = float(dist.world_size()) if l.triplet_reduction == "sum" else 1.0
    loss, log = total_loss(sims_i2t, img.sets, txt.sets, img.global_, txt.global_, img.slots, txt.slots,
                           image_ids=batch.image_index, caption_owner=owner, sims_t2i=sims_t2i,
                           all_image_ids=dist.gather_no_grad(batch.image_index),
                           all_caption_ids=dist.gather_no_grad(caption_ids),
                           offset=dist.rank() * img.sets.shape[0], caption_offset=dist.rank() * txt.sets.shape[0],
                           tri_weight=tri_weight, **{**weights, "mmd_weight": 0.0})
    if l.mmd_weight:
        # MMD compares the batch's image and text element clouds; it has cross-rank pairs, so the mean of per-rank
        # MMDs is not the global MMD. Every rank computes the global value on the gathered sets; the gather's
        # backward sums over ranks and DDP averages, which gives exactly the single-process gradient.
        mmd = set_mmd(all_img, all_txt, LossWeights.from_kwargs(**weights).mmd_gamma)
        loss = loss + l.mmd_weight * mmd
        log = {**{k: v for k, v in log.items() if k != "total"}, "mmd": mmd.detach(), "total": loss.detach()}
    return loss, log


def _flush_steps(pending: list[tuple[int, float, dict[str, torch.Tensor]]], running: dict[str, float], epoch: int,
                 steps_path: Path | None, trackers: Trackers | None = None) -> None:
    """Read back the loss parts of the steps since the last log step (one device sync), check them, update the
    smoothed values in ``running`` and append one raw record per step to ``steps.jsonl`` (and the same values,
    ``lr`` and ``loss/<part>`` at the step, to ``trackers``).

    Raises:
        MaxMatchError: a loss became NaN or infinite (the step is named; no checkpoint of it is written).
    """
    names = list(pending[0][2])
    values = torch.stack([torch.stack([parts[n].float() for n in names]) for _, _, parts in pending]).tolist()
    lines, logged = [], []
    for (step, lr, _), row in zip(pending, values):
        record = dict(zip(names, row))
        if not math.isfinite(record["total"]):
            raise MaxMatchError(f"loss became {record['total']} at step {step}",
                                hint="lower optim.lr or enable optim.grad_clip")
        for k, v in record.items():
            running[k] = 0.9 * running.get(k, v) + 0.1 * v
        lines.append(json.dumps({"step": step, "epoch": epoch + 1, "lr": lr, **{f"loss/{k}": v for k, v in record.items()}}))
        logged.append((step, {"lr": lr, **{f"loss/{k}": v for k, v in record.items()}}))
    if steps_path is not None:
        with steps_path.open("a") as fh:
            fh.write("\n".join(lines) + "\n")
    if trackers:
        for step, scalars in logged:
            trackers.log(scalars, step)


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The generators a training step draws from: the CPU's (data augmentation with num_workers=0, dropout on the
    CPU) and the training GPU's (dropout on the GPU), named as in a checkpoint's ``rng.`` tensors."""
    states = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        states[f"cuda{index}"] = torch.cuda.get_rng_state(index)
    return states


def _set_rng_state(states: dict[str, torch.Tensor], device: torch.device) -> None:
    """Restore a checkpoint's states (rank 0's), then give the other ranks their own streams."""
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        if f"cuda{index}" in states:
            torch.cuda.set_rng_state(states[f"cuda{index}"], index)
    _decorrelate_ranks()


def _decorrelate_ranks() -> None:
    """Every rank holds the same RNG state (one seed, or rank 0's checkpoint); without this each rank would draw the
    same dropout masks and, through the DataLoader workers' seeds, the same word and region dropout as every
    other rank. Ranks other than 0 reseed from a draw plus their rank; rank 0, and so a single process, keeps its
    stream."""
    if dist.rank():
        torch.manual_seed(int(torch.randint(0, 2**62, (1,))) + dist.rank())


@contextmanager
def _sigint_ignored():
    """Ignore Ctrl-C while the interrupted run is saved: torchrun forwards the SIGINT it receives to every worker,
    so a worker gets a second one right after the terminal's, which would abort the save (torchrun still kills
    workers that take longer than its shutdown timeout)."""
    if threading.current_thread() is not threading.main_thread():
        yield
    else:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)  # None: set outside Python


def _differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            out += _differences(a[key], b[key], f"{prefix}{key}.")
        elif a.get(key) != b.get(key):
            out.append(f"{prefix}{key}")
    return out


def build_train_dataset(store, recipe: Recipe, tokenizer, image_source):
    """The training items ``data.batching`` asks for: images with their captions, or (image, caption) pairs."""
    d = recipe.data
    if d.batching == "images":
        return ImageCaptionsDataset(store, d.train_split, tokenizer, d.captions_per_image, d.max_caption_len,
                                    train=True, word_dropout=d.word_dropout, image_source=image_source,
                                    seed=recipe.train.seed)
    return PairDataset(store, d.train_split, tokenizer, d.max_caption_len, train=True,
                       word_dropout=d.word_dropout, image_source=image_source)


@dataclass
class TrainResult:
    out_dir: Path
    best_rsum: float | None
    last_metrics: dict[str, float] | None
    steps: int
    seconds: float
    interrupted: bool = False


def _validate(model, store, recipe: Recipe, tokenizer, device) -> dict[str, float]:
    emb = encode_split(model, store, recipe.data.val_split, tokenizer, recipe.data.captions_per_image, device,
                       batch_size=recipe.eval.batch_size, max_len=recipe.data.max_caption_len,
                       max_images=recipe.train.val_max_images or None, show_progress=False,
                       image_source=build_image_source(store, recipe, train=False))
    kind = recipe.eval.similarity or recipe.loss.similarity
    sims = score(emb.images, emb.captions, kind, device, recipe.eval.block_size, **similarity_options(recipe, kind))
    return metrics_for(sims, "full", recipe.data.captions_per_image).metrics


def train(recipe: Recipe, out_dir: Path, resume: bool = False, show_progress: bool = True) -> TrainResult:
    """Train a model as the recipe says; checkpoints and ``metrics.jsonl`` go to ``out_dir``."""
    from maxmatch_cli.features.store import open_store
    from maxmatch_cli.models import build_model

    dist.init()
    out_dir = Path(out_dir)
    last_path, best_path = out_dir / "last.safetensors", out_dir / "best.safetensors"
    state: dict[str, Any] = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best_rsum": None, "history": []}
    vocab_json = None
    ckpt = None
    if resume:
        if not last_path.is_file():
            raise MaxMatchError(f"--resume given but {last_path} does not exist",
                                hint="start without --resume, or point --out at the run to continue")
        ckpt = load_checkpoint(last_path)
        # The checkpoint's recipe, seed and step win; only the length of the run may change (to extend it), and
        # where its curves go (train.report_to: this run's value, which changes no result).
        resumed = ckpt.recipe.replace(**{"train.epochs": recipe.train.epochs,
                                         "train.max_steps": recipe.train.max_steps,
                                         "train.report_to": recipe.train.report_to})
        differing = _differences(resumed.to_dict(), recipe.to_dict())
        if differing:
            console.print(f"[yellow]warning:[/] ignoring recipe values that differ from the checkpoint's "
                          f"({', '.join(differing)}); resuming with the checkpoint's recipe")
        recipe, vocab_json, state = resumed, ckpt.vocab_json, {**state, **ckpt.train_state}
        saved_world = ckpt.provenance.get("world_size", 1)
        if saved_world != dist.world_size():
            console.print(f"[yellow]warning:[/] the checkpoint was trained by {saved_world} process(es), this run has "
                          f"{dist.world_size()}: train.batch_size is per process, so the global batch, the steps per "
                          f"epoch and the data order change from here on")
    if not recipe.data.path:
        raise MaxMatchError("the recipe names no feature file (data.path is empty)",
                            hint="add --set data.path=FEATURES.h5 (make one with `maxmatch extract-features`)")
    tracker_names = check_available(recipe.train.report_to)  # a missing package fails before any work
    torch.manual_seed(recipe.train.seed)
    device = resolve_device(recipe.train.device)
    if device.type == "cpu":
        set_cpu_threads(recipe.data.num_workers)
    store = open_store(recipe.data.path)
    if recipe.data.val_split and recipe.data.val_split not in store.splits:
        raise MaxMatchError(f"validation split '{recipe.data.val_split}' is not in {store.path} "
                            f"(splits: {', '.join(store.splits)})", hint="set data.val_split (empty disables it)")
    if recipe.data.val_split:  # a layout the evaluation cannot read fails now, not after the first epoch
        split_layout(store, recipe.data.val_split, recipe.data.captions_per_image)
    # Stored features, or image files for a CNN; checks that the store fits the encoder before the model is built.
    image_source = build_image_source(store, recipe, train=True)
    if recipe.model.image_encoder != "cnn" and store.feature_dim != recipe.model.image_feature_dim:
        raise MaxMatchError(f"{store.path} holds {store.feature_dim}-dimensional features but the recipe's "
                            f"model.image_feature_dim is {recipe.model.image_feature_dim}",
                            hint=f"add --set model.image_feature_dim={store.feature_dim}")
    train_images, train_caps = store.split(recipe.data.train_split)
    tokenizer = build_tokenizer(recipe.model.text_encoder, vocab_json=vocab_json, bert_path=recipe.model.bert_path,
                                captions=store.captions_text(train_caps), min_count=recipe.data.vocab_min_count)
    vocab_json = tokenizer.to_json() if hasattr(tokenizer, "to_json") else None
    model = build_model(recipe.model, getattr(tokenizer, "words", None), pretrained=ckpt is None).to(device)
    if ckpt is None:
        _decorrelate_ranks()  # after the weights, which are the same on every rank
    o = recipe.optim
    optimizer = torch.optim.AdamW(model.param_groups(o.lr, o.lr_scale_set, o.lr_scale_text, o.lr_scale_cnn,
                                                     o.weight_decay), lr=o.lr, weight_decay=o.weight_decay)
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]
    resume_rng = None
    if ckpt is not None:
        model.load_state_dict(ckpt.model_state)
        optimizer.load_state_dict(ckpt.optim_state)
        # The RNG states are those at the checkpoint's step boundary. At an epoch boundary they come before the
        # epoch's DataLoader iterator is made (which draws a seed from the CPU generator), so they are restored
        # now; mid-epoch, after it (below), as in the run that was interrupted.
        if state["step_in_epoch"] == 0:
            _set_rng_state(ckpt.rng_state, device)
        else:
            resume_rng = ckpt.rng_state
    model = dist.wrap(model, device)
    core = dist.unwrap(model)

    dataset = build_train_dataset(store, recipe, tokenizer, image_source)
    sampler = EpochSampler(len(dataset), recipe.train.batch_size, seed=recipe.train.seed, rank=dist.rank(),
                           world_size=dist.world_size())
    loader = DataLoader(dataset, batch_size=recipe.train.batch_size, sampler=sampler, collate_fn=dataset.collate,
                        num_workers=recipe.data.num_workers, persistent_workers=False,
                        pin_memory=device.type == "cuda", drop_last=True)
    steps_per_epoch = sampler.steps_per_epoch
    total_steps = steps_per_epoch * recipe.train.epochs
    if recipe.train.max_steps:
        total_steps = min(total_steps, recipe.train.max_steps)
    amp_dtype = torch.bfloat16 if device.type == "cuda" and recipe.train.amp else None
    prov = provenance(store.fingerprint(), {"world_size": dist.world_size()})
    is_main = dist.rank() == 0

    def save(path: Path, with_optim: bool, rng: dict[str, torch.Tensor] | None = None) -> None:
        """``rng``: the RNG states to resume from (default: the current ones)."""
        if is_main:
            save_checkpoint(path, core, recipe, vocab_json, prov, train_state=state,
                            optimizer=optimizer if with_optim else None,
                            rng_state=(rng or _rng_state(device)) if with_optim else None)

    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text(out_dir / "recipe.toml", to_toml(recipe))
    # Only rank 0 logs; a resumed run hides the events a crashed run logged after the checkpoint's step.
    purge_step = state["global_step"] + 1 if ckpt is not None else None
    trackers = (open_trackers(tracker_names, out_dir, config=recipe.to_dict(), name=out_dir.name,
                              purge_step=purge_step) if is_main else Trackers())
    start_time, interrupted, start_step = time.time(), False, state["global_step"]
    history_path = out_dir / "metrics.jsonl"
    steps_path = out_dir / "steps.jsonl"
    last_metrics = None
    # RNG states at the current step boundary: what a checkpoint taken before the next step completes must hold
    # (a Ctrl-C lands mid-step, after the next batch has drawn its dropout).
    step_rng = resume_rng if resume_rng is not None else _rng_state(device)
    try:
        with make_progress() as progress:
            global_bs = recipe.train.batch_size * dist.world_size()
            unit = "images" if recipe.data.batching == "images" else "pairs"
            task = progress.add_task("training", total=total_steps * global_bs,
                                     completed=state["global_step"] * global_bs, unit=unit, status="",
                                     visible=show_progress and is_main)
            while state["epoch"] < recipe.train.epochs and state["global_step"] < total_steps:
                epoch = state["epoch"]
                core.set_epoch(epoch)
                hardest = recipe.loss.hardest_negatives and epoch >= recipe.loss.warmup_epochs
                sampler.set_epoch(epoch, state["step_in_epoch"])
                if hasattr(dataset, "set_epoch"):
                    dataset.set_epoch(epoch)
                model.train()
                running: dict[str, float] = {}
                pending: list[tuple[int, float, dict[str, torch.Tensor]]] = []  # steps not yet read back
                step_rng = _rng_state(device)
                batches = iter(loader)
                if resume_rng is not None:
                    _set_rng_state(resume_rng, device)
                    step_rng, resume_rng = resume_rng, None
                for batch in batches:
                    batch = batch.to(device)
                    factor = lr_factor(state["global_step"], total_steps, steps_per_epoch, recipe)
                    for group in optimizer.param_groups:
                        group["lr"] = group["base_lr"] * factor
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        loss, parts = loss_on_batch(model, batch, recipe, hardest)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if o.grad_clip:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
                    optimizer.step()
                    step_rng = _rng_state(device)
                    state["global_step"] += 1
                    state["step_in_epoch"] += 1
                    # The loss parts stay on the device until the next log step: reading them every step would
                    # make the host wait for the GPU at every step (one sync per log_every steps instead).
                    pending.append((state["global_step"], optimizer.param_groups[0]["lr"], parts))
                    last_step = state["global_step"] >= total_steps or state["step_in_epoch"] >= steps_per_epoch
                    if state["global_step"] % recipe.train.log_every == 0 or last_step:
                        _flush_steps(pending, running, epoch, steps_path if is_main else None, trackers)
                        pending = []
                        progress.update(task, status=f"epoch {epoch + 1}/{recipe.train.epochs} "
                                        f"loss {running['total']:.3f}")
                    progress.update(task, advance=global_bs)
                    if not console.is_terminal and is_main and state["global_step"] % recipe.train.log_every == 0:
                        # Logs (CI, clusters) get a plain line where a terminal gets the live bar.
                        elapsed = max(time.time() - start_time, 1e-9)
                        done = state["global_step"] - start_step
                        eta = (total_steps - state["global_step"]) * elapsed / max(done, 1)
                        console.print(f"step {state['global_step']}/{total_steps}  epoch {epoch + 1}  "
                                      f"loss {running['total']:.4f}  {done * global_bs / elapsed:,.0f} {unit}/s  "
                                      f"eta {eta / 60:.1f} min")
                    if state["global_step"] >= total_steps:
                        break
                if pending:  # an epoch cut short (max_steps) still records its steps
                    _flush_steps(pending, running, epoch, steps_path if is_main else None, trackers)
                epoch_done = state["step_in_epoch"] >= steps_per_epoch
                if epoch_done:
                    state["epoch"] += 1
                    state["step_in_epoch"] = 0
                record = {"epoch": state["epoch"], "step": state["global_step"],
                          "lr": optimizer.param_groups[0]["lr"], **{f"loss/{k}": v for k, v in running.items()}}
                run_val = recipe.data.val_split and is_main and (
                    state["epoch"] % recipe.train.val_every == 0 or state["global_step"] >= total_steps)
                if run_val:
                    last_metrics = _validate(core, store, recipe, tokenizer, device)
                    record.update({f"val/{k}": v for k, v in last_metrics.items()})
                    trackers.log({f"val/{k}": v for k, v in last_metrics.items()}, state["global_step"])
                    progress.console.print(
                        f"epoch {state['epoch']:>3}  step {state['global_step']:>6}  "
                        f"loss {running.get('total', float('nan')):.4f}  val rsum {last_metrics['rsum']:.2f}  "
                        f"i2t R@1 {last_metrics['i2t_r1']:.1f}  t2i R@1 {last_metrics['t2i_r1']:.1f}")
                    if state["best_rsum"] is None or last_metrics["rsum"] > state["best_rsum"]:
                        state["best_rsum"] = last_metrics["rsum"]
                        save(best_path, with_optim=False)
                state["history"].append(record)
                if is_main:
                    with history_path.open("a") as fh:
                        fh.write(json.dumps(record) + "\n")
                # Mid-epoch (max_steps reached) a resumed run restarts from this step, so the validation's draws
                # must not be in the saved states.
                save(last_path, with_optim=True, rng=None if epoch_done else step_rng)
    except KeyboardInterrupt:
        interrupted = True
        with _sigint_ignored():
            save(last_path, with_optim=True, rng=step_rng)
        console.print(f"[yellow]interrupted[/] at step {state['global_step']}; saved {last_path} "
                      f"(continue with --resume)")
    finally:
        trackers.close()  # flushes the event files, also after Ctrl-C or an error
    if is_main and not recipe.data.val_split and not interrupted:
        save(best_path, with_optim=False)
    dist.barrier()
    return TrainResult(out_dir, state["best_rsum"], last_metrics, state["global_step"], time.time() - start_time,
                       interrupted)
