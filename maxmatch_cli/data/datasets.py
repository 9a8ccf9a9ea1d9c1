"""Datasets over a feature store: training items, and every image and caption of a split once for evaluation.

Training is image-centric by default (paper App. B: "200 images along with their corresponding captions";
DivE's training set returns an image with its captions): each item is one image with ``captions_per_image``
of its captions (:class:`ImageCaptionsDataset`), a batch holds B images and B x c captions, and an epoch is a
pass over the images. ``data.batching = "pairs"`` iterates over the captions instead (VSE++): each item is one
(image, caption) pair, so an image appears once per caption and a batch may hold several captions of the same
image (the losses treat those as positives, never negatives). Evaluation encodes every image and every caption
of a split exactly once (:class:`ImageDataset`, :class:`CaptionDataset`, in the order :func:`split_layout` checks).

The image side of an item comes from an :class:`~maxmatch_cli.data.images.ImageSource`, the caption side from a
:class:`~maxmatch_cli.data.tokenizers.TextTokenizer`; collated items are :class:`~maxmatch_cli.data.batches.Batch`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from maxmatch_cli.data.batches import Batch, pad_tokens
from maxmatch_cli.data.images import ImageSource, StoredFeatures
from maxmatch_cli.data.tokenizers import TextTokenizer
from maxmatch_cli.errors import MaxMatchError


class PairDataset(Dataset):
    """(image, caption) pairs of one split, with VSE-infinity style region and word dropout in training.

    ``image_source`` supplies the image side (default: the store's features, with ``region_dropout`` in training).
    """

    def __init__(self, store, split: str, tokenizer: TextTokenizer, max_len: int = 64, train: bool = False,
                 region_dropout: float = 0.0, word_dropout: float = 0.0, image_source: ImageSource | None = None):
        self.store = store
        self.images, self.captions = store.split(split)
        if len(self.captions) == 0:
            raise MaxMatchError(f"split '{split}' of {store.path} has no captions",
                                hint="re-run extract-features with captions for that split")
        self.caption_image = np.asarray(store.caption_image)[self.captions]
        self.texts = store.captions_text(self.captions)
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.train = train
        self.word_dropout = word_dropout
        self.image_source = image_source if image_source is not None else StoredFeatures(
            store, region_dropout if train else 0.0)

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int):
        image = int(self.caption_image[i])
        feats = self.image_source.load(image)
        ids = self.tokenizer.encode(self.texts[i], self.max_len)
        if self.train:
            ids = self.tokenizer.drop_tokens(ids, self.word_dropout, None)
        return feats, ids, image, int(self.captions[i])

    def collate(self, items) -> Batch:
        feats, mask = self.image_source.collate([it[0] for it in items])
        tokens, tmask = pad_tokens([it[1] for it in items], self.tokenizer.pad_id)
        return Batch(feats, mask, tokens, tmask, torch.tensor([it[2] for it in items]),
                     torch.tensor([it[3] for it in items]))


class ImageCaptionsDataset(Dataset):
    """Images of one split, each with ``captions_per_image`` of its captions (image-centric training batches).

    An image with more captions than that (some COCO images have 6 or 7) contributes a different draw of them
    each epoch (seeded by seed, epoch and image, so a resumed run draws the same); one with fewer is an error.
    Region and word dropout as :class:`PairDataset`.
    """

    def __init__(self, store, split: str, tokenizer: TextTokenizer, captions_per_image: int = 5, max_len: int = 64,
                 train: bool = False, word_dropout: float = 0.0, image_source: ImageSource | None = None,
                 seed: int = 0):
        self.store = store
        images, captions = store.split(split)
        owners = np.asarray(store.caption_image)[captions]
        by_image: dict[int, list[int]] = {int(i): [] for i in images}
        for cap, owner in zip(np.asarray(captions).tolist(), owners.tolist()):
            if owner in by_image:
                by_image[owner].append(cap)
        short = [i for i, caps in by_image.items() if len(caps) < captions_per_image]
        if not by_image or short:
            raise MaxMatchError(
                f"split '{split}' of {store.path}: {len(short) if by_image else 'all'} of {len(by_image)} images have "
                f"fewer than data.captions_per_image={captions_per_image} captions",
                hint="lower data.captions_per_image, or train on (image, caption) pairs with data.batching=pairs")
        self.images = np.asarray(list(by_image), dtype=np.int64)
        self.image_captions = [np.asarray(by_image[int(i)], dtype=np.int64) for i in self.images]
        self.text_of = dict(zip(np.asarray(captions).tolist(), store.captions_text(captions)))
        self.captions_per_image = captions_per_image
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.train = train
        self.word_dropout = word_dropout
        self.image_source = image_source if image_source is not None else StoredFeatures(store)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def _captions(self, i: int) -> np.ndarray:
        caps = self.image_captions[i]
        if len(caps) == self.captions_per_image:
            return caps
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + int(self.images[i]))
        pick = torch.randperm(len(caps), generator=g)[: self.captions_per_image].sort().values.numpy()
        return caps[pick]

    def __getitem__(self, i: int):
        feats = self.image_source.load(int(self.images[i]))
        caps = self._captions(i)
        token_lists = []
        for cap in caps.tolist():
            ids = self.tokenizer.encode(self.text_of[cap], self.max_len)
            if self.train:
                ids = self.tokenizer.drop_tokens(ids, self.word_dropout, None)
            token_lists.append(ids)
        return feats, token_lists, int(self.images[i]), caps.tolist()

    def collate(self, items) -> Batch:
        feats, mask = self.image_source.collate([it[0] for it in items])
        tokens, tmask = pad_tokens([ids for it in items for ids in it[1]], self.tokenizer.pad_id)
        c = self.captions_per_image
        return Batch(feats, mask, tokens, tmask, torch.tensor([it[2] for it in items]),
                     torch.tensor([cap for it in items for cap in it[3]]),
                     torch.arange(len(items)).repeat_interleave(c))


class ImageDataset(Dataset):
    """Every image of a list of store indices, once (for encoding at evaluation time).

    ``image_source`` supplies the image side (default: the store's features); collate gives (feats, mask), mask
    None for pixels.
    """

    def __init__(self, store, image_indices: np.ndarray, image_source: ImageSource | None = None):
        self.store = store
        self.indices = np.asarray(image_indices)
        self.image_source = image_source if image_source is not None else StoredFeatures(store)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.image_source.load(int(self.indices[i]))

    def collate(self, items) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.image_source.collate(items)


class CaptionDataset(Dataset):
    """Every caption of a list of store indices, once, tokenised."""

    def __init__(self, texts: Sequence[str], tokenizer: TextTokenizer, max_len: int = 64):
        self.texts = list(texts)
        self.tokenizer = tokenizer
        self.max_len = max_len

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> list[int]:
        return self.tokenizer.encode(self.texts[i], self.max_len)

    def collate(self, items) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_tokens(items, self.tokenizer.pad_id)


def split_layout(store, split: str, captions_per_image: int) -> tuple[np.ndarray, np.ndarray]:
    """Image and caption indices of a split, checked to follow the evaluation layout (caption j <-> image j // cpi)."""
    images, captions = store.split(split)
    if len(captions) == 0:
        raise MaxMatchError(f"split '{split}' of {store.path} has no captions ({len(images)} images): a gallery can be "
                            "indexed and searched, not evaluated",
                            hint="evaluate a split with captions, or use `maxmatch index` / `maxmatch query` on it")
    owners = np.asarray(store.caption_image)[captions]
    expected = np.repeat(np.asarray(images), captions_per_image)
    if len(owners) != len(expected) or not np.array_equal(owners, expected):
        raise MaxMatchError(
            f"split '{split}' of {store.path} does not hold exactly {captions_per_image} captions per image "
            f"grouped in image order ({len(images)} images, {len(captions)} captions)",
            hint="set data.captions_per_image to the dataset's count or re-import the features")
    return np.asarray(images), np.asarray(captions)
