"""Evaluation: encode a split once, score every image against every caption in blocks, report Recall@K.

Protocols (DESIGN §4): ``full`` scores all images of the split against all their captions (Flickr30K 1K test,
or any split); ``coco5k`` is ``full`` on the 5,000-image COCO test; ``coco1k`` averages the metrics over 5 folds
of 1,000 consecutive images. ``auto`` reports coco5k with the 1K folds for a 5,000-image split, else full.
``eccv`` and ``cxc`` (``maxmatch evaluate`` only) are coco5k plus the ECCV Caption or CxC metrics of the
``eccv-caption`` package, which need the split's COCO image and caption annotation ids
(:mod:`maxmatch_cli.evaluation.eccv`).

Embeddings are encoded once per (checkpoint, feature file, split) and cached in a safetensors file under
``embeddings/`` next to the checkpoint (:func:`checkpoint_embeddings`); the cache is keyed by the checkpoint's
size and mtime, the feature file's fingerprint, the split and the package version, so a retrained checkpoint or a
changed feature file is re-encoded. ``ensemble`` (paper §4.2) averages the similarity matrices of several
checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from maxmatch_cli.models.checkpoint import Checkpoint, load_checkpoint
from maxmatch_cli.data.datasets import (CaptionDataset, ImageDataset, ImageSource, TextTokenizer, build_image_source,
                               build_tokenizer, check_image_input, split_layout)
from maxmatch_cli.devices import resolve_device
from maxmatch_cli.evaluation.eccv import ECCV_PROTOCOLS, CocoIds, coco_metrics, require_package, split_coco_ids
from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.fileio import atomic_write, write_text
from maxmatch_cli.evaluation.metrics import coco_1k_folds, retrieval_metrics
from maxmatch_cli.progress import make_progress
from maxmatch_cli.config.recipes import Recipe
from maxmatch_cli.method.similarity import set_similarity


@dataclass
class Embeddings:
    """Set embeddings of one split: images (N, K, D) and captions (N·cpi, K, D), on the CPU, float32."""

    images: torch.Tensor
    captions: torch.Tensor
    image_indices: np.ndarray
    caption_indices: np.ndarray


@dataclass
class EvalResult:
    """Metrics of one similarity matrix under a protocol, and what produced them."""

    protocol: str
    metrics: dict[str, float]
    folds: list[dict[str, float]] = field(default_factory=list)
    folds_mean: dict[str, float] | None = None
    n_images: int = 0
    n_captions: int = 0
    similarity: str = ""
    checkpoint: str = ""
    split: str = ""
    data: str | list[str] = ""
    """Feature file (an ensemble whose members read different files: their list)."""
    provenance: dict[str, Any] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    """Files written while evaluating (the embedding cache, --json, --csv), in order."""

    def to_json(self) -> dict[str, Any]:
        """DESIGN §5's {"protocol", "metrics", "folds"} and what the numbers come from (unrounded)."""
        out: dict[str, Any] = {"protocol": self.protocol, "metrics": self.metrics, "folds": self.folds}
        if self.folds_mean is not None:
            out["folds_mean"] = self.folds_mean
        out.update({"checkpoint": self.checkpoint, "split": self.split, "data": self.data,
                    "similarity": self.similarity, "n_images": self.n_images, "n_captions": self.n_captions,
                    "provenance": self.provenance})
        return out


PROTOCOLS = ("auto", "full", "coco1k", "coco5k")
"""Evaluation protocols (module docstring); ``evaluate`` also takes :data:`~maxmatch_cli.evaluation.eccv.ECCV_PROTOCOLS`."""
COCO_TEST_IMAGES = 5000
"""Images of the COCO 5K test split, the only split coco1k and coco5k apply to."""
METRIC_DECIMALS = 2
"""Decimals of every metric in the files written (recalls in %, ranks, RSUM): the paper reports one."""


def check_protocol(protocol: str, extra: tuple[str, ...] = ()) -> str:
    """Refuse a protocol name that is not one of :data:`PROTOCOLS` or ``extra`` (what the caller also takes)."""
    if protocol in ECCV_PROTOCOLS and protocol not in extra:
        raise MaxMatchError(f"protocol {protocol} is computed by `maxmatch evaluate` and `ensemble` only",
                            hint=f"use `maxmatch evaluate CKPT --protocol {protocol}`, or here one of: "
                                 f"{', '.join(PROTOCOLS)}")
    allowed = PROTOCOLS + tuple(extra)
    if protocol not in allowed:
        raise MaxMatchError(f"unknown protocol '{protocol}'", hint=f"use one of: {', '.join(allowed)}")
    return protocol


def resolve_protocol(protocol: str, n_images: int, split: str | None = None) -> str:
    """The protocol to apply to a split of ``n_images`` images: ``auto`` resolved, a misfit refused.

    coco1k and coco5k are defined on the 5,000-image COCO test split only; on any other size they would average a
    different number of folds (or one) under the COCO name, so they are an error naming the split. So are eccv and
    cxc (whose ids :func:`~maxmatch_cli.evaluation.eccv.split_coco_ids` checks in full).
    """
    check_protocol(protocol, ECCV_PROTOCOLS)
    if protocol == "auto":
        return "coco5k" if n_images == COCO_TEST_IMAGES else "full"
    if protocol in ECCV_PROTOCOLS and n_images != COCO_TEST_IMAGES:
        where = f"split '{split}'" if split else "the similarity matrix"
        raise MaxMatchError(f"protocol {protocol} needs the {COCO_TEST_IMAGES:,}-image COCO 5K test split that ECCV "
                            f"Caption and CxC annotate, but {where} has {n_images:,} images",
                            hint="use --split testall (or test) of a COCO feature file, or --protocol full")
    if protocol in ("coco1k", "coco5k") and n_images != COCO_TEST_IMAGES:
        where = f"split '{split}'" if split else "the similarity matrix"
        raise MaxMatchError(f"protocol {protocol} needs the {COCO_TEST_IMAGES:,}-image COCO test split, but {where} "
                            f"has {n_images:,} images",
                            hint="use --protocol full (all images against all their captions) or auto for this split")
    return protocol


def rounded(metrics: dict[str, float]) -> dict[str, float]:
    """Metrics rounded to :data:`METRIC_DECIMALS` for the files written (the returned values stay exact)."""
    return {key: round(float(value), METRIC_DECIMALS) for key, value in metrics.items()}


def _rounded_record(record: dict[str, Any]) -> dict[str, Any]:
    out = dict(record)
    for key in ("metrics", "folds_mean"):
        if out.get(key) is not None:
            out[key] = rounded(out[key])
    out["folds"] = [rounded(fold) for fold in out.get("folds", [])]
    if "members" in out:
        out["members"] = [_rounded_record(member) for member in out["members"]]
    return out


def eval_provenance(ckpt: Checkpoint | None = None) -> dict[str, Any]:
    """What an evaluation file records of its origin: the checkpoint's provenance, this maxmatch, the date."""
    from maxmatch_cli import __version__

    out: dict[str, Any] = {"checkpoint": ckpt.provenance} if ckpt is not None else {}
    out.update({"maxmatch_version": __version__,
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    return out


def similarity_options(recipe: Recipe, kind: str) -> dict[str, Any]:
    """The recipe's options for a similarity kind (only those that kind takes)."""
    return {"chamfer": {"alpha": recipe.loss.chamfer_alpha},
            "topk": {"k": recipe.loss.topk_k or None},
            "sinkhorn": {"tau": recipe.loss.sinkhorn_tau, "iters": recipe.loss.sinkhorn_iters}}.get(kind, {})


@torch.no_grad()
def encode_split(model, store, split: str, tokenizer: TextTokenizer, captions_per_image: int, device: torch.device,
                 batch_size: int = 256, max_len: int = 64, max_images: int | None = None, num_workers: int = 0,
                 show_progress: bool = True, image_source: ImageSource | None = None) -> Embeddings:
    """Encode each image and each caption of a split once (model in eval mode).

    ``image_source`` is where images come from (:func:`~maxmatch_cli.data.datasets.build_image_source`; default: the
    store's features); image files for a CNN need it, with the recipe's image size.
    """
    images, captions = split_layout(store, split, captions_per_image)
    if max_images is not None and max_images < len(images):
        images, captions = images[:max_images], captions[: max_images * captions_per_image]
    was_training = model.training
    model.eval()
    img_ds = ImageDataset(store, images, image_source)
    img_loader = DataLoader(img_ds, batch_size=batch_size, num_workers=num_workers, collate_fn=img_ds.collate)
    cap_ds = CaptionDataset(store.captions_text(captions), tokenizer, max_len)
    cap_loader = DataLoader(cap_ds, batch_size=batch_size, num_workers=0, collate_fn=cap_ds.collate)
    img_out, cap_out = [], []
    with make_progress(transient=True) as progress:
        task = progress.add_task("encoding images", total=len(images), unit="img", status="",
                                 visible=show_progress)
        for feats, mask in img_loader:
            mask = None if mask is None else mask.to(device)  # None: pixels
            img_out.append(model.encode_images(feats.to(device), mask).sets.float().cpu())
            progress.advance(task, feats.shape[0])
        task = progress.add_task("encoding captions", total=len(captions), unit="cap", status="",
                                 visible=show_progress)
        for tokens, tmask in cap_loader:
            cap_out.append(model.encode_texts(tokens.to(device), tmask.to(device)).sets.float().cpu())
            progress.advance(task, tokens.shape[0])
    model.train(was_training)
    return Embeddings(torch.cat(img_out), torch.cat(cap_out), images, captions)


@torch.no_grad()
def score(emb_images: torch.Tensor, emb_captions: torch.Tensor, kind: str, device: torch.device,
          block_size: int = 256, show_progress: bool = False, **options) -> torch.Tensor:
    """(N, M) set similarities, computed in row blocks on ``device`` and gathered on the CPU."""
    txt = emb_captions.to(device)
    out = torch.empty(emb_images.shape[0], emb_captions.shape[0])
    with make_progress(transient=True) as progress:
        task = progress.add_task(f"scoring ({kind})", total=emb_images.shape[0], unit="img", status="",
                                 visible=show_progress)
        for start in range(0, emb_images.shape[0], block_size):
            block = emb_images[start: start + block_size].to(device)
            out[start: start + block.shape[0]] = set_similarity(block, txt, kind=kind, **options).float().cpu()
            progress.advance(task, block.shape[0])
    return out


def metrics_for(sims: torch.Tensor, protocol: str, captions_per_image: int,
                coco_ids: CocoIds | None = None) -> EvalResult:
    """Apply an evaluation protocol (:func:`resolve_protocol`) to a full similarity matrix.

    eccv and cxc report coco5k's metrics and folds plus their own keys, and need ``coco_ids`` (the COCO ids of
    the rows and columns, :func:`~maxmatch_cli.evaluation.eccv.split_coco_ids`).
    """
    n_images = sims.shape[0]
    protocol = resolve_protocol(protocol, n_images)
    if protocol in ECCV_PROTOCOLS and coco_ids is None:
        raise MaxMatchError(f"protocol {protocol} needs the COCO ids of the images and captions",
                            hint="pass coco_ids=maxmatch_cli.evaluation.eccv.split_coco_ids(store, split, captions_per_image)")
    result = EvalResult(protocol=protocol, metrics={}, n_images=n_images, n_captions=sims.shape[1])
    if protocol == "coco1k":
        result.metrics, result.folds = coco_1k_folds(sims, captions_per_image, n_folds=n_images // 1000)
        return result
    result.metrics = retrieval_metrics(sims, captions_per_image=captions_per_image)
    if protocol in ("coco5k", *ECCV_PROTOCOLS):
        result.folds_mean, result.folds = coco_1k_folds(sims, captions_per_image, n_folds=n_images // 1000)
    if protocol in ECCV_PROTOCOLS:
        result.metrics.update(coco_metrics(sims, coco_ids, protocol, captions_per_image))
    return result


def load_for_eval(ckpt: Checkpoint, device: torch.device):
    """Rebuild the model and tokenizer a checkpoint was trained with."""
    from maxmatch_cli.models import build_model

    recipe = ckpt.recipe
    tokenizer = build_tokenizer(recipe.model.text_encoder, vocab_json=ckpt.vocab_json,
                                bert_path=recipe.model.bert_path)
    vocab_words = getattr(tokenizer, "words", None)
    model = build_model(recipe.model, vocab_words, pretrained=False)
    missing, unexpected = model.load_state_dict(ckpt.model_state, strict=False)
    if missing or unexpected:
        raise MaxMatchError(f"checkpoint {ckpt.path} does not match its recipe's model "
                            f"(missing {len(missing)} tensors, unexpected {len(unexpected)})",
                            hint="the file may come from another maxmatch version; re-train or use a matching one")
    return model.to(device).eval(), tokenizer


def check_features(ckpt: Checkpoint, store) -> None:
    """Refuse a feature file whose feature size differs from the one the checkpoint was trained on."""
    model = ckpt.recipe.model
    check_image_input(store, model.image_encoder)
    if model.image_encoder != "cnn" and store.feature_dim != model.image_feature_dim:
        raise MaxMatchError(f"checkpoint {ckpt.path} takes {model.image_feature_dim}-dimensional features but "
                            f"{store.path} holds {store.feature_dim}-dimensional ones",
                            hint="pass the feature file it was trained on (--data), or features of that kind")


EMBEDDINGS_FORMAT = "maxmatch-embeddings"


def _cache_key(ckpt: Checkpoint, store, split: str) -> dict[str, Any]:
    """Everything the cached embeddings depend on; a cache file whose key differs is stale."""
    from maxmatch_cli import __version__

    stat = Path(ckpt.path).stat()
    return {"format": EMBEDDINGS_FORMAT, "package_version": __version__, "checkpoint": str(Path(ckpt.path).resolve()),
            "checkpoint_size": stat.st_size, "checkpoint_mtime_ns": stat.st_mtime_ns,
            "data_fingerprint": store.fingerprint(), "split": split,
            "captions_per_image": ckpt.recipe.data.captions_per_image, "max_len": ckpt.recipe.data.max_caption_len}


def embeddings_cache_path(ckpt: Checkpoint, store, split: str, cache_dir: Path | None = None) -> Path:
    """``<checkpoint folder>/embeddings/<stem>.<split>.<hash>.safetensors`` (or under ``cache_dir``).

    The name depends on the checkpoint path, feature file and split only, so a retrained checkpoint overwrites
    its stale cache instead of adding one.
    """
    ident = json.dumps([str(Path(ckpt.path).resolve()), store.fingerprint(), split])
    digest = hashlib.sha256(ident.encode()).hexdigest()[:12]
    safe_split = re.sub(r"[^A-Za-z0-9_-]", "_", split)
    folder = Path(cache_dir) if cache_dir is not None else Path(ckpt.path).parent / "embeddings"
    return folder / f"{Path(ckpt.path).stem}.{safe_split}.{digest}.safetensors"


def _read_cache(path: Path, key: dict[str, Any]) -> Embeddings | None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        if meta.get("key") != json.dumps(key, sort_keys=True):
            return None
        t = load_file(str(path))
        return Embeddings(t["images"], t["captions"], t["image_indices"].numpy(), t["caption_indices"].numpy())
    except Exception:  # a missing, truncated or foreign file is simply re-encoded
        return None


def _write_cache(path: Path, key: dict[str, Any], emb: Embeddings) -> bool:
    from safetensors.torch import save_file

    tensors = {"images": emb.images.contiguous(), "captions": emb.captions.contiguous(),
               "image_indices": torch.from_numpy(np.asarray(emb.image_indices, dtype=np.int64)),
               "caption_indices": torch.from_numpy(np.asarray(emb.caption_indices, dtype=np.int64))}
    try:
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"key": json.dumps(key, sort_keys=True)}))
    except (MaxMatchError, OSError):
        return False  # a read-only checkpoint folder or a full disk only costs the re-encoding next time
    return True


def checkpoint_embeddings(ckpt: Checkpoint, store, split: str, device: torch.device, *, cache: bool = True,
                          cache_dir: Path | None = None, show_progress: bool = True,
                          written: list[Path] | None = None) -> Embeddings:
    """A split's set embeddings under a checkpoint, encoded once and then read from the cache.

    Args:
        ckpt: a loaded checkpoint (its recipe and vocabulary rebuild the model).
        store: an open feature store.
        split: split name.
        device: where to encode.
        cache: read and write the cache (:func:`embeddings_cache_path`); float32, so cached and fresh
            embeddings are identical.
        cache_dir: cache folder instead of ``embeddings/`` next to the checkpoint.
        show_progress: progress bars while encoding.
        written: the cache file is appended here when it is (re)written.

    Returns:
        :class:`Embeddings` on the CPU.
    """
    check_features(ckpt, store)
    split_layout(store, split, ckpt.recipe.data.captions_per_image)  # a clear error before loading the model
    path = embeddings_cache_path(ckpt, store, split, cache_dir) if cache else None
    key = _cache_key(ckpt, store, split) if cache else None
    if path is not None and (cached := _read_cache(path, key)) is not None:
        return cached
    model, tokenizer = load_for_eval(ckpt, device)
    recipe = ckpt.recipe
    cnn = recipe.model.image_encoder == "cnn"  # decoding image files is worth worker processes, stored features not
    emb = encode_split(model, store, split, tokenizer, recipe.data.captions_per_image, device,
                       batch_size=recipe.eval.batch_size, max_len=recipe.data.max_caption_len,
                       show_progress=show_progress, num_workers=recipe.data.num_workers if cnn else 0,
                       image_source=build_image_source(store, recipe, train=False))
    if path is not None and _write_cache(path, key, emb) and written is not None:
        written.append(path)
    return emb


def _check_eval_protocol(protocol: str | None, coco_captions: str | Path | None) -> None:
    """Refuse, before anything is loaded, a protocol ``evaluate`` / ``ensemble`` do not take, a COCO caption file
    without eccv or cxc, and eccv or cxc without the eccv-caption package."""
    if protocol is not None:
        check_protocol(protocol, ECCV_PROTOCOLS)
    if coco_captions is not None and protocol not in ECCV_PROTOCOLS:
        raise MaxMatchError("a COCO caption file (--coco-captions) is used by the eccv and cxc protocols only",
                            hint="add --protocol eccv or --protocol cxc, or leave out --coco-captions")
    if protocol in ECCV_PROTOCOLS:
        require_package()


def evaluate_checkpoint(checkpoint: str | Path, data: str | None = None, split: str | None = None,
                        protocol: str | None = None, similarity: str | None = None, device: str = "auto",
                        json_path: Path | None = None, csv_path: Path | None = None,
                        show_progress: bool = True, cache: bool = True,
                        coco_captions: str | Path | None = None) -> EvalResult:
    """Evaluate a checkpoint on a split; writes the JSON of DESIGN §5 (and a one-row CSV) when asked.

    The JSON also records the checkpoint, split, feature file, similarity, sizes and provenance; metrics in files
    are rounded to :data:`METRIC_DECIMALS`, those returned are not. Every file written is listed in
    ``result.files``. ``protocol`` may also be eccv or cxc; their caption annotation ids come from
    ``coco_captions`` (``captions_val2014.json``) or the feature file (:mod:`maxmatch_cli.evaluation.eccv`), and where they
    came from is recorded as ``provenance["coco_caption_ids"]``.
    """
    from maxmatch_cli.features.store import open_store

    _check_eval_protocol(protocol, coco_captions)
    dev = resolve_device(device)
    ckpt = load_checkpoint(checkpoint)
    recipe = ckpt.recipe
    store = open_store(data or recipe.data.path)
    split = split or recipe.eval.split
    kind = similarity or recipe.eval.similarity or recipe.loss.similarity
    images, _ = split_layout(store, split, recipe.data.captions_per_image)
    protocol = resolve_protocol(protocol or recipe.eval.protocol, len(images), split)  # before the encoding
    coco_ids = None
    if protocol in ECCV_PROTOCOLS:  # a missing id mapping costs no encoding
        coco_ids = split_coco_ids(store, split, recipe.data.captions_per_image, coco_captions)
    files: list[Path] = []
    emb = checkpoint_embeddings(ckpt, store, split, dev, cache=cache, show_progress=show_progress, written=files)
    sims = score(emb.images, emb.captions, kind, dev, recipe.eval.block_size, show_progress=show_progress,
                 **similarity_options(recipe, kind))
    result = metrics_for(sims, protocol, recipe.data.captions_per_image, coco_ids)
    result.similarity = kind
    result.checkpoint, result.split, result.data = str(ckpt.path), split, str(store.path)
    result.provenance = eval_provenance(ckpt)
    if coco_ids is not None:
        result.provenance["coco_caption_ids"] = coco_ids.source
    result.files = files
    write_result(result, json_path, csv_path)
    return result


def write_result(result: EvalResult, json_path: Path | None, csv_path: Path | None) -> None:
    """Write the JSON record and a one-row CSV (metrics rounded); each path is appended to ``result.files``."""
    if json_path:
        result.files.append(write_text(json_path, json.dumps(_rounded_record(result.to_json()), indent=2) + "\n"))
    if csv_path:
        keys = list(result.metrics)
        values = rounded(result.metrics)
        rows = ["protocol," + ",".join(keys), result.protocol + "," + ",".join(f"{values[k]:.{METRIC_DECIMALS}f}" for k in keys)]
        result.files.append(write_text(csv_path, "\n".join(rows) + "\n"))


# ----------------------------------------------------------------------------------------- ensembles (§4.2)


@dataclass
class EnsembleResult:
    """Metrics of the averaged similarities (``ensemble``) and of each member alone."""

    ensemble: EvalResult
    members: list[EvalResult]
    checkpoints: list[str]
    files: list[Path] = field(default_factory=list)
    """Files written (embedding caches, --json, --csv), in order."""

    def to_json(self) -> dict[str, Any]:
        """The ensemble's record (as ``evaluate``'s, with ``checkpoints`` for ``checkpoint``) plus ``members``."""
        out = self.ensemble.to_json()
        del out["checkpoint"]
        out = {**out, "checkpoints": list(self.checkpoints)}
        out["members"] = [{"checkpoint": path, **m.to_json()} for path, m in zip(self.checkpoints, self.members)]
        return out


def _agreed(ckpts: Sequence[Checkpoint], value, what: str, flag: str | None):
    values = [value(c.recipe) for c in ckpts]
    if any(v != values[0] for v in values):
        listed = ", ".join(f"{c.path}: {v}" for c, v in zip(ckpts, values))
        raise MaxMatchError(f"the checkpoints disagree on {what} ({listed})",
                            hint=f"pass {flag} to choose one" if flag else "ensemble checkpoints of one dataset")
    return values[0]


def _split_identity(store, split: str, captions_per_image: int) -> tuple[np.ndarray, list[str]]:
    images, captions = split_layout(store, split, captions_per_image)
    return np.asarray(store.image_ids)[images], store.captions_text(captions)


def _first_difference(a, b) -> str:
    if len(a) != len(b):
        return f"{len(a):,} vs {len(b):,} entries"
    i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    return f"first difference at position {i}: {a[i]!r} vs {b[i]!r}"


def check_aligned(first: tuple[Path, Any], other: tuple[Path, Any], split: str, captions_per_image: int) -> None:
    """Raise unless two (checkpoint, store) pairs see the same images and captions, in the same order."""
    (ckpt_a, store_a), (ckpt_b, store_b) = first, other
    if Path(store_a.path).resolve() == Path(store_b.path).resolve():
        return
    (ids_a, caps_a), (ids_b, caps_b) = (_split_identity(s, split, captions_per_image) for s in (store_a, store_b))
    for what, a, b in (("image ids", ids_a.tolist(), ids_b.tolist()), ("captions", caps_a, caps_b)):
        if a != b:
            raise MaxMatchError(
                f"split '{split}' of {store_b.path} (for {ckpt_b}) does not line up with {store_a.path} "
                f"(for {ckpt_a}): {what} differ, {_first_difference(a, b)}",
                hint="ensemble checkpoints on the same images and captions: pass --data FILE for all of them, "
                     "or feature files of the same dataset split")


def ensemble_checkpoints(checkpoints: Sequence[str | Path], data: str | None = None, split: str | None = None,
                         protocol: str | None = None, similarity: str | None = None, device: str = "auto",
                         json_path: Path | None = None, csv_path: Path | None = None, show_progress: bool = True,
                         cache: bool = True, coco_captions: str | Path | None = None) -> EnsembleResult:
    """Average the similarity matrices of several checkpoints (paper §4.2: two seeds) and report Recall@K.

    Each checkpoint is rebuilt from its own recipe and vocabulary, reads ``data`` or its own recipe's feature
    file, and scores with ``similarity`` or its own test-time similarity; the ensemble score is the plain mean of
    the members' scores (so mixing similarities of different ranges, e.g. maxmatch and chamfer, weighs them
    unequally). All members must see the same images and captions of ``split``, in the same order.

    Args:
        checkpoints: two or more checkpoint files or run folders.
        data: feature file for every member (default: each recipe's ``data.path``).
        split, protocol: as for :func:`evaluate_checkpoint` (eccv and cxc too: the ensemble and every member
            get their metrics); default the recipes' (which must then agree).
        similarity: one similarity for every member (default: each checkpoint's).
        device: auto, cpu, cuda or cuda:N.
        json_path, csv_path: also write the results there (JSON: DESIGN §5 keys, what they come from, and
            ``members``, each a record as ``evaluate`` writes it; ``data`` is one path, or a list when the members
            read different files). Metrics in files are rounded to :data:`METRIC_DECIMALS`.
        show_progress: progress bars.
        cache: use the embedding cache (:func:`checkpoint_embeddings`).
        coco_captions: eccv / cxc: ``captions_val2014.json``, as for :func:`evaluate_checkpoint`.

    Returns:
        :class:`EnsembleResult`.
    """
    from maxmatch_cli.features.store import open_store

    _check_eval_protocol(protocol, coco_captions)
    if len(checkpoints) < 2:
        raise MaxMatchError(f"an ensemble needs at least two checkpoints, got {len(checkpoints)}",
                            hint="pass two or more checkpoints (e.g. two seeds), or use `maxmatch evaluate`")
    dev = resolve_device(device)
    ckpts = [load_checkpoint(c) for c in checkpoints]
    split = split or _agreed(ckpts, lambda r: r.eval.split, "eval.split", "--split")
    protocol = protocol or _agreed(ckpts, lambda r: r.eval.protocol, "eval.protocol", "--protocol")
    cpi = _agreed(ckpts, lambda r: r.data.captions_per_image, "data.captions_per_image", None)
    stores: dict[Path, Any] = {}
    members = []
    for ckpt in ckpts:
        path = Path(data or ckpt.recipe.data.path)
        if path.resolve() not in stores:
            stores[path.resolve()] = open_store(path)
        store = stores[path.resolve()]
        check_features(ckpt, store)
        members.append((ckpt, store))
        check_aligned((members[0][0].path, members[0][1]), (ckpt.path, store), split, cpi)
    images, _ = split_layout(members[0][1], split, cpi)
    protocol = resolve_protocol(protocol, len(images), split)  # before the encoding
    coco_ids = None
    if protocol in ECCV_PROTOCOLS:  # the members are aligned: the first one's ids are every member's
        coco_ids = split_coco_ids(members[0][1], split, cpi, coco_captions)
    total, results, files = None, [], []
    for ckpt, store in members:
        recipe = ckpt.recipe
        kind = similarity or recipe.eval.similarity or recipe.loss.similarity
        emb = checkpoint_embeddings(ckpt, store, split, dev, cache=cache, show_progress=show_progress,
                                    written=files)
        sims = score(emb.images, emb.captions, kind, dev, recipe.eval.block_size, show_progress=show_progress,
                     **similarity_options(recipe, kind))
        result = metrics_for(sims, protocol, cpi, coco_ids)
        result.similarity = kind
        result.checkpoint, result.split, result.data = str(ckpt.path), split, str(store.path)
        result.provenance = eval_provenance(ckpt)
        if coco_ids is not None:
            result.provenance["coco_caption_ids"] = coco_ids.source
        results.append(result)
        total = sims if total is None else total.add_(sims)
    total /= len(members)
    ensemble = metrics_for(total, protocol, cpi, coco_ids)
    kinds = list(dict.fromkeys(r.similarity for r in results))
    ensemble.similarity = kinds[0] if len(kinds) == 1 else "mean(" + ", ".join(kinds) + ")"
    data_files = list(dict.fromkeys(r.data for r in results))
    ensemble.split, ensemble.data = split, data_files[0] if len(data_files) == 1 else data_files
    ensemble.provenance = eval_provenance()
    if coco_ids is not None:
        ensemble.provenance["coco_caption_ids"] = coco_ids.source
    out = EnsembleResult(ensemble, results, [str(c.path) for c in ckpts], files)
    if json_path:
        files.append(write_text(json_path, json.dumps(_rounded_record(out.to_json()), indent=2) + "\n"))
    if csv_path:
        keys = list(ensemble.metrics)
        rows = ["model,similarity,protocol," + ",".join(keys)]
        for label, r in [*zip(out.checkpoints, results), ("ensemble", ensemble)]:
            values = rounded(r.metrics)
            rows.append(",".join([_csv_field(label), _csv_field(r.similarity), r.protocol,
                                  *(f"{values[k]:.{METRIC_DECIMALS}f}" for k in keys)]))
        files.append(write_text(csv_path, "\n".join(rows) + "\n"))
    return out


def _csv_field(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text
