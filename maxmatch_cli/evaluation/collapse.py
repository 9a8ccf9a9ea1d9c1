"""Set-collapse diagnostics.

:func:`circular_variance` (public, stable) and the analyses behind ``maxmatch analyze-collapse``: circular
variance summaries and the per-slot ablation (paper §4.4, Table 4), the K x K pair heatmaps (Figure 4),
per-element retrieval with its diversity (§4.5) and, on request, a t-SNE of the set elements (Figure 3).
:func:`analyze_collapse` runs them all on a checkpoint.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.fileio import write_text

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
                  **options: Any) -> dict[str, Any]:
    """Table 4: retrieval with every element, with only image element k (captions whole), and with only text
    element k (images whole), scored by ``kind`` on the reduced sets (K' = 1 on one side).

    Returns:
        ``{"full": metrics, "image": [{"slot": k (1-based), **metrics}], "text": [...]}`` with the metrics of
        :func:`maxmatch_cli.evaluation.evaluate.metrics_for` under ``protocol`` (its main ``metrics``).
    """
    from maxmatch_cli.evaluation.evaluate import metrics_for, score

    device = torch.device(device)

    def metrics(img: torch.Tensor, txt: torch.Tensor) -> dict[str, float]:
        sims = score(img, txt, kind, device, block_size, **options)
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

    def to_csv(self) -> str:
        lines = ["modality,item,element,x,y"]
        lines += [f"{m},{i},{k + 1},{x:.6f},{y:.6f}"
                  for m, i, k, (x, y) in zip(self.modality, self.item, self.slot, self.coords)]
        return "\n".join(lines) + "\n"


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
    out_dir: str = ""
    files: list[str] = field(default_factory=list)
    """Files written to ``out_dir`` (names)."""
    notes: list[str] = field(default_factory=list)
    cache_files: list[str] = field(default_factory=list)
    """Embedding cache files written on the way (full paths; not part of the report on disk)."""

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        del out["cache_files"]
        return out


def analyze_collapse(checkpoint: str | Path, data: str | None = None, split: str | None = None,
                     protocol: str | None = None, similarity: str | None = None, out_dir: Path | None = None,
                     device: str = "auto", cache: bool = True, show_progress: bool = True,
                     tsne: int = 0, tsne_seed: int = 0) -> CollapseReport:
    """Set-collapse analyses of a checkpoint on a split, written to ``out_dir``.

    Encodes the split (or reads the embedding cache), then computes the circular variance of both modalities,
    the per-slot ablation with the checkpoint's similarity (or ``similarity``), the pair heatmaps and
    per-element retrieval. Writes ``collapse.json`` (everything), ``circular_variance.csv``,
    ``slot_ablation.csv``, ``heatmap_raw.csv``, ``heatmap_aligned.csv``, ``slot_retrieval.csv`` and, when
    matplotlib is importable, ``heatmaps.png`` and ``heatmaps.pdf``. With ``tsne`` > 0 also the t-SNE of the first
    ``tsne`` images' and their captions' elements (:func:`tsne_points`): ``tsne.csv``, ``tsne.png``, ``tsne.pdf``.

    Args:
        checkpoint: checkpoint file or run folder.
        data: feature file (default: the recipe's).
        split: split (default: ``eval.split``).
        protocol: protocol of the ablation's metrics (default: ``eval.protocol``).
        similarity: similarity of the ablation (default: the checkpoint's test-time similarity).
        out_dir: output folder (default: ``collapse-<checkpoint stem>-<split>`` next to the checkpoint).
        device: auto, cpu, cuda or cuda:N.
        cache: use the embedding cache.
        show_progress: progress bars while encoding.
        tsne: images (from the first of the split) whose elements and captions' elements the t-SNE shows; 0: none.
        tsne_seed: random_state of the t-SNE.

    Returns:
        :class:`CollapseReport`, with the files written.
    """
    from maxmatch_cli.models.checkpoint import load_checkpoint
    from maxmatch_cli.data.datasets import split_layout
    from maxmatch_cli.devices import resolve_device
    from maxmatch_cli.evaluation.evaluate import check_protocol, checkpoint_embeddings, resolve_protocol, similarity_options
    from maxmatch_cli.features.store import open_store

    if protocol is not None:
        check_protocol(protocol)
    if tsne < 0:
        raise MaxMatchError(f"--tsne {tsne} is negative", hint="the number of images to show, or 0 for no t-SNE")
    if tsne:
        try:
            import sklearn.manifold  # noqa: F401  (fail before the encoding, not after)
        except ImportError:
            raise MaxMatchError("--tsne needs scikit-learn, which is not installed",
                                hint="pip install 'maxmatch[viz]' (or `make install`)") from None
    dev = resolve_device(device)
    ckpt = load_checkpoint(checkpoint)
    recipe = ckpt.recipe
    store = open_store(data or recipe.data.path)
    split = split or recipe.eval.split
    kind = similarity or recipe.eval.similarity or recipe.loss.similarity
    cpi = recipe.data.captions_per_image
    protocol = resolve_protocol(protocol or recipe.eval.protocol, len(split_layout(store, split, cpi)[0]), split)
    written: list[Path] = []
    emb = checkpoint_embeddings(ckpt, store, split, dev, cache=cache, show_progress=show_progress, written=written)
    images, captions = emb.images, emb.captions
    ablation = slot_ablation(images, captions, kind, protocol, cpi, dev, recipe.eval.block_size,
                             **similarity_options(recipe, kind))
    maps = pair_heatmaps(images, captions, cpi)
    report = CollapseReport(
        checkpoint=str(ckpt.path), data=str(store.path), split=split, similarity=kind,
        protocol=protocol, n_images=images.shape[0],
        n_captions=captions.shape[0], K=images.shape[1],
        variance={"image": variance_summary(images), "text": variance_summary(captions)}, ablation=ablation,
        heatmaps={name: m.tolist() for name, m in maps.items()},
        contrast={name: heatmap_contrast(m) for name, m in maps.items()},
        retrieval=slot_retrieval(images, captions, cpi, dev, recipe.eval.block_size))
    points = None
    if tsne:
        points = tsne_points(images, captions, tsne, cpi, random_state=tsne_seed)
        report.tsne = points.summary()
        if points.n_images < tsne:
            report.notes.append(f"split {split} has {points.n_images:,} images: the t-SNE shows all of them")
    out = Path(out_dir) if out_dir is not None else ckpt.path.parent / f"collapse-{ckpt.path.stem}-{split}"
    write_collapse_report(report, out, tsne=points)
    report.cache_files = [str(p) for p in written]
    return report


def _matrix_csv(m: list[list[float]]) -> str:
    head = "," + ",".join(f"text{l + 1}" for l in range(len(m[0])))
    return "\n".join([head, *(f"image{k + 1}," + ",".join(f"{v:.6f}" for v in row) for k, row in enumerate(m))]) + "\n"


def _collapse_csvs(report: CollapseReport) -> dict[str, str]:
    from maxmatch_cli.evaluation.metrics import METRIC_KEYS

    var = ["modality,mean,median,min,max,log_mean"]
    for name, v in report.variance.items():
        log_mean = "" if v["log_mean"] is None else f"{v['log_mean']:.6f}"
        var.append(f"{name},{v['mean']:.6f},{v['median']:.6f},{v['min']:.6f},{v['max']:.6f},{log_mean}")
    abl = ["set,slot," + ",".join(METRIC_KEYS)]
    rows = [("all", "all", report.ablation["full"])]
    rows += [(side, str(r["slot"]), r) for side in ("image", "text") for r in report.ablation[side]]
    abl += [f"{side},{slot}," + ",".join(f"{m[key]:.4f}" for key in METRIC_KEYS) for side, slot, m in rows]
    ret = ["direction,measure,value"]
    for direction in ("i2t", "t2i"):
        r = report.retrieval[direction]
        ret += [f"{direction},r1_element{k + 1},{v:.4f}" for k, v in enumerate(r["r1"])]
        ret += [f"{direction},{key},{r[key]:.4f}" for key in ("r1_any", "distinct", "distinct_images") if key in r]
    return {"circular_variance.csv": "\n".join(var) + "\n", "slot_ablation.csv": "\n".join(abl) + "\n",
            "heatmap_raw.csv": _matrix_csv(report.heatmaps["raw"]),
            "heatmap_aligned.csv": _matrix_csv(report.heatmaps["aligned"]), "slot_retrieval.csv": "\n".join(ret) + "\n"}


def _heatmap_figures(report: CollapseReport, stem: Path) -> list[str]:
    """Both heatmaps side by side as ``stem``.png and .pdf; [] when matplotlib is not installed.

    One colour scale for both panels, fitted to their values (the cosines of a trained model sit in a narrow band
    that a fixed [0, 1] scale would flatten); the title names the checkpoint, split and similarity."""
    from maxmatch_cli.reporting.plots import pyplot, save_figure

    plt = pyplot()
    if plt is None:
        return []
    mats = {name: np.asarray(report.heatmaps[name]) for name in ("raw", "aligned")}
    lo = min(float(m.min()) for m in mats.values())
    hi = max(float(m.max()) for m in mats.values())
    hi = hi if hi > lo else lo + 1e-6
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 4.2), constrained_layout=True)
    for ax, (name, title) in zip(axes, (("raw", "stored order"), ("aligned", "MaxMatch-aligned"))):
        m = mats[name]
        im = ax.imshow(m, cmap="viridis", vmin=lo, vmax=hi)
        for (k, l), v in np.ndenumerate(m):
            ax.text(l, k, f"{v:.2f}", ha="center", va="center", fontsize=8,
                    color="w" if (v - lo) / (hi - lo) < 0.6 else "k")
        ax.set_xticks(range(m.shape[1]), [f"T{l + 1}" for l in range(m.shape[1])])
        ax.set_yticks(range(m.shape[0]), [f"V{k + 1}" for k in range(m.shape[0])])
        ax.set_xlabel("text element")
        ax.set_ylabel("image element")
        ax.set_title(title)
    fig.colorbar(im, ax=axes, shrink=0.8, label="mean cosine, image set vs its own captions")
    ckpt = Path(report.checkpoint)
    fig.suptitle(f"{ckpt.parent.name}/{ckpt.name} · split {report.split} · {report.similarity} "
                 f"({report.n_images:,} images)", fontsize=10)
    return save_figure(fig, stem)


def _tsne_figure(report: CollapseReport, points: TsnePoints, stem: Path) -> list[str]:
    """Figure 3 as ``stem``.png and .pdf (:func:`maxmatch_cli.reporting.plots.tsne_figure`); [] without matplotlib."""
    from maxmatch_cli.reporting.plots import pyplot, save_figure, tsne_figure

    if pyplot() is None:
        return []
    ckpt = Path(report.checkpoint)
    n_caps = points.n_images * points.captions_per_image
    title = (f"{ckpt.parent.name}/{ckpt.name} · split {report.split}\n"
             f"t-SNE of the set elements of {points.n_images:,} images and their {n_caps:,} captions (K={report.K})")
    return save_figure(tsne_figure(points, title), stem)


def write_collapse_report(report: CollapseReport, out_dir: Path, tsne: TsnePoints | None = None) -> None:
    """Write the CSV files, the PNGs (when matplotlib is importable) and ``collapse.json`` into ``out_dir``.

    ``tsne``: also ``tsne.csv`` (one row a point) and its figure ``tsne.png`` / ``tsne.pdf``.
    """
    out_dir = Path(out_dir)
    report.out_dir = str(out_dir)
    report.files = []
    for name, text in _collapse_csvs(report).items():
        write_text(out_dir / name, text)
        report.files.append(name)
    figures = _heatmap_figures(report, out_dir / "heatmaps")
    report.files += figures
    if tsne is not None:
        write_text(out_dir / "tsne.csv", tsne.to_csv())
        report.files.append("tsne.csv")
        tsne_files = _tsne_figure(report, tsne, out_dir / "tsne")
        report.files += tsne_files
        figures += tsne_files
    if not figures and not any("matplotlib" in note for note in report.notes):
        what = "heatmaps and t-SNE" if tsne is not None else "heatmaps"
        report.notes.append(f"matplotlib is not installed: {what} written as CSV only "
                            "(pip install 'maxmatch[viz]' for the PNG/PDF figures)")
    report.files.append("collapse.json")
    write_text(out_dir / "collapse.json", json.dumps(report.to_json(), indent=2))
