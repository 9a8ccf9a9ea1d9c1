"""One training loop for every recipe: the :class:`Trainer`, in named phases, and :func:`train`, which runs it.

Each step encodes a batch of images and their captions (or of (image, caption) pairs, ``data.batching``) into
sets, scores every image against every caption with the recipe's set similarity, and minimises eq. 5. Under
torchrun each process encodes its share of the global batch; set embeddings are gathered with gradients so hardest
negatives are mined over the global batch (see :mod:`maxmatch_cli.training.distributed`). Validation RSUM picks
``best.safetensors``; ``last.safetensors`` carries the optimiser and RNG state so ``--resume`` continues exactly
where a run stopped (also after Ctrl-C): weights, optimiser, step, learning rate and data order always; the random
draws too at an epoch boundary, and mid-epoch with ``data.num_workers=0`` (DataLoader workers restart their
augmentation streams). What is saved and restored is defined in :mod:`maxmatch_cli.training.state`; under torchrun
the checkpoint holds rank 0's RNG state and the other ranks derive their own streams from it
(tests/training/test_resume.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from maxmatch_cli.training import distributed as dist
from maxmatch_cli.models.checkpoint import provenance, save_checkpoint
from maxmatch_cli.data.datasets import ImageCaptionsDataset, PairDataset, split_layout
from maxmatch_cli.data.images import build_image_source
from maxmatch_cli.data.samplers import EpochSampler
from maxmatch_cli.data.tokenizers import build_tokenizer
from maxmatch_cli.devices import resolve_device as _resolve_device
from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.fileio import DiskFullError, free_space, is_disk_full, write_text
from maxmatch_cli.evaluation.encoding import encode_split, score, similarity_options
from maxmatch_cli.evaluation.protocols import metrics_for
from maxmatch_cli.method.losses import LossWeights, set_mmd, total_loss
from maxmatch_cli.progress import console, make_progress
from maxmatch_cli.config.recipes import Recipe, to_toml
from maxmatch_cli.method.similarity import set_similarity
from maxmatch_cli.training.interrupts import (Terminated, sigint_deferred, sigint_ignored, sigterm_interrupts,
                                             worker_ignores_sigterm, workers_started)
from maxmatch_cli.training.rundir import discard_unsaved_run, run_lock
from maxmatch_cli.training.runlog import RunLog, cut_history
from maxmatch_cli.training.schedule import lr_factor, remember_base_lr, set_lr
from maxmatch_cli.training.state import (TrainState, decorrelate_ranks, load_resume, restore_training_state,
                                         rng_state, set_rng_state)
from maxmatch_cli.training.tracking import Trackers, check_available, open_trackers

__all__ = ["Trainer", "TrainResult", "train", "loss_on_batch", "lr_factor", "build_train_dataset",
           "resolve_device", "set_cpu_threads", "Terminated", "sigterm_interrupts"]


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


def _buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the module's buffers (BatchNorm running statistics and counts, which a forward pass updates)."""
    return {name: b.detach().clone() for name, b in module.named_buffers()}


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
    exit_status: int = 0
    """What the command exits with: 0, or after an interrupt 130 (Ctrl-C) or 143 (SIGTERM)."""


def _validate(model, store, recipe: Recipe, tokenizer, device) -> dict[str, float]:
    emb = encode_split(model, store, recipe.data.val_split, tokenizer, recipe.data.captions_per_image, device,
                       batch_size=recipe.eval.batch_size, max_len=recipe.data.max_caption_len,
                       max_images=recipe.train.val_max_images or None, show_progress=False,
                       image_source=build_image_source(store, recipe, train=False))
    # The test-time similarity (the paper recipes: §3.4's top-k), so `best` is chosen on the inference reported.
    kind = recipe.eval.similarity or recipe.loss.similarity
    sims = score(emb.images, emb.captions, kind, device, recipe.eval.block_size, **similarity_options(recipe, kind))
    return metrics_for(sims, "full", recipe.data.captions_per_image).metrics


class Trainer:
    """One training run, in named phases: :meth:`setup`, :meth:`train` (with :meth:`validate` and
    :meth:`save_checkpoint` at each epoch's end), :meth:`cleanup` and :meth:`finish`. The same class trains every
    recipe, in one process or under torchrun.

    What a resumed run restores lives in :mod:`maxmatch_cli.training.state`, the learning rate in
    :mod:`maxmatch_cli.training.schedule`, and what the run reports in :mod:`maxmatch_cli.training.runlog`.

    Args:
        recipe: The resolved recipe (on resume, the checkpoint's recipe replaces it; see :func:`load_resume`).
        out_dir: The run folder.
        resume: Continue the run in ``out_dir`` from its ``last.safetensors``.
        show_progress: Show the progress bar (rank 0 only).
    """

    def __init__(self, recipe: Recipe, out_dir: Path, resume: bool = False, show_progress: bool = True):
        self.recipe = recipe
        self.out_dir = Path(out_dir)
        self.resume = resume
        self.show_progress = show_progress
        self.last_path, self.best_path = self.out_dir / "last.safetensors", self.out_dir / "best.safetensors"
        self.state = TrainState()
        self.last_metrics: dict[str, float] | None = None
        self.interrupted = False
        self.exit_status = 0
        self._epoch_end: tuple[float | None, int] | None = None
        """While an epoch's steps are done but its end is not: (best RSUM, history length) before the end began."""

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Everything before the first step, in an order that fixes the random draws: the resumed state, checks
        that fail before any work, the seed, the feature store and tokenizer, the model, the optimiser (and the
        checkpoint's weights, optimiser and RNG states), the data, and the run folder's logs."""
        dist.init()
        self.vocab_json, self._ckpt = None, None
        if self.resume:
            resumed = load_resume(self.last_path, self.recipe)
            self.recipe, self.vocab_json, self.state, self._ckpt = (resumed.recipe, resumed.vocab_json,
                                                                    resumed.state, resumed.checkpoint)
        if not self.recipe.data.path:
            raise MaxMatchError("the recipe names no feature file (data.path is empty)",
                                hint="add --set data.path=FEATURES.h5 (make one with `maxmatch extract-features`)")
        tracker_names = check_available(self.recipe.train.report_to)  # a missing package fails before any work
        torch.manual_seed(self.recipe.train.seed)
        self.device = resolve_device(self.recipe.train.device)
        if self.device.type == "cpu":
            set_cpu_threads(self.recipe.data.num_workers)
        self._setup_store()
        self._setup_model()
        self._setup_optimizer()
        self._resume_rng = None
        if self._ckpt is not None:
            self._resume_rng = restore_training_state(self._ckpt, self.core, self.optimizer, self.device, self.state)
            self._ckpt = None  # its tensors are in the model and optimiser now
        self.model = dist.wrap(self.core, self.device)
        self._setup_data()
        self._setup_logging(tracker_names)
        # RNG states at the current step boundary: what a checkpoint taken before the next step completes must
        # hold (a Ctrl-C lands mid-step, after the next batch has drawn its dropout).
        self.step_rng = self._resume_rng if self._resume_rng is not None else rng_state(self.device)

    def _setup_store(self) -> None:
        """Open the feature file, check that it fits the recipe, and build the image source and tokenizer."""
        from maxmatch_cli.features.store import open_store

        r = self.recipe
        self.store = store = open_store(r.data.path)
        if r.data.val_split and r.data.val_split not in store.splits:
            raise MaxMatchError(f"validation split '{r.data.val_split}' is not in {store.path} "
                                f"(splits: {', '.join(store.splits)})", hint="set data.val_split (empty disables it)")
        if r.data.val_split:  # a layout the evaluation cannot read fails now, not after the first epoch
            split_layout(store, r.data.val_split, r.data.captions_per_image)
        # Stored features, or image files for a CNN; checks that the store fits the encoder before the model is built.
        self.image_source = build_image_source(store, r, train=True)
        if r.model.image_encoder != "cnn" and store.feature_dim != r.model.image_feature_dim:
            raise MaxMatchError(f"{store.path} holds {store.feature_dim}-dimensional features but the recipe's "
                                f"model.image_feature_dim is {r.model.image_feature_dim}",
                                hint=f"add --set model.image_feature_dim={store.feature_dim}")
        _, train_caps = store.split(r.data.train_split)
        self.tokenizer = build_tokenizer(r.model.text_encoder, vocab_json=self.vocab_json, bert_path=r.model.bert_path,
                                         captions=store.captions_text(train_caps), min_count=r.data.vocab_min_count)
        self.vocab_json = self.tokenizer.to_json() if hasattr(self.tokenizer, "to_json") else None

    def _setup_model(self) -> None:
        """Build the model on the device (pretrained parts only for a new run: a resumed one loads its weights)."""
        from maxmatch_cli.models import build_model

        self.core = build_model(self.recipe.model, getattr(self.tokenizer, "words", None),
                                pretrained=self._ckpt is None).to(self.device)
        if self._ckpt is None:
            decorrelate_ranks()  # after the weights, which are the same on every rank

    def _setup_optimizer(self) -> None:
        """AdamW over the model's parameter groups (each with its learning-rate scale)."""
        o = self.recipe.optim
        self.optimizer = torch.optim.AdamW(
            self.core.param_groups(o.lr, o.lr_scale_set, o.lr_scale_text, o.lr_scale_cnn, o.weight_decay),
            lr=o.lr, weight_decay=o.weight_decay)
        remember_base_lr(self.optimizer)

    def _setup_data(self) -> None:
        """The training set, its epoch sampler (this rank's share, from the saved step on) and the DataLoader."""
        r = self.recipe
        self.dataset = build_train_dataset(self.store, r, self.tokenizer, self.image_source)
        self.sampler = EpochSampler(len(self.dataset), r.train.batch_size, seed=r.train.seed, rank=dist.rank(),
                                    world_size=dist.world_size())
        self.loader = DataLoader(self.dataset, batch_size=r.train.batch_size, sampler=self.sampler,
                                 collate_fn=self.dataset.collate, num_workers=r.data.num_workers,
                                 worker_init_fn=worker_ignores_sigterm if r.data.num_workers else None,
                                 persistent_workers=False, pin_memory=self.device.type == "cuda", drop_last=True)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.total_steps = self.steps_per_epoch * r.train.epochs
        if r.train.max_steps:
            self.total_steps = min(self.total_steps, r.train.max_steps)
        self.amp_dtype = torch.bfloat16 if self.device.type == "cuda" and r.train.amp else None

    def _setup_logging(self, tracker_names: list[str]) -> None:
        """Write ``recipe.toml`` and open the logs (rank 0 writes; the others only keep count)."""
        self.provenance = provenance(self.store.fingerprint(), {"world_size": dist.world_size()})
        self.is_main = dist.rank() == 0
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_text(self.out_dir / "recipe.toml", to_toml(self.recipe))
        # A resumed run hides the events a crashed run logged after the checkpoint's step.
        purge_step = self.state.global_step + 1 if self.resume else None
        if self.resume and self.is_main:
            for note in cut_history(self.out_dir, self.state.global_step, self.state.history):
                console.print(f"[yellow]note:[/] cut back to the checkpoint: {note}")
        if self.is_main:
            from maxmatch_cli.training.rundir import remove_stale_temps_of_run

            for path in remove_stale_temps_of_run(self.out_dir):
                console.print(f"[yellow]note:[/] removed {path}, left by a run that was killed while writing it")
        trackers = (open_trackers(tracker_names, self.out_dir, config=self.recipe.to_dict(), name=self.out_dir.name,
                                  purge_step=purge_step) if self.is_main else Trackers())
        self.log = RunLog(self.out_dir, trackers, is_main=self.is_main, total_steps=self.total_steps,
                          epochs=self.recipe.train.epochs, log_every=self.recipe.train.log_every,
                          global_batch=self.recipe.train.batch_size * dist.world_size(),
                          unit="images" if self.recipe.data.batching == "images" else "pairs",
                          start_step=self.state.global_step)

    # ------------------------------------------------------------------------------------------------ train
    def train(self) -> None:
        """The loop over epochs, until ``train.epochs`` or ``train.max_steps``; a Ctrl-C saves the run to resume."""
        self._boundary_buffers = _buffers(self.core)  # the buffers at the last step boundary (see _train_step)
        try:
            with make_progress() as progress:
                self.log.attach(progress, self.show_progress, self.state.global_step)
                if self.state.epoch_end_due:
                    self._redo_epoch_end()
                while self.state.epoch < self.recipe.train.epochs and self.state.global_step < self.total_steps:
                    epoch_done = self._train_epoch()
                    self._end_epoch(epoch_done)
        except KeyboardInterrupt as exc:
            self._save_interrupted(getattr(exc, "exit_status", 130))

    def _train_epoch(self) -> bool:
        """The current epoch's steps (from the saved step on, up to ``train.max_steps``); True if it completed."""
        s, epoch = self.state, self.state.epoch
        self.core.set_epoch(epoch)
        hardest = self.recipe.loss.hardest_negatives and epoch >= self.recipe.loss.warmup_epochs
        self.sampler.set_epoch(epoch, s.step_in_epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        self.model.train()
        self.log.start_epoch(s.running_loss if s.step_in_epoch else None)  # mid-epoch resume: the saved losses
        # The states an interrupt before the first step saves (mid-epoch resume: the checkpoint's, restored below).
        self.step_rng = rng_state(self.device) if self._resume_rng is None else self._resume_rng
        with workers_started():
            batches = iter(self.loader)
        if self._resume_rng is not None:  # mid-epoch resume: the states after the iterator drew its seed
            set_rng_state(self._resume_rng, self.device)
            self.step_rng, self._resume_rng = self._resume_rng, None
        for batch in batches:
            self._train_step(batch, hardest)
            last_step = s.global_step >= self.total_steps or s.step_in_epoch >= self.steps_per_epoch
            with sigint_deferred():  # reading the losses back and appending them to steps.jsonl
                self.log.step(s.global_step, epoch, last_step)
            if s.global_step >= self.total_steps:
                break
        self.log.end_epoch(epoch)
        epoch_done = s.step_in_epoch >= self.steps_per_epoch
        with sigint_deferred():  # both counters or neither (an interrupt in between would count the epoch twice)
            if epoch_done:
                s.epoch += 1
                s.step_in_epoch = 0
        return epoch_done

    def _train_step(self, batch, hardest: bool) -> dict[str, torch.Tensor]:
        """One optimiser step on a batch; returns the loss parts (still on the device)."""
        batch = batch.to(self.device)
        set_lr(self.optimizer, lr_factor(self.state.global_step, self.total_steps, self.steps_per_epoch, self.recipe))
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            loss, parts = loss_on_batch(self.model, batch, self.recipe, hardest)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.recipe.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.optim.grad_clip)
        # Until here the step changed only the buffers (the forward pass), the gradients and the RNG states, which a
        # Ctrl-C puts back to the step boundary; from here on it is applied whole.
        with sigint_deferred():
            self.optimizer.step()
            self.step_rng = rng_state(self.device)
            self.state.global_step += 1
            self.state.step_in_epoch += 1
            self.log.record(self.state.global_step, self.optimizer.param_groups[0]["lr"], parts)
            self._boundary_buffers = _buffers(self.core)
            if self.state.step_in_epoch >= self.steps_per_epoch or self.state.global_step >= self.total_steps:
                self._epoch_end = (self.state.best_rsum, len(self.state.history))  # the epoch's end is due
        return parts

    def _end_epoch(self, epoch_done: bool) -> None:
        """After an epoch (or a run cut short): its record, validation when due, best and last checkpoints.

        An interrupt before ``last`` is saved saves the state from before this end, marked ``epoch_end_due``
        (:meth:`_save_interrupted`), and the resumed run does it again (:meth:`_redo_epoch_end`)."""
        s = self.state
        if self._epoch_end is None:  # (set by the epoch's last step; not when a run resumed after all its steps)
            self._epoch_end = (s.best_rsum, len(s.history))
        record = self.log.epoch_record(s.epoch, s.global_step, self.optimizer.param_groups[0]["lr"])
        # A run cut short (not epoch_done) ended at train.max_steps, so it validates; `or not epoch_done` says so
        # for a resumed run that redoes that end with a longer train.max_steps.
        due = s.epoch % self.recipe.train.val_every == 0 or s.global_step >= self.total_steps or not epoch_done
        if self.recipe.data.val_split and self.is_main and due:
            metrics = self.validate()
            record.update({f"val/{k}": v for k, v in metrics.items()})
            if s.best_rsum is None or metrics["rsum"] > s.best_rsum:
                s.best_rsum = metrics["rsum"]
                self.save_checkpoint(self.best_path, with_optim=False)
        s.history.append(record)
        self.log.write_record(record)
        # Mid-epoch (max_steps reached) a resumed run restarts from this step, so the validation's draws must not
        # be in the saved states.
        self.save_checkpoint(self.last_path, with_optim=True, rng=None if epoch_done else self.step_rng)
        self._epoch_end = None

    def _redo_epoch_end(self) -> None:
        """A resumed run whose interrupted one stopped during an epoch's end: do that end now, as the interrupted
        run would have, from the same state (weights, smoothed losses, RNG states at the epoch's last step)."""
        s = self.state
        with sigint_deferred():  # an interrupt from here on saves the same state again (see _save_interrupted)
            self.log.start_epoch(s.running_loss)  # the epoch's smoothed losses, for its record
            self._epoch_end = (s.best_rsum, len(s.history))
            s.epoch_end_due = False
        if self._resume_rng is not None:  # cut short mid-epoch: the states at its last step (kept for a longer run)
            set_rng_state(self._resume_rng, self.device)
        self._end_epoch(epoch_done=s.step_in_epoch == 0)

    # ------------------------------------------------------------------------------------ validate and save
    def validate(self) -> dict[str, float]:
        """Recall on ``data.val_split`` (rank 0), logged and printed; returns the metrics."""
        self.last_metrics = _validate(self.core, self.store, self.recipe, self.tokenizer, self.device)
        self.log.validation(self.last_metrics, self.state.epoch, self.state.global_step)
        return self.last_metrics

    def save_checkpoint(self, path: Path, with_optim: bool, rng: dict[str, torch.Tensor] | None = None) -> None:
        """Write a checkpoint (rank 0): ``with_optim`` adds what a resume needs (optimiser and RNG states).

        Args:
            path: Where to write it.
            with_optim: Add the optimiser state and the RNG states (``last.safetensors``).
            rng: The RNG states to resume from (default: the current ones).
        """
        # Mid-epoch (or before the epoch's end), the smoothed losses so far, for a resumed run's epoch record.
        due = self.state.step_in_epoch or self.state.epoch_end_due
        self.state.running_loss = dict(self.log.running) if due else {}
        if self.is_main:
            save_checkpoint(path, self.core, self.recipe, self.vocab_json, self.provenance,
                            train_state=self.state.to_dict(), optimizer=self.optimizer if with_optim else None,
                            rng_state=(rng or rng_state(self.device)) if with_optim else None)

    def _save_interrupted(self, exit_status: int = 130) -> None:
        """Ctrl-C or SIGTERM: save the state at the last step boundary, immune to the second SIGINT torchrun
        forwards. Between an epoch's last step and the end of its end (validation, record, checkpoints), the
        state from before that end, marked ``epoch_end_due``: the resumed run does the end again."""
        self.interrupted, self.exit_status = True, exit_status
        with sigint_ignored():
            # Undo what the unfinished step did (its forward pass updated the BatchNorm statistics) and write the
            # finished steps' losses, so that the saved state is exactly the last step boundary's.
            for name, buffer in self.core.named_buffers():
                buffer.copy_(self._boundary_buffers[name])
            self.log.end_epoch(self.state.epoch)
            if self._epoch_end is not None:
                s = self.state
                s.best_rsum, kept = self._epoch_end
                del s.history[kept:]
                if s.step_in_epoch >= self.steps_per_epoch:  # _train_epoch had not counted the epoch yet
                    s.epoch, s.step_in_epoch = s.epoch + 1, 0
                s.epoch_end_due = True
            self.save_checkpoint(self.last_path, with_optim=True, rng=self.step_rng)
        what = "terminated (SIGTERM)" if exit_status == Terminated.exit_status else "interrupted"
        console.print(f"[yellow]{what}[/] at step {self.state.global_step}; saved {self.last_path} "
                      f"(continue with --resume)")

    def out_of_space(self, exc: Exception) -> DiskFullError:
        """A full disk stopped the run: the file that did not fit, and what of the run is kept.

        A run that never saved ``last.safetensors`` cannot be resumed, so its files are removed: the same command
        then starts it again. Otherwise the last checkpoint is whole and ``--resume`` continues from it.
        """
        if isinstance(exc, DiskFullError):
            path, needed, free = exc.path, exc.needed, exc.free
        else:
            path, needed = getattr(exc, "filename", None) or self.out_dir, None
            free = free_space(path)  # before the removal below, which frees some
        if self.last_path.is_file():
            hint = (f"{self.last_path} is whole (the run up to its last checkpoint): free some space, then continue "
                    f"with the same command and --resume")
        else:
            removed = discard_unsaved_run(self.out_dir)
            gone = f" ({', '.join(p.name for p in removed)})" if removed else ""
            hint = (f"no checkpoint of this run had been saved, so the files it wrote were removed{gone}: free some "
                    f"space, then run the same command again")
        return DiskFullError(path, needed, hint, free)

    # ------------------------------------------------------------------------------------------- the end
    def _warn_at_chance(self) -> None:
        """A run whose final validation is no better than a random ranking says so, and what to try."""
        from maxmatch_cli.evaluation.chance import at_chance

        r = self.recipe
        n = len(split_layout(self.store, r.data.val_split, r.data.captions_per_image)[0])
        sentence = at_chance(self.last_metrics, min(n, r.train.val_max_images or n), r.data.captions_per_image)
        if sentence:
            console.print(f"[yellow]warning:[/] the final validation {sentence}: the model learnt nothing. Try "
                          f"more epochs (train.epochs), a warm-up before hardest negatives (loss.warmup_epochs=1 "
                          f"or 2: hardest negatives from the first step can leave a small model at chance), or a "
                          f"lower optim.lr.", soft_wrap=True)

    def cleanup(self) -> None:
        """Close the trackers (flushes their files; also after Ctrl-C or an error)."""
        self.log.close()

    def finish(self) -> TrainResult:
        """Without validation the last weights are the best ones; wait for every rank (not after an interrupt)
        and report."""
        if self.is_main and not self.recipe.data.val_split and not self.interrupted:
            self.save_checkpoint(self.best_path, with_optim=False)
        if self.is_main and self.last_metrics and not self.interrupted:
            self._warn_at_chance()
        if not self.interrupted:  # after an interrupt another rank may be stuck in a collective this one left
            dist.barrier()
        return TrainResult(self.out_dir, self.state.best_rsum, self.last_metrics, self.state.global_step,
                           self.log.elapsed(), self.interrupted, self.exit_status)


def train(recipe: Recipe, out_dir: Path, resume: bool = False, show_progress: bool = True) -> TrainResult:
    """Train a model as the recipe says; checkpoints, ``metrics.jsonl`` and ``steps.jsonl`` go to ``out_dir``.

    Args:
        recipe: The resolved recipe.
        out_dir: The run folder (made if needed).
        resume: Continue the run in ``out_dir`` from its ``last.safetensors``.
        show_progress: Show the progress bar.

    Returns:
        The run's outcome (also after Ctrl-C or SIGTERM, with ``interrupted`` and ``exit_status`` set).
    """
    trainer = Trainer(recipe, out_dir, resume=resume, show_progress=show_progress)
    # SIGTERM takes Ctrl-C's path (save, release the lock); one run folder's writer (re-entrant: `maxmatch train`
    # took it already)
    with sigterm_interrupts(), run_lock(out_dir):
        trainer.setup()
        try:
            trainer.train()
        except Exception as exc:
            if is_disk_full(exc):  # one message: what did not fit, what of the run is kept, how to go on
                raise trainer.out_of_space(exc) from None
            raise
        finally:
            trainer.cleanup()
        return trainer.finish()
