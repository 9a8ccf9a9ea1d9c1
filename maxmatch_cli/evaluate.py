"""Evaluation: encode a split once, score every image against every caption in blocks, report Recall@K.

Protocols (DESIGN §4): ``full`` scores all images of the split against all their captions (Flickr30K 1K test,
or any split); ``coco5k`` is ``full`` on the 5,000-image COCO test; ``coco1k`` averages the metrics over 5 folds
of 1,000 consecutive images. ``auto`` reports coco5k with the 1K folds for a 5,000-image split, else full.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from maxmatch_cli.checkpoint import Checkpoint, atomic_write, load_checkpoint
from maxmatch_cli.data import CaptionDataset, ImageDataset, TextTokenizer, build_tokenizer, split_layout
from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.metrics import coco_1k_folds, retrieval_metrics
from maxmatch_cli.progress import make_progress
from maxmatch_cli.recipes import Recipe
from maxmatch_cli.similarity import set_similarity


@dataclass
class Embeddings:
    """Set embeddings of one split: images (N, K, D) and captions (N·cpi, K, D), on the CPU, float32."""

    images: torch.Tensor
    captions: torch.Tensor
    image_indices: np.ndarray
    caption_indices: np.ndarray


@dataclass
class EvalResult:
    protocol: str
    metrics: dict[str, float]
    folds: list[dict[str, float]] = field(default_factory=list)
    folds_mean: dict[str, float] | None = None
    n_images: int = 0
    n_captions: int = 0
    similarity: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"protocol": self.protocol, "metrics": self.metrics, "folds": self.folds}
        if self.folds_mean is not None:
            out["folds_mean"] = self.folds_mean
        out.update({"n_images": self.n_images, "n_captions": self.n_captions, "similarity": self.similarity})
        return out


def similarity_options(recipe: Recipe, kind: str) -> dict[str, Any]:
    """The recipe's options for a similarity kind (only those that kind takes)."""
    return {"chamfer": {"alpha": recipe.loss.chamfer_alpha},
            "sinkhorn": {"tau": recipe.loss.sinkhorn_tau, "iters": recipe.loss.sinkhorn_iters}}.get(kind, {})


@torch.no_grad()
def encode_split(model, store, split: str, tokenizer: TextTokenizer, captions_per_image: int, device: torch.device,
                 batch_size: int = 256, max_len: int = 64, max_images: int | None = None, num_workers: int = 0,
                 show_progress: bool = True) -> Embeddings:
    """Encode each image and each caption of a split once (model in eval mode)."""
    images, captions = split_layout(store, split, captions_per_image)
    if max_images is not None and max_images < len(images):
        images, captions = images[:max_images], captions[: max_images * captions_per_image]
    was_training = model.training
    model.eval()
    img_loader = DataLoader(ImageDataset(store, images), batch_size=batch_size, num_workers=num_workers,
                            collate_fn=ImageDataset.collate)
    cap_ds = CaptionDataset(store.captions_text(captions), tokenizer, max_len)
    cap_loader = DataLoader(cap_ds, batch_size=batch_size, num_workers=0, collate_fn=cap_ds.collate)
    img_out, cap_out = [], []
    with make_progress(transient=True) as progress:
        task = progress.add_task("encoding images", total=len(images), unit="img", status="",
                                 visible=show_progress)
        for feats, mask in img_loader:
            img_out.append(model.encode_images(feats.to(device), mask.to(device)).sets.float().cpu())
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


def metrics_for(sims: torch.Tensor, protocol: str, captions_per_image: int) -> EvalResult:
    """Apply an evaluation protocol to a full similarity matrix."""
    n_images = sims.shape[0]
    if protocol == "auto":
        protocol = "coco5k" if n_images == 5000 else "full"
    if protocol in ("coco1k", "coco5k") and n_images % 1000:
        raise MaxMatchError(f"protocol {protocol} needs a multiple of 1,000 images, this split has {n_images}",
                            hint="use --protocol full")
    result = EvalResult(protocol=protocol, metrics={}, n_images=n_images, n_captions=sims.shape[1])
    if protocol == "coco1k":
        result.metrics, result.folds = coco_1k_folds(sims, captions_per_image, n_folds=n_images // 1000)
        return result
    result.metrics = retrieval_metrics(sims, captions_per_image=captions_per_image)
    if protocol == "coco5k":
        result.folds_mean, result.folds = coco_1k_folds(sims, captions_per_image, n_folds=n_images // 1000)
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


def evaluate_checkpoint(checkpoint: str | Path, data: str | None = None, split: str | None = None,
                        protocol: str | None = None, similarity: str | None = None, device: str = "auto",
                        json_path: Path | None = None, csv_path: Path | None = None,
                        show_progress: bool = True) -> EvalResult:
    """Evaluate a checkpoint on a split; writes the JSON of DESIGN §5 (and a one-row CSV) when asked."""
    from maxmatch_cli.features.store import open_store
    from maxmatch_cli.train import resolve_device

    ckpt = load_checkpoint(checkpoint)
    recipe = ckpt.recipe
    store = open_store(data or recipe.data.path)
    split = split or recipe.eval.split
    kind = similarity or recipe.eval.similarity or recipe.loss.similarity
    dev = resolve_device(device)
    model, tokenizer = load_for_eval(ckpt, dev)
    emb = encode_split(model, store, split, tokenizer, recipe.data.captions_per_image, dev,
                       batch_size=recipe.eval.batch_size, max_len=recipe.data.max_caption_len,
                       show_progress=show_progress)
    sims = score(emb.images, emb.captions, kind, dev, recipe.eval.block_size, show_progress=show_progress,
                 **similarity_options(recipe, kind))
    result = metrics_for(sims, protocol or recipe.eval.protocol, recipe.data.captions_per_image)
    result.similarity = kind
    write_result(result, json_path, csv_path)
    return result


def write_result(result: EvalResult, json_path: Path | None, csv_path: Path | None) -> None:
    if json_path:
        atomic_write(Path(json_path), lambda tmp: tmp.write_text(json.dumps(result.to_json(), indent=2)))
    if csv_path:
        keys = list(result.metrics)
        rows = ["protocol," + ",".join(keys), result.protocol + "," + ",".join(f"{result.metrics[k]:.4f}" for k in keys)]
        atomic_write(Path(csv_path), lambda tmp: tmp.write_text("\n".join(rows) + "\n"))
