"""Datasets, vocabulary, tokenisation and batching over a feature store.

Training is image-centric by default (paper App. B: "200 images along with their corresponding captions";
DivE's training set returns an image with its captions): each item is one image with ``captions_per_image``
of its captions (:class:`ImageCaptionsDataset`), a batch holds B images and B x c captions, and an epoch is a
pass over the images. ``data.batching = "pairs"`` iterates over the captions instead (VSE++): each item is one
(image, caption) pair, so an image appears once per caption and a batch may hold several captions of the same
image (the losses treat those as positives, never negatives). Evaluation encodes every image and every caption
of a split exactly once.

The image side of an item comes from an :class:`ImageSource`: stored local features (:class:`StoredFeatures`,
padded to (B, R, F) with a mask) or, for an end-to-end CNN (``model.image_encoder = "cnn"``) over an image-file
store, the image file decoded and transformed on the fly (:class:`RawImages`, stacked to (B, 3, S, S) with mask
None). :func:`build_image_source` picks the one a recipe needs.
"""

from __future__ import annotations

import io
import json
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from maxmatch_cli.errors import MaxMatchError

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize(text: str) -> list[str]:
    """Lowercase word tokens (letters and digits; punctuation dropped), as SCAN's vocabulary expects."""
    return _WORD.findall(text.lower())


def corrupt_tokens(ids: list[int], rate: float, generator: torch.Generator | None, mask_id: int,
                   random_range: tuple[int, int]) -> list[int]:
    """VSE-infinity/DivE caption augmentation: each inner token (not the first or last) is hit with probability
    ``rate``; a hit becomes ``mask_id`` (50%), a random id from ``random_range`` (10%) or is deleted (40%)."""
    if rate <= 0 or len(ids) <= 3:
        return ids
    out = [ids[0]]
    draws = torch.rand(len(ids) - 2, 2, generator=generator).tolist()
    for tok, (p, q) in zip(ids[1:-1], draws):
        if p >= rate:
            out.append(tok)
        elif q < 0.5:
            out.append(mask_id)
        elif q < 0.6:
            out.append(int(torch.randint(*random_range, (1,), generator=generator)))
    out.append(ids[-1])
    return out


class TextTokenizer(Protocol):
    """Turns captions into token ids; both the Bi-GRU vocabulary and BERT's tokenizer fit this seam."""

    pad_id: int

    def encode(self, text: str, max_len: int) -> list[int]: ...

    def drop_tokens(self, ids: list[int], rate: float, generator: torch.Generator | None) -> list[int]: ...


class Vocab:
    """Word vocabulary: ``<pad> <start> <end> <unk>`` then words with count >= min_count, most frequent first."""

    def __init__(self, words: Sequence[str]):
        if list(words[: len(SPECIALS)]) != list(SPECIALS):
            raise MaxMatchError("vocabulary does not start with the special tokens <pad> <start> <end> <unk>",
                                hint="rebuild it with Vocab.build(...) or use the checkpoint's own vocabulary")
        self.words = list(words)
        self.index = {w: i for i, w in enumerate(self.words)}
        self.pad_id, self.start_id, self.end_id, self.unk_id = (self.index[s] for s in SPECIALS)

    @classmethod
    def build(cls, captions: Sequence[str], min_count: int = 4) -> "Vocab":
        counts = Counter(tok for cap in captions for tok in tokenize(cap))
        kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(list(SPECIALS) + kept)

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, text: str, max_len: int) -> list[int]:
        ids = [self.index.get(tok, self.unk_id) for tok in tokenize(text)][: max_len - 2]
        return [self.start_id, *ids, self.end_id]

    def drop_tokens(self, ids: list[int], rate: float, generator: torch.Generator | None) -> list[int]:
        """VSE-infinity's caption augmentation: each inner token with prob. `rate` is masked (<unk>, 50%),
        replaced by a random word (10%) or deleted (40%)."""
        return corrupt_tokens(ids, rate, generator, self.unk_id, (len(SPECIALS), len(self.words)))

    def to_json(self) -> str:
        return json.dumps(self.words)

    @classmethod
    def from_json(cls, text: str) -> "Vocab":
        return cls(json.loads(text))


class BertTokenizerAdapter:
    """Wraps a transformers tokenizer loaded from a local folder (never downloaded)."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        from maxmatch_cli.models import resolve_bert_path

        folder = resolve_bert_path(path)
        try:
            self.tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise MaxMatchError(f"cannot load a tokenizer from {folder}: {exc}",
                                hint="model.bert_path must be a folder with config.json and the tokenizer files "
                                     "(vocab.txt or tokenizer.json)") from None
        self.pad_id = int(self.tok.pad_token_id or 0)
        self.mask_id = self.tok.mask_token_id
        self.path = str(path)

    def encode(self, text: str, max_len: int) -> list[int]:
        return list(self.tok(text, truncation=True, max_length=max_len)["input_ids"])

    def drop_tokens(self, ids: list[int], rate: float, generator: torch.Generator | None) -> list[int]:
        """VSE-infinity/DivE caption augmentation for BERT: each inner token with prob. `rate` becomes [MASK] (50%),
        a random token (10%) or is deleted (40%). DivE draws per word (all word pieces together); this draws per
        word piece."""
        if self.mask_id is None:
            return ids
        return corrupt_tokens(ids, rate, generator, self.mask_id, (1000, self.tok.vocab_size))


def build_tokenizer(text_encoder: str, vocab_json: str | None = None, bert_path: str = "",
                    captions: Sequence[str] | None = None, min_count: int = 4) -> TextTokenizer:
    """The tokenizer a text encoder needs: a vocabulary (restored from JSON or built from captions) or BERT's."""
    if text_encoder == "bert":
        return BertTokenizerAdapter(bert_path)
    if vocab_json:
        return Vocab.from_json(vocab_json)
    if captions is None:
        raise MaxMatchError("no vocabulary and no captions to build one from")
    return Vocab.build(captions, min_count=min_count)


@dataclass
class Batch:
    """A collated batch of Bi images and Bt captions. Masks are True for real regions / tokens.

    Image-centric batches hold Bi distinct images and Bt = Bi x c captions, caption j of image row j // c;
    pair batches hold Bi = Bt rows, caption j of row j (the same image may fill several rows).
    """

    feats: torch.Tensor  # (Bi, R, F) float32, or (Bi, 3, H, W) normalised pixels for a CNN
    feat_mask: torch.Tensor | None  # (Bi, R) bool; None for pixels
    tokens: torch.Tensor  # (Bt, L) long
    token_mask: torch.Tensor  # (Bt, L) bool
    image_index: torch.Tensor  # (Bi,) long, image index in the store of each image row
    caption_index: torch.Tensor  # (Bt,) long, caption index in the store
    caption_owner: torch.Tensor | None = None  # (Bt,) long, image row of each caption; None: caption j <-> row j

    def to(self, device: torch.device) -> "Batch":
        nb = device.type == "cuda"
        return Batch(*(None if t is None else t.to(device, non_blocking=nb)
                       for t in (self.feats, self.feat_mask, self.tokens, self.token_mask, self.image_index,
                                 self.caption_index, self.caption_owner)))

    def pin_memory(self) -> "Batch":
        """Page-locked copies, so the copy to the GPU can overlap compute (DataLoader(pin_memory=True) calls it)."""
        return Batch(*(None if t is None else t.pin_memory()
                       for t in (self.feats, self.feat_mask, self.tokens, self.token_mask, self.image_index,
                                 self.caption_index, self.caption_owner)))


def pad_regions(arrays: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (R_i, F) arrays into (B, Rmax, F) zeros-padded plus a (B, Rmax) validity mask."""
    rmax = max(max(a.shape[0] for a in arrays), 1)
    feats = torch.zeros(len(arrays), rmax, arrays[0].shape[1], dtype=torch.float32)
    mask = torch.zeros(len(arrays), rmax, dtype=torch.bool)
    for i, a in enumerate(arrays):
        feats[i, : a.shape[0]] = torch.from_numpy(np.asarray(a, dtype=np.float32))
        mask[i, : a.shape[0]] = True
    return feats, mask


def pad_tokens(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into (B, L) plus a (B, L) mask."""
    lmax = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), lmax), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), lmax, dtype=torch.bool)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = True
    return tokens, mask


# --------------------------------------------------------------------------------------------------------------
# The image side: stored features or decoded image files
# --------------------------------------------------------------------------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageSource(Protocol):
    """What a dataset reads for an image (by store index) and how a batch of those is collated."""

    def load(self, index: int) -> Any: ...

    def collate(self, items: list) -> tuple[torch.Tensor, torch.Tensor | None]: ...


class StoredFeatures:
    """Local features from the store as (R, F) arrays, with VSE-infinity's region dropout (training only).

    Args:
        store: an open :class:`~maxmatch_cli.features.store.FeatureStore` of region or grid features.
        region_dropout: probability of dropping each region (0 at evaluation); at least one is kept.
    """

    def __init__(self, store, region_dropout: float = 0.0):
        self.store = store
        self.region_dropout = region_dropout

    def load(self, index: int) -> np.ndarray:
        feats = self.store.image_features(index)
        if self.region_dropout > 0 and feats.shape[0] > 1:
            keep = torch.rand(feats.shape[0]) >= self.region_dropout
            if keep.any():
                feats = feats[keep.numpy()]
        return feats

    @staticmethod
    def collate(items: list) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_regions(items)


def decode_image_file(path: Path) -> torch.Tensor:
    """An image file as uint8 RGB (3, H, W).

    torchvision's decoders (JPEG, PNG, GIF, WebP) are used while they exist: deprecated since torchvision 0.29 in
    favour of TorchCodec, they still decode a 640x480 JPEG and crop it in 2.8 ms against PIL's 4.8 ms here.
    PIL decodes every other format, and everything once torchvision drops them.

    Raises:
        MaxMatchError: naming the file, when it is missing or cannot be decoded.
    """
    hint = "replace the file, fix data.image_root, or re-index the images without it (extract-features --kind " \
           "pixels --skip-unreadable)"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MaxMatchError(f"cannot read image {path}: {exc.strerror or exc}", hint=hint) from None
    try:
        from torchvision.io import ImageReadMode, decode_image

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (ImportError, RuntimeError, ValueError):
        pass  # no torchvision decoders, a format they do not read, or a damaged file: PIL decides
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            rgb = np.asarray(im.convert("RGB"))
    except UnidentifiedImageError:
        raise MaxMatchError(f"cannot decode image {path}: not an image in a known format, or damaged "
                            f"({len(data):,} bytes)", hint=hint) from None
    except Exception as exc:  # noqa: BLE001 - any decoding failure is reported with the path
        raise MaxMatchError(f"cannot decode image {path}: {type(exc).__name__}: {exc}", hint=hint) from None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


def pixel_transform(image_size: int, train: bool):
    """uint8 (3, H, W) -> float (3, S, S) normalised with the ImageNet statistics.

    Training: a random resized crop (scale 0.08-1, aspect 3/4-4/3) to S and a horizontal flip, as VSE++ and
    PVSE fine-tune their CNNs. Evaluation: the shorter side resized to S x 8/7 (256 for 224), centre crop S.
    """
    from torchvision.transforms import v2

    if train:
        geometry = [v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()]
    else:
        geometry = [v2.Resize(round(image_size * 8 / 7), antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose([*geometry, v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class RawImages:
    """The image files of an image-file store, decoded and transformed on the fly for an end-to-end CNN.

    Args:
        files: each image's path relative to ``root``, by store index.
        root: the image folder.
        image_size: S, the side of the square crop.
        train: random crops and flips (training) or a centre crop (evaluation).
    """

    def __init__(self, files: Sequence[str], root: str | Path, image_size: int, train: bool):
        self.files = files
        self.root = Path(root)
        self.image_size = image_size
        self.train = train
        self.transform = pixel_transform(image_size, train)

    def load(self, index: int) -> torch.Tensor:
        return self.transform(decode_image_file(self.root / self.files[index]))

    @staticmethod
    def collate(items: list) -> tuple[torch.Tensor, None]:
        return torch.stack(items), None


def check_image_input(store, image_encoder: str) -> None:
    """Refuse a store whose image side the image encoder cannot read (image files <-> model.image_encoder='cnn')."""
    pixels = store.feature_kind == "pixels"
    if image_encoder == "cnn" and not pixels:
        raise MaxMatchError(
            f"model.image_encoder='cnn' trains on raw images, but {store.path} holds precomputed "
            f"{store.feature_kind} features",
            hint="index the images with `maxmatch extract-features --images DIR --captions JSON --kind pixels "
                 "--out FILE.h5` and train on that file, or use model.image_encoder=region|grid on these features")
    if image_encoder != "cnn" and pixels:
        raise MaxMatchError(
            f"{store.path} indexes image files (no features), but model.image_encoder='{image_encoder}' reads "
            "precomputed features",
            hint="set model.image_encoder=cnn to fine-tune a CNN on the images, or extract features with "
                 "`maxmatch extract-features --images DIR --captions JSON --kind grid|region`")


def build_image_source(store, recipe, train: bool) -> ImageSource:
    """The image side a recipe's model reads: decoded image files for ``model.image_encoder='cnn'`` (root:
    ``data.image_root``, else the store's), stored features otherwise (region dropout in training).

    Raises:
        MaxMatchError: the store does not fit the encoder, or the image folder does not exist.
    """
    check_image_input(store, recipe.model.image_encoder)
    if recipe.model.image_encoder != "cnn":
        return StoredFeatures(store, recipe.data.region_dropout if train else 0.0)
    root = Path(recipe.data.image_root or store.image_root)
    if not root.is_dir():
        where = "data.image_root" if recipe.data.image_root else f"the image_root of {store.path}"
        raise MaxMatchError(f"image folder {root} ({where}) does not exist",
                            hint="set data.image_root to where the images are (--set data.image_root=DIR), or "
                                 "re-index them there with extract-features --kind pixels")
    return RawImages(store.image_files, root, recipe.data.image_size, train)


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


class EpochSampler(Sampler[int]):
    """Seeded shuffle per epoch, split over ranks, resumable from a step inside the epoch.

    Each epoch draws one permutation from ``seed + epoch``; rank r of w takes every w-th index (so the global
    batch is the same whatever the world size), and ``start_step`` skips the batches a resumed run already saw.
    The tail that does not fill a whole global batch is dropped so every step has equal-sized batches.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_step = 0, 0
        self.steps_per_epoch = n // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise MaxMatchError(f"the training split has {n} training items, fewer than one global batch "
                                f"({batch_size} x {world_size} processes)",
                                hint="lower train.batch_size or use a larger training split")

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        global_bs = self.batch_size * self.world_size
        perm = perm[self.start_step * global_bs: self.steps_per_epoch * global_bs]
        return iter(perm[self.rank:: self.world_size].tolist())

    def __len__(self) -> int:
        return max(self.steps_per_epoch - self.start_step, 0) * self.batch_size  # a resume past the end: empty


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
