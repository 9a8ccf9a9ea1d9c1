"""Set-collapse diagnostics.

:func:`circular_variance` (public, stable) and the analyses behind ``maxmatch analyze-collapse``: circular
variance summaries and the per-slot ablation (paper §4.4, Table 4), the K x K pair heatmaps (Figure 4),
per-element retrieval with its diversity (§4.5) and, on request, a t-SNE of the set elements (Figure 3).
:func:`analyze_collapse` runs them all on a checkpoint and returns a :class:`CollapseReport`; writing it (CSV files,
figures, ``collapse.json``) is :func:`maxmatch_cli.reporting.collapse.write_collapse_report`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from maxmatch_cli.errors import MaxMatchError

__all__ = ["CollapseReport", "TsnePoints", "analyze_collapse", "circular_variance", "pair_heatmaps",
           "slot_ablation", "slot_retrieval", "tsne_points", "variance_summary"]


def circular_variance(sets: torch.Tensor) -> torch.Tensor:
    """Circular variance of each set: ``1 - ||mean of the L2-normalised elements||^2``.

    0 when all elements point the same way (a collapsed set); ``1 - 1/K`` for K orthonormal elements; at most 1.
    Zero-norm elements count as zero vectors.

    Args:
        sets: (N, K, D) set elements, any scale.

    Returns:
        (N,) circular variance per set, in the input's floating dtype.
    """
    if not isinstance(sets, torch.Tensor) or sets.dim() != 3 or sets.shape[1] == 0:
        shape = tuple(sets.shape) if isinstance(sets, torch.Tensor) else type(sets).__name__
        raise MaxMatchError(f"sets must be a (N, K, D) tensor with K >= 1, got {shape}")
    if not sets.is_floating_point():
        sets = sets.float()
    mean = F.normalize(sets, dim=-1).mean(dim=1)
    return 1.0 - mean.pow(2).sum(dim=-1)


# ----------------------------------------------------------------------------------------- set analyses (§4.4, §4.5)
#
# All functions below take the embeddings of one split in the evaluation layout: images (N, K, D) and captions
# (N * captions_per_image, K, D), caption j describing image j // captions_per_image.


def variance_summary(sets: torch.Tensor) -> dict[str, float | None]:
    """Circular variance of a modality's sets: mean, median and ``log(mean)`` (the paper's log(Var.), Table 4).

    ``log_mean`` is None when the mean is 0 (every set fully collapsed).
    """
    cv = circular_variance(sets).double()
    mean = float(cv.mean())
    return {"mean": mean, "median": float(cv.median()), "min": float(cv.min()), "max": float(cv.max()),
            "log_mean": math.log(mean) if mean > 0 else None}


def slot_ablation(images: torch.Tensor, captions: torch.Tensor, kind: str = "maxmatch", protocol: str = "full",
                  captions_per_image: int = 5, device: torch.device | str = "cpu", block_size: int = 256,
                  show_progress: bool = False, **options: Any) -> dict[str, Any]:
    """Table 4: retrieval with every element, with only image element k (captions whole), and with only text
    element k (images whole), scored by ``kind`` on the reduced sets (K' = 1 on one side). ``show_progress``:
    a bar (in a log: a line) per scoring, 1 + K + K' of them.

    Returns:
        ``{"full": metrics, "image": [{"slot": k (1-based), **metrics}], "text": [...]}`` with the metrics of
        :func:`maxmatch_cli.evaluation.protocols.metrics_for` under ``protocol`` (its main ``metrics``).
    """
    from maxmatch_cli.evaluation.encoding import score
    from maxmatch_cli.evaluation.protocols import metrics_for

    device = torch.device(device)

    def metrics(img: torch.Tensor, txt: torch.Tensor) -> dict[str, float]:
        sims = score(img, txt, kind, device, block_size, show_progress=show_progress, **options)
        return metrics_for(sims, protocol, captions_per_image).metrics

    out: dict[str, Any] = {"full": metrics(images, captions), "image": [], "text": []}
    for k in range(images.shape[1]):
        out["image"].append({"slot": k + 1, **metrics(images[:, k: k + 1], captions)})
    for k in range(captions.shape[1]):
        out["text"].append({"slot": k + 1, **metrics(images, captions[:, k: k + 1])})
    return out


@torch.no_grad()
def _element_top1(queries: torch.Tensor, gallery: torch.Tensor, device: torch.device, block_size: int) -> torch.Tensor:
    """For each element of each query set, the gallery set holding its most similar element.

    ``queries (Q, K, D)``, ``gallery (G, K', D)`` -> ``(Q, K)`` long gallery indices (ties: the lowest index).
    """
    from maxmatch_cli.method.similarity import set_similarity

    q, k, dim = queries.shape
    flat = queries.reshape(q * k, 1, dim)
    gal = gallery.to(device)
    out = torch.empty(q * k, dtype=torch.long)
    rows = max(1, block_size * k)
    for start in range(0, q * k, rows):
        block = flat[start: start + rows].to(device)
        # "mil" on a one-element query is the best-matched gallery element (§4.5)
        out[start: start + block.shape[0]] = set_similarity(block, gal, "mil").argmax(dim=1).cpu()
    return out.view(q, k)


def _distinct_per_row(x: torch.Tensor) -> torch.Tensor:
    s = x.sort(dim=1).values
    return 1 + (s[:, 1:] != s[:, :-1]).sum(dim=1)


def slot_retrieval(images: torch.Tensor, captions: torch.Tensor, captions_per_image: int = 5,
                   device: torch.device | str = "cpu", block_size: int = 256) -> dict[str, Any]:
    """§4.5: retrieve with each query element alone against the best-matched element of every gallery set.

    Image-to-text: element k of an image retrieves the caption whose set holds its most similar element;
    text-to-image likewise. Per direction: R@1 (%) of each element alone, R@1 of the best element ("any", an
    oracle), and diversity: the mean number of distinct items the K elements of a query retrieve (1 for a
    collapsed set, K when every element finds another item); image-to-text also counts distinct images.

    Returns:
        ``{"i2t": {"r1": [K floats], "r1_any", "distinct", "distinct_images"}, "t2i": {"r1", "r1_any",
        "distinct"}, "K": K}``.
    """
    device = torch.device(device)
    n_images = images.shape[0]
    i2t_top = _element_top1(images, captions, device, block_size)  # (N, K) caption indices
    i2t_hit = (i2t_top // captions_per_image) == torch.arange(n_images).unsqueeze(1)
    t2i_top = _element_top1(captions, images, device, block_size)  # (5N, K) image indices
    t2i_hit = t2i_top == (torch.arange(captions.shape[0]) // captions_per_image).unsqueeze(1)

    def summary(hit: torch.Tensor, top: torch.Tensor) -> dict[str, Any]:
        return {"r1": (100.0 * hit.double().mean(0)).tolist(), "r1_any": 100.0 * float(hit.any(1).double().mean()),
                "distinct": float(_distinct_per_row(top).double().mean())}

    i2t = summary(i2t_hit, i2t_top)
    i2t["distinct_images"] = float(_distinct_per_row(i2t_top // captions_per_image).double().mean())
    return {"K": images.shape[1], "i2t": i2t, "t2i": summary(t2i_hit, t2i_top)}


@torch.no_grad()
def pair_heatmaps(images: torch.Tensor, captions: torch.Tensor, captions_per_image: int = 5,
                  block_size: int = 1024) -> dict[str, torch.Tensor]:
    """Figure 4: the K x K cosine matrix between each image set and each of its own captions' sets, averaged.

    ``raw[k, l]`` averages the cosine of image element k and text element l in their stored order. ``aligned``
    first reorders each caption's elements by the MaxMatch assignment, so that column k holds the text element
    matched to image element k: the diagonal then averages the matched cosines, the rest the unmatched ones.

    Returns:
        ``{"raw": (K, K), "aligned": (K, K)}`` float64 on the CPU.
    """
    from maxmatch_cli.method.assignment import max_trace_assignment

    n, k_img, dim = images.shape
    if captions.shape[0] != n * captions_per_image:
        raise MaxMatchError(f"{captions.shape[0]} caption sets do not fit {n} images x {captions_per_image}",
                            hint="captions must be grouped by image, captions_per_image each")
    k_txt = captions.shape[1]
    if k_img != k_txt:
        raise MaxMatchError(f"image sets have {k_img} elements and text sets {k_txt}",
                            hint="the heatmaps need sets of one size K")
    img = F.normalize(images.float(), dim=-1)
    txt = F.normalize(captions.float(), dim=-1).view(n, captions_per_image, k_txt, dim)
    raw = torch.zeros(k_img, k_txt, dtype=torch.float64)
    aligned = torch.zeros_like(raw)
    for start in range(0, n, block_size):
        c = torch.einsum("nkd,ncld->nckl", img[start: start + block_size], txt[start: start + block_size])
        c = c.reshape(-1, k_img, k_txt)
        perm = max_trace_assignment(c)  # (M, K): text element matched to image element k
        raw += c.double().sum(0)
        aligned += c.gather(-1, perm.unsqueeze(-2).expand_as(c)).double().sum(0)
    pairs = n * captions_per_image
    return {"raw": raw / pairs, "aligned": aligned / pairs}


def heatmap_contrast(heatmap: torch.Tensor) -> dict[str, float]:
    """Mean of the diagonal and of the off-diagonal entries of a square heatmap."""
    k = heatmap.shape[0]
    diag = float(heatmap.diagonal().mean())
    off = float((heatmap.sum() - heatmap.diagonal().sum()) / (k * k - k)) if k > 1 else float("nan")
    return {"diagonal": diag, "off_diagonal": off}


@dataclass
class TsnePoints:
    """2-D t-SNE coordinates of the elements of some image sets and their captions' sets (Figure 3).

    Point order: the N images' elements (image-major, element k minor), then the N x captions_per_image captions'.
    """

    coords: np.ndarray
    """(M, 2) float64, M = N K + N cpi K."""
    modality: np.ndarray
    """(M,) 'image' or 'text'."""
    slot: np.ndarray
    """(M,) element index k within its set, 0-based."""
    item: np.ndarray
    """(M,) index of the set in its split: the image, or the caption (caption j describes image j // cpi)."""
    n_images: int
    captions_per_image: int
    perplexity: float
    random_state: int
    kl_divergence: float

    def summary(self) -> dict[str, Any]:
        """The settings and size of the embedding, for ``collapse.json``."""
        return {"n_images": self.n_images, "n_captions": self.n_images * self.captions_per_image,
                "points": int(len(self.coords)), "perplexity": self.perplexity, "random_state": self.random_state,
                "init": "pca", "kl_divergence": self.kl_divergence}


def tsne_points(images: torch.Tensor, captions: torch.Tensor, n_images: int, captions_per_image: int = 5,
                random_state: int = 0, perplexity: float = 30.0) -> TsnePoints:
    """Figure 3: one joint t-SNE (scikit-learn, ``init="pca"``, fixed ``random_state``) of the L2-normalised
    elements of the first ``n_images`` image sets and of their captions' sets.

    Args:
        images: (N, K, D) image sets of a split.
        captions: (N * captions_per_image, K', D) caption sets, grouped by image.
        n_images: how many images (from the first) with their captions; at most N.
        captions_per_image: captions of each image.
        random_state: seed of the t-SNE (the same seed and input give the same coordinates; with the PCA
            initialisation it rarely changes them).
        perplexity: upper bound of the t-SNE perplexity (lowered to (M - 1) / 3 for few points).

    Returns:
        :class:`TsnePoints` with N K image points and N cpi K' text points.

    Raises:
        MaxMatchError: n_images below 1, or scikit-learn is not installed.
    """
    if n_images < 1:
        raise MaxMatchError(f"--tsne {n_images}: the t-SNE needs at least one image", hint="e.g. --tsne 100")
    try:
        from sklearn.manifold import TSNE
        from threadpoolctl import threadpool_limits  # a dependency of scikit-learn
    except ImportError:
        raise MaxMatchError("the t-SNE needs scikit-learn, which is not installed",
                            hint="pip install 'maxmatch[viz]' (or `make install`)") from None
    n = min(int(n_images), images.shape[0])
    img = F.normalize(images[:n].float(), dim=-1)
    txt = F.normalize(captions[: n * captions_per_image].float(), dim=-1)
    k_img, k_txt = img.shape[1], txt.shape[1]
    x = torch.cat([img.reshape(-1, img.shape[-1]), txt.reshape(-1, txt.shape[-1])]).double().numpy()
    perplexity = float(min(perplexity, max(1.0, (len(x) - 1) / 3)))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=random_state)
    # One OpenMP thread: right after torch's parallel regions its idle threads still spin, and sklearn's second
    # OpenMP runtime competing with them on a small machine made a 150-point t-SNE take 20 s instead of 0.5 s.
    with threadpool_limits(limits=1, user_api="openmp"):
        coords = tsne.fit_transform(x)
    n_txt = txt.shape[0]
    return TsnePoints(
        coords=np.asarray(coords, dtype=np.float64),
        modality=np.array(["image"] * (n * k_img) + ["text"] * (n_txt * k_txt)),
        slot=np.concatenate([np.tile(np.arange(k_img), n), np.tile(np.arange(k_txt), n_txt)]),
        item=np.concatenate([np.repeat(np.arange(n), k_img), np.repeat(np.arange(n_txt), k_txt)]),
        n_images=n, captions_per_image=captions_per_image, perplexity=perplexity, random_state=random_state,
        kl_divergence=float(tsne.kl_divergence_))


# ----------------------------------------------------------------------------------------- the whole report


@dataclass
class CollapseReport:
    """Everything ``maxmatch analyze-collapse`` computes (see :func:`analyze_collapse`)."""

    checkpoint: str
    data: str
    split: str
    similarity: str
    protocol: str
    n_images: int
    n_captions: int
    K: int
    variance: dict[str, dict[str, float | None]]
    ablation: dict[str, Any]
    heatmaps: dict[str, list[list[float]]]
    contrast: dict[str, dict[str, float]]
    retrieval: dict[str, Any]
    tsne: dict[str, Any] = field(default_factory=dict)
    """Settings and size of the t-SNE (:meth:`TsnePoints.summary`); empty when none was asked for."""
    elements: list[dict[str, Any]] = field(default_factory=list)
    """Per-element retrieval (Figures 5–7): one record per model, the analysed checkpoint first, then the
    ``--compare`` one (:meth:`~maxmatch_cli.evaluation.element_retrieval.ElementRetrieval.to_json`)."""
    out_dir: str = ""
    files: list[str] = field(default_factory=list)
    """Files written to ``out_dir`` (names)."""
    notes: list[str] = field(default_factory=list)
    cache_files: list[str] = field(default_factory=list)
    """Embedding cache files written on the way (full paths; not part of the report on disk)."""
    points: TsnePoints | None = None
    """The t-SNE's points when one was asked for (written as tsne.csv; not part of collapse.json)."""

    def to_json(self) -> dict[str, Any]:
        """The report as ``collapse.json`` holds it (without the cache files and the t-SNE points)."""
        out = asdict(replace(self, points=None))
        del out["cache_files"], out["points"]
        return out


def analyze_collapse(checkpoint: str | Path, data: str | None = None, split: str | None = None,
                     protocol: str | None = None, similarity: str | None = None, device: str = "auto",
                     cache: bool = True, show_progress: bool = True, tsne: int = 0,
                     tsne_seed: int = 0, examples: int | str = 4, compare: str | Path | None = None,
                     image_root: str | Path | None = None) -> CollapseReport:
    """Set-collapse analyses of a checkpoint on a split.

    Encodes the split (or reads the embedding cache), then computes the circular variance of both modalities,
    the per-slot ablation with the checkpoint's similarity (or ``similarity``), the pair heatmaps and
    per-element retrieval; with ``tsne`` > 0 also the t-SNE of the first ``tsne`` images' and their captions'
    elements (:func:`tsne_points`). Nothing but the embedding cache is written here:
    :func:`maxmatch_cli.reporting.collapse.write_collapse_report` writes the report.

    Args:
        checkpoint: checkpoint file or run folder.
        data: feature file (default: the recipe's).
        split: split (default: ``eval.split``).
        protocol: protocol of the ablation's metrics (default: ``eval.protocol``).
        similarity: similarity of the ablation (default: the checkpoint's test-time similarity).
        device: auto, cpu, cuda or cuda:N.
        cache: use the embedding cache.
        show_progress: progress bars while encoding.
        tsne: images (from the first of the split) whose elements and captions' elements the t-SNE shows; 0: none.
        tsne_seed: random_state of the t-SNE.
        examples: the images whose per-element retrieval is shown, both directions (a count, or image ids
            separated by commas; :func:`~maxmatch_cli.evaluation.element_retrieval.pick_examples`); the
            distinct-item means over the whole split are computed whatever it is.
        compare: a second checkpoint whose per-element retrieval is shown beside (same images and captions).
        image_root: image folder for thumbnails (default: an image-file store's own; see
            :func:`~maxmatch_cli.evaluation.element_retrieval.image_files`).

    Returns:
        :class:`CollapseReport` (``points`` set when ``tsne`` > 0; ``out_dir`` and ``files`` empty until it is
        written).
    """
    from maxmatch_cli.devices import resolve_device
    from maxmatch_cli.evaluation.cache import checkpoint_embeddings
    from maxmatch_cli.evaluation.encoding import similarity_options
    from maxmatch_cli.evaluation.evaluate import open_scoring
    from maxmatch_cli.evaluation.protocols import check_protocol
    from maxmatch_cli.method.similarity import check_similarity

    if protocol is not None:
        check_protocol(protocol)
    check_similarity(similarity)
    if tsne < 0:
        raise MaxMatchError(f"--tsne {tsne} is negative", hint="the number of images to show, or 0 for no t-SNE")
    if tsne:
        try:
            import sklearn.manifold  # noqa: F401  (fail before the encoding, not after)
        except ImportError:
            raise MaxMatchError("--tsne needs scikit-learn, which is not installed",
                                hint="pip install 'maxmatch[viz]' (or `make install`)") from None
    dev = resolve_device(device)
    opened = open_scoring(checkpoint, data, split, protocol, similarity)
    ckpt, store, split, kind, protocol = opened.ckpt, opened.store, opened.split, opened.kind, opened.protocol
    recipe = ckpt.recipe
    cpi = recipe.data.captions_per_image
    setup = _element_setup(opened, examples, compare, data, image_root)
    written: list[Path] = []
    emb = checkpoint_embeddings(ckpt, store, split, dev, cache=cache, show_progress=show_progress, written=written)
    images, captions = emb.images, emb.captions
    ablation = slot_ablation(images, captions, kind, protocol, cpi, dev, recipe.eval.block_size,
                             show_progress=show_progress, **similarity_options(recipe, kind))
    maps = pair_heatmaps(images, captions, cpi)
    report = CollapseReport(
        checkpoint=str(ckpt.path), data=str(store.path), split=split, similarity=kind,
        protocol=protocol, n_images=images.shape[0],
        n_captions=captions.shape[0], K=images.shape[1],
        variance={"image": variance_summary(images), "text": variance_summary(captions)}, ablation=ablation,
        heatmaps={name: m.tolist() for name, m in maps.items()},
        contrast={name: heatmap_contrast(m) for name, m in maps.items()},
        retrieval=slot_retrieval(images, captions, cpi, dev, recipe.eval.block_size))
    if tsne:
        report.points = tsne_points(images, captions, tsne, cpi, random_state=tsne_seed)
        report.tsne = report.points.summary()
        if report.points.n_images < tsne:
            report.notes.append(f"split {split} has {report.points.n_images:,} images: the t-SNE shows all of them")
    report.elements = _element_records(opened, setup, images, captions, dev, cache, show_progress, written)
    report.cache_files = [str(p) for p in written]
    return report


def _element_setup(opened, examples: int | str, compare: str | Path | None, data: str | None,
                   image_root: str | Path | None):
    """What the per-element retrieval shows, checked before anything is encoded: the split's items, the picked
    images and the ``--compare`` checkpoint with its store (or None)."""
    from maxmatch_cli.evaluation.element_retrieval import open_compare, pick_examples, split_items

    ckpt, store, split = opened.ckpt, opened.store, opened.split
    cpi = ckpt.recipe.data.captions_per_image
    items = split_items(store, split, cpi, image_root or ckpt.recipe.data.image_root or None)
    picks = pick_examples(examples, items.image_ids)
    other = open_compare((ckpt.path, store), compare, data, split, cpi) if compare is not None else None
    return items, picks, other


def _element_records(opened, setup, images: torch.Tensor, captions: torch.Tensor, device: torch.device,
                     cache: bool, show_progress: bool, written: list[Path]) -> list[dict[str, Any]]:
    """Per-element retrieval of the analysed checkpoint and, with a compared one, of that one too."""
    from maxmatch_cli.evaluation.cache import checkpoint_embeddings
    from maxmatch_cli.evaluation.element_retrieval import element_retrieval

    items, picks, other = setup
    out = [element_retrieval(images, captions, items, picks, str(opened.ckpt.path), device,
                             opened.ckpt.recipe.loss.similarity, show_progress).to_json()]
    if other is not None:
        ckpt, store = other
        emb = checkpoint_embeddings(ckpt, store, opened.split, device, cache=cache, show_progress=show_progress,
                                    written=written)
        out.append(element_retrieval(emb.images, emb.captions, items, picks, str(ckpt.path), device,
                                     ckpt.recipe.loss.similarity, show_progress).to_json())
    return out
