"""Python API: load a trained checkpoint, encode images and captions into sets, rank a gallery.

A :class:`Model` is rebuilt from the checkpoint's own recipe and vocabulary (as ``maxmatch evaluate`` does), so
no recipe flags are needed. Encoding runs in eval mode without gradients, in batches of ``eval.batch_size``;
ranking scores the gallery in blocks with :func:`maxmatch_cli.method.similarity.set_similarity` and keeps a running
top-k, so a gallery larger than memory (a memory-mapped array) can be ranked. Nothing here imports the training
loop.

Example:
    >>> import maxmatch_cli
    >>> model = maxmatch_cli.load("demo/run/best.safetensors")
    >>> gallery = model.encode_images(store, indices)      # a FeatureStore + indices, or arrays of local features
    >>> queries = model.encode_texts(["two dogs on a red sofa"])
    >>> top = model.rank(queries, gallery, k=5)             # top.indices, top.scores: (1, 5)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader

from maxmatch_cli.models.checkpoint import load_checkpoint
from maxmatch_cli.data.batches import pad_regions
from maxmatch_cli.data.datasets import CaptionDataset, ImageDataset
from maxmatch_cli.data.images import build_image_source
from maxmatch_cli.devices import resolve_device
from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.evaluation.encoding import check_features, load_for_eval, similarity_options
from maxmatch_cli.config.recipes import Recipe
from maxmatch_cli.method.similarity import set_similarity

__all__ = ["DEFAULT_GALLERY_BLOCK", "Model", "Ranking", "load", "rank_sets"]

DEFAULT_GALLERY_BLOCK = 4096
"""Gallery sets scored per block by :meth:`Model.rank` (converted to float32 on the device one block at a time)."""

_DEVICE_HINT = "pass device='cpu' or device='auto'"


class Ranking(NamedTuple):
    """Top-k gallery items of each query, best first.

    Attributes:
        indices: ``(Q, k)`` long, row numbers into the gallery: positions in the sets passed as ``gallery``
            (e.g. in a split's image list), not image or caption ids. Map them back through the rows encoded:
            ``store.image_ids[store.split("test")[0][i]]`` for ``encode_images(store, store.split("test")[0])``.
        scores: ``(Q, k)`` float32 set similarities of those items.
    """

    indices: torch.Tensor
    scores: torch.Tensor


class Model:
    """A trained set-embedding model ready for inference (use :func:`load` to make one).

    Attributes:
        network: the rebuilt :class:`~maxmatch_cli.models.SetEmbeddingModel`, in eval mode.
        tokenizer: the checkpoint's vocabulary (Bi-GRU) or BERT tokenizer.
        recipe: the resolved recipe stored in the checkpoint.
        checkpoint: path of the checkpoint file.
        device: where encoding and scoring run.
        similarity: the default similarity of :meth:`rank` (the checkpoint's test-time similarity).
        num_embeds: K, elements per set.
        embed_dim: D, size of each element.
    """

    def __init__(self, network: torch.nn.Module, tokenizer: Any, recipe: Recipe, checkpoint: Path,
                 device: torch.device):
        self.network = network.eval()
        self.tokenizer = tokenizer
        self.recipe = recipe
        self.checkpoint = Path(checkpoint)
        self.device = device
        self.similarity = recipe.eval.similarity or recipe.loss.similarity
        self.num_embeds = recipe.model.num_embeds
        self.embed_dim = recipe.model.embed_dim
        self.batch_size = recipe.eval.batch_size
        self.max_len = recipe.data.max_caption_len

    def __repr__(self) -> str:
        return (f"Model({str(self.checkpoint)!r}, K={self.num_embeds}, D={self.embed_dim}, "
                f"similarity={self.similarity!r}, device={str(self.device)!r})")

    def similarity_options(self, kind: str) -> dict[str, Any]:
        """The checkpoint recipe's options for similarity ``kind`` (e.g. chamfer's ``alpha``)."""
        return similarity_options(self.recipe, kind)

    # ------------------------------------------------------------------------------------------- encoding

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str] | str, batch_size: int | None = None) -> torch.Tensor:
        """Encode captions into sets.

        Args:
            texts: captions (a single string is one caption).
            batch_size: captions per forward pass (default: the recipe's ``eval.batch_size``).

        Returns:
            ``(N, K, D)`` float32 sets on the CPU, in the order of ``texts`` (not L2-normalised: similarities
            normalise inside).

        Raises:
            MaxMatchError: ``texts`` holds something other than strings.
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        bad = next((t for t in texts if not isinstance(t, str)), None)
        if bad is not None:
            raise MaxMatchError(f"encode_texts takes captions as strings, got {type(bad).__name__}",
                                hint="pass a list of str")
        dataset = CaptionDataset(texts, self.tokenizer, self.max_len)
        loader = DataLoader(dataset, batch_size=batch_size or self.batch_size, collate_fn=dataset.collate)
        out = [self.network.encode_texts(tokens.to(self.device), mask.to(self.device)).sets.float().cpu()
               for tokens, mask in loader]
        return torch.cat(out) if out else self._empty()

    @torch.no_grad()
    def encode_images(self, features: Any, indices: Sequence[int] | np.ndarray | None = None,
                      batch_size: int | None = None, extractor: Any = None) -> torch.Tensor:
        """Encode images into sets.

        Args:
            features: the images' local features (regions or grid cells) as stored in a feature file, in one of
                these forms: one ``(R, F)`` array or tensor (one image); an ``(N, R, F)`` array or tensor (N
                images, all regions real); a list of ``(R_i, F)`` arrays or tensors (region counts may differ;
                they are padded and masked); or an open
                :class:`~maxmatch_cli.features.store.FeatureStore` with ``indices``. A store of image files
                (end-to-end CNN checkpoints) is read and transformed as at evaluation. Or image files: a path
                or a list of paths (``str`` or :class:`~pathlib.Path`); see ``extractor``.
            indices: store indices of the images to encode (only with a store; default: all its images).
            batch_size: images per forward pass (default: the recipe's ``eval.batch_size``).
            extractor: for image files and a checkpoint trained on extracted features: the feature file (an open
                FeatureStore or its path) written by ``extract-features images`` whose extractor settings and
                weights compute the files' features exactly as that file's were computed. Not needed for an
                end-to-end CNN checkpoint (``model.image_encoder='cnn'``), which reads pixels itself.

        Returns:
            ``(N, K, D)`` float32 sets on the CPU, in input order.

        Raises:
            MaxMatchError: the features' size differs from the checkpoint's, the input has the wrong shape, or
                arrays are given to a checkpoint that reads raw images.
        """
        batch_size = batch_size or self.batch_size
        if isinstance(features, (str, Path)) or (isinstance(features, (list, tuple)) and features
                                                  and all(isinstance(f, (str, Path)) for f in features)):
            if indices is not None:
                raise MaxMatchError("encode_images: indices are only taken with a FeatureStore",
                                    hint="pass the image files you want")
            paths = [features] if isinstance(features, (str, Path)) else list(features)
            return self._encode_files([Path(p) for p in paths], extractor, batch_size)
        if hasattr(features, "image_features") and hasattr(features, "split"):  # a FeatureStore
            return self._encode_store(features, indices, batch_size)
        if indices is not None:
            raise MaxMatchError("encode_images: indices are only taken with a FeatureStore",
                                hint="pass the arrays of the images you want, or a FeatureStore with indices")
        items = self._feature_list(features)
        out = []
        for start in range(0, len(items), batch_size):
            feats, mask = pad_regions(items[start: start + batch_size])
            out.append(self.network.encode_images(feats.to(self.device), mask.to(self.device)).sets.float().cpu())
        return torch.cat(out) if out else self._empty()

    def _encode_files(self, paths: list[Path], extractor: Any, batch_size: int) -> torch.Tensor:
        if self.recipe.model.image_encoder == "cnn":
            from maxmatch_cli.data.images import decode_image_file, pixel_transform

            transform = pixel_transform(self.recipe.data.image_size, train=False)
            out = []
            for start in range(0, len(paths), batch_size):
                pixels = torch.stack([transform(decode_image_file(p)) for p in paths[start: start + batch_size]])
                out.append(self.network.encode_images(pixels.to(self.device), None).sets.float().cpu())
            return torch.cat(out)
        from maxmatch_cli.features.images import extraction_of, features_of_files
        from maxmatch_cli.features.store import open_store

        if extractor is None:
            raise MaxMatchError(f"checkpoint {self.checkpoint} reads extracted image features, so image files need "
                                "the extractor its features came from",
                                hint="pass extractor= a feature file written by `extract-features images` "
                                     "(its settings and weights are reused)")
        store = open_store(extractor) if isinstance(extractor, (str, Path)) else extractor
        extraction = extraction_of(store) if hasattr(store, "metadata") else extractor
        if not isinstance(extraction, dict) or "config" not in extraction:
            source = getattr(store, "source", None) or "another source"
            raise MaxMatchError(f"the features of {getattr(store, 'path', extractor)} were not extracted from image "
                                f"files by maxmatch ({source}), so new image files cannot be encoded like them",
                                hint="query with images of that feature file by id instead, or build the index "
                                     "from a feature file written by `extract-features images`")
        return self.encode_images(features_of_files(paths, extraction, str(self.device)), batch_size=batch_size)

    def _encode_store(self, store, indices, batch_size: int) -> torch.Tensor:
        check_features(_CheckpointView(self), store)
        indices = np.arange(store.n_images) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= store.n_images):
            raise MaxMatchError(f"image indices must lie in 0..{store.n_images - 1} for {store.path}",
                                hint="pass store indices, e.g. from store.split('test')[0]")
        dataset = ImageDataset(store, indices, build_image_source(store, self.recipe, train=False))
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=dataset.collate)
        out = []
        for feats, mask in loader:
            mask = None if mask is None else mask.to(self.device)  # None: pixels
            out.append(self.network.encode_images(feats.to(self.device), mask).sets.float().cpu())
        return torch.cat(out) if out else self._empty()

    def _feature_list(self, features: Any) -> list[np.ndarray]:
        if self.recipe.model.image_encoder == "cnn":
            raise MaxMatchError(f"checkpoint {self.checkpoint} encodes raw images (model.image_encoder='cnn'), "
                                "not arrays of local features",
                                hint="pass a FeatureStore of image files (extract-features images DIR --kind pixels) "
                                     "with indices")
        if isinstance(features, (np.ndarray, torch.Tensor)):
            array = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else features
            if array.ndim == 2:
                items = [array]
            elif array.ndim == 3:
                items = list(array)
            else:
                raise MaxMatchError(f"encode_images takes (R, F) or (N, R, F) features, got shape {array.shape}",
                                    hint="one row per region (or grid cell), one matrix per image")
        elif isinstance(features, (list, tuple)):
            items = [f.detach().cpu().numpy() if isinstance(f, torch.Tensor) else np.asarray(f) for f in features]
            if any(f.ndim != 2 for f in items):
                shapes = sorted({f.shape for f in items if f.ndim != 2})
                raise MaxMatchError(f"a list given to encode_images must hold (R, F) arrays, got shape {shapes[0]}",
                                    hint="one (regions, feature size) matrix per image")
        else:
            raise MaxMatchError(f"encode_images cannot read {type(features).__name__}",
                                hint="pass an (N, R, F) array or tensor, a list of (R, F) arrays, or a FeatureStore")
        want = self.recipe.model.image_feature_dim
        for f in items:
            if f.shape[-1] != want:
                raise MaxMatchError(f"checkpoint {self.checkpoint} takes {want}-dimensional local features, got "
                                    f"{f.shape[-1]}-dimensional ones",
                                    hint="pass features of the kind it was trained on (same extractor)")
            if f.shape[0] == 0:
                raise MaxMatchError("encode_images got an image without regions (R = 0)",
                                    hint="every image needs at least one region or grid cell")
            if not np.issubdtype(f.dtype, np.floating):
                raise MaxMatchError(f"local features must be floating point, got {f.dtype}", hint="cast to float32")
        return items

    def _empty(self) -> torch.Tensor:
        return torch.zeros(0, self.num_embeds, self.embed_dim)

    # ------------------------------------------------------------------------------------------- ranking

    @torch.no_grad()
    def rank(self, queries: torch.Tensor, gallery: torch.Tensor | np.ndarray, kind: str | None = None,
             k: int = 10, *, query_side: str = "text", block_size: int | None = None,
             **options: Any) -> Ranking:
        """The ``k`` best gallery sets for each query set, by exact set similarity.

        The gallery is scored in blocks of ``block_size`` sets (each converted to float32 on the device, so a
        float16 memory-mapped array works) and a running top-k is kept. Ties are broken by the lower gallery
        row, so the result equals a stable descending sort of the full similarity matrix.

        Args:
            queries: ``(Q, K, D)`` query sets (one ``(K, D)`` set is one query).
            gallery: ``(N, K', D)`` gallery sets: a tensor or a NumPy array (memory-mapped is fine).
            kind: similarity name (default: the checkpoint's, :attr:`similarity`).
            k: how many items per query (at most N).
            query_side: ``"text"`` when the queries are caption sets and the gallery image sets (the
                similarity is called as ``set_similarity(gallery, queries)``), ``"image"`` for the reverse.
                Only matters for asymmetric similarities (sinkhorn).
            block_size: gallery sets per block (default :data:`DEFAULT_GALLERY_BLOCK`).
            **options: similarity options; default the checkpoint recipe's (e.g. chamfer's ``alpha``).

        Returns:
            :class:`Ranking` of ``(Q, k)`` gallery rows (positions in ``gallery``, not ids) and scores, on the
            CPU.

        Raises:
            MaxMatchError: unknown similarity or option, mismatched shapes, ``k < 1``.
        """
        kind = kind or self.similarity
        options = {**self.similarity_options(kind), **options}
        return rank_sets(queries, gallery, kind, k, query_side=query_side, block_size=block_size,
                         device=self.device, **options)


class _CheckpointView:
    """What :func:`maxmatch_cli.evaluation.encoding.check_features` reads of a checkpoint (its path and recipe)."""

    def __init__(self, model: Model):
        self.path, self.recipe = model.checkpoint, model.recipe


def _as_float_tensor(block: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A float32 tensor of ``block``; float16 arrays (index sets) are converted by torch, 1.5x faster than numpy."""
    if isinstance(block, np.ndarray):
        if block.dtype == np.float16:
            owned = block.flags.writeable and block.flags.c_contiguous  # a memory-map slice is read-only: copy
            return torch.from_numpy(block if owned else np.array(block)).float()
        return torch.from_numpy(np.asarray(block, dtype=np.float32))
    return block.float()


@torch.no_grad()
def rank_sets(queries: torch.Tensor, gallery: torch.Tensor | np.ndarray, kind: str = "maxmatch", k: int = 10, *,
              query_side: str = "text", block_size: int | None = None, device: str | torch.device = "cpu",
              **options: Any) -> Ranking:
    """:meth:`Model.rank` without a model: the ``k`` best gallery sets per query set, scored in blocks.

    Args and result as for :meth:`Model.rank`; ``kind`` and ``options`` are taken as given (no recipe defaults)
    and the scoring runs on ``device``.
    """
    device = torch.device(device)
    if query_side not in ("text", "image"):
        raise MaxMatchError(f"query_side must be 'text' or 'image', got {query_side!r}",
                            hint="'text': caption queries against an image gallery")
    if not isinstance(gallery, (torch.Tensor, np.ndarray)):
        raise MaxMatchError(f"rank takes the gallery as a tensor or NumPy array, got {type(gallery).__name__}",
                            hint="encode it with encode_images (or load an index's sets)")
    queries = torch.as_tensor(queries)
    queries = queries.unsqueeze(0) if queries.dim() == 2 else queries
    if gallery.ndim != 3 or queries.dim() != 3:
        raise MaxMatchError(f"rank takes (Q, K, D) queries and an (N, K, D) gallery, got "
                            f"{tuple(queries.shape)} and {tuple(gallery.shape)}",
                            hint="encode them with encode_texts / encode_images")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise MaxMatchError(f"k must be a positive integer, got {k!r}", hint="e.g. k=10")
    block_size = block_size or DEFAULT_GALLERY_BLOCK
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise MaxMatchError(f"block_size must be a positive integer, got {block_size!r}", hint="e.g. 4096")
    n = int(gallery.shape[0])
    k = min(k, n)
    q = queries.to(device, torch.float32)
    best_scores = torch.empty(q.shape[0], 0, device=device)
    best_index = torch.empty(q.shape[0], 0, dtype=torch.long, device=device)
    for start in range(0, n, block_size):
        block = _as_float_tensor(gallery[start: start + block_size]).to(device)
        if query_side == "text":
            scores = set_similarity(block, q, kind=kind, **options).T
        else:
            scores = set_similarity(q, block, kind=kind, **options)
        index = torch.arange(start, start + block.shape[0], device=device).expand(q.shape[0], -1)
        # Earlier candidates first and a stable sort: equal scores keep the lower gallery row first.
        scores = torch.cat([best_scores, scores.float()], dim=1)
        index = torch.cat([best_index, index], dim=1)
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
        best_scores, best_index = scores.gather(1, order), index.gather(1, order)
    return Ranking(best_index.cpu(), best_scores.cpu())


def load(checkpoint: str | Path, device: str | torch.device = "auto") -> Model:
    """Load a checkpoint for inference: the model rebuilt from its own recipe and vocabulary.

    Args:
        checkpoint: a ``.safetensors`` file written by ``maxmatch train``, or a run folder (its
            ``best.safetensors``, else ``last.safetensors``).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``, or a ``torch.device``.

    Returns:
        A :class:`Model` in eval mode.

    Raises:
        MaxMatchError: the file is missing, not a maxmatch checkpoint, or does not match its recipe's model.

    Example:
        >>> import maxmatch_cli
        >>> model = maxmatch_cli.load("demo/run/best.safetensors", device="cpu")
        >>> texts = model.encode_texts(["a man riding a red bike", "two dogs on a sofa"])
        >>> images = model.encode_images(store, store.split("test")[0])
        >>> top = model.rank(texts, images, k=10)  # top.indices (2, 10): positions in images; top.scores (2, 10)
    """
    dev = device if isinstance(device, torch.device) else resolve_device(str(device), hint=_DEVICE_HINT)
    ckpt = load_checkpoint(checkpoint)
    network, tokenizer = load_for_eval(ckpt, dev)
    return Model(network, tokenizer, ckpt.recipe, ckpt.path, dev)
