"""Encoding a split once and scoring it: the model a checkpoint rebuilds, every image and caption of a split
encoded to its set (:func:`encode_split`), and set similarities computed in row blocks (:func:`score`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from maxmatch_cli.config.recipes import Recipe
from maxmatch_cli.data.datasets import CaptionDataset, ImageDataset, split_layout
from maxmatch_cli.data.images import ImageSource, check_image_input
from maxmatch_cli.data.tokenizers import TextTokenizer, build_tokenizer
from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.method.similarity import gallery_similarity, text_gallery
from maxmatch_cli.models.checkpoint import Checkpoint
from maxmatch_cli.progress import make_progress


@dataclass
class Embeddings:
    """Set embeddings of one split: images (N, K, D) and captions (N·cpi, K, D), on the CPU, float32."""

    images: torch.Tensor
    captions: torch.Tensor
    image_indices: np.ndarray
    caption_indices: np.ndarray


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

    ``image_source`` is where images come from (:func:`~maxmatch_cli.data.images.build_image_source`; default: the
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
    """(N, M) set similarities, computed in row blocks on ``device`` and gathered on the CPU.

    The captions are normalised and laid out for the no-grad kernels once (:func:`text_gallery`), not per block.
    """
    gallery = text_gallery(emb_captions.to(device).float())
    out = torch.empty(emb_images.shape[0], emb_captions.shape[0])
    with make_progress(transient=True) as progress:
        task = progress.add_task(f"scoring ({kind})", total=emb_images.shape[0], unit="img", status="",
                                 visible=show_progress)
        for start in range(0, emb_images.shape[0], block_size):
            block = emb_images[start: start + block_size].to(device).float()
            out[start: start + block.shape[0]] = gallery_similarity(block, gallery, kind, **options).cpu()
            progress.advance(task, block.shape[0])
    return out


def load_for_eval(ckpt: Checkpoint, device: torch.device):
    """Rebuild the model and tokenizer a checkpoint was trained with."""
    from maxmatch_cli.models import build_model
    from maxmatch_cli.models.checkpoint import load_model_state

    recipe = ckpt.recipe
    tokenizer = build_tokenizer(recipe.model.text_encoder, vocab_json=ckpt.vocab_json,
                                bert_path=recipe.model.bert_path)
    vocab_words = getattr(tokenizer, "words", None)
    model = build_model(recipe.model, vocab_words, pretrained=False)
    load_model_state(model, ckpt)
    return model.to(device).eval(), tokenizer


def check_features(ckpt: Checkpoint, store) -> None:
    """Refuse a feature file whose feature size differs from the one the checkpoint was trained on."""
    model = ckpt.recipe.model
    check_image_input(store, model.image_encoder)
    if model.image_encoder != "cnn" and store.feature_dim != model.image_feature_dim:
        raise MaxMatchError(f"checkpoint {ckpt.path} takes {model.image_feature_dim}-dimensional features but "
                            f"{store.path} holds {store.feature_dim}-dimensional ones",
                            hint="pass the feature file it was trained on (--data), or features of that kind")
