"""Figures and their shared plumbing (headless matplotlib, PNG + PDF, atomic writes).

Training curves of a run (``maxmatch plot``), Recall@K bars across compared runs (``maxmatch compare --figure``),
and the pair heatmaps (paper Figure 4) and t-SNE of set elements (Figure 3) of ``maxmatch analyze-collapse``.
Every figure is drawn from plain arrays and records (numbers, strings, columns of a table), never from another
stage's classes: :mod:`maxmatch_cli.reporting.compare` and :mod:`maxmatch_cli.reporting.collapse` pass them in.
matplotlib is the optional ``viz`` extra (installed by ``make``). Figures are written as ``<stem>.png`` (for a
look) and ``<stem>.pdf`` (for a paper).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.fileio import atomic_write

__all__ = ["figure_stem", "heatmaps_figure", "plot_recall_bars", "plot_training_curves", "pyplot",
           "recall_bars_figure", "require_pyplot", "save_figure", "tsne_figure"]

_NO_MATPLOTLIB = "pip install 'maxmatch[viz]' (or `make install`)"


def pyplot():
    """matplotlib.pyplot on the headless Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def require_pyplot():
    """matplotlib.pyplot (Agg), or a :class:`MaxMatchError` saying how to install it."""
    plt = pyplot()
    if plt is None:
        raise MaxMatchError("plots need matplotlib, which is not installed", hint=_NO_MATPLOTLIB)
    return plt


def figure_stem(path: str | Path) -> Path:
    """The stem a figure path names: ``bars``, ``bars.png`` and ``bars.pdf`` all give ``bars`` (and ``r.v2`` stays
    ``r.v2``: only a .png or .pdf suffix is taken off)."""
    path = Path(path)
    return path.with_suffix("") if path.suffix.lower() in (".png", ".pdf") else path


def save_figure(fig, stem: Path) -> list[str]:
    """Write ``fig`` as ``stem``.png (120 dpi) and ``stem``.pdf, each atomically; close it; return the file names.

    A .png or .pdf suffix on ``stem`` is taken off first (:func:`figure_stem`)."""
    plt = pyplot()
    stem = figure_stem(stem)
    names = []
    try:
        for fmt, kwargs in (("png", {"dpi": 120}), ("pdf", {})):
            path = stem.with_name(f"{stem.name}.{fmt}")
            atomic_write(path, lambda tmp, fmt=fmt, kwargs=kwargs: fig.savefig(tmp, format=fmt, **kwargs))
            names.append(path.name)
    finally:
        plt.close(fig)
    return names


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    from maxmatch_cli.fileio import read_history
    from maxmatch_cli.progress import console

    # Torn lines skipped with a warning, one record per step.
    return read_history(path, lambda m: console.print(f"[yellow]warning:[/] {m}", soft_wrap=True))


def plot_training_curves(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """Loss terms per step (raw and smoothed, from ``steps.jsonl``), learning rate, and validation RSUM and R@1
    per epoch (``metrics.jsonl``) of one run, as ``curves.png`` / ``curves.pdf``.

    Args:
        run_dir: a training run folder.
        out: file stem to write (default ``RUN/curves``).

    Returns:
        The files written.

    Raises:
        MaxMatchError: the folder holds no training records, or matplotlib is not installed.
    """
    run_dir = Path(run_dir)
    steps, epochs = _read_jsonl(run_dir / "steps.jsonl"), _read_jsonl(run_dir / "metrics.jsonl")
    if not steps and not epochs:
        raise MaxMatchError(f"{run_dir} holds no steps.jsonl or metrics.jsonl",
                            hint="point at a folder written by `maxmatch train --out`")
    plt = require_pyplot()
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    if steps:
        x = [r["step"] for r in steps]
        parts = [k for k in steps[0] if k.startswith("loss/")]
        for key in parts:
            y = [r.get(key, float("nan")) for r in steps]
            line, = ax_loss.plot(x, y, alpha=0.25, linewidth=0.8)
            smooth, acc = [], None
            for v in y:
                acc = v if acc is None else 0.9 * acc + 0.1 * v
                smooth.append(acc)
            ax_loss.plot(x, smooth, color=line.get_color(), label=key.removeprefix("loss/"))
        ax_loss.set_yscale("log")
        ax_loss.set_xlabel("step")
        ax_loss.set_ylabel("loss term (unweighted; faint: raw, solid: smoothed)")
        ax_loss.legend(fontsize=8)
        lr = ax_loss.twinx()
        lr.plot(x, [r["lr"] for r in steps], color="0.5", linestyle=":", label="lr")
        lr.set_ylabel("learning rate (dotted)")
    val = [r for r in epochs if "val/rsum" in r]
    if val:
        ep = [r["epoch"] for r in val]
        ax_val.plot(ep, [r["val/rsum"] for r in val], marker="o", color="k", label="RSUM")
        ax_val.set_xlabel("epoch")
        ax_val.set_ylabel("validation RSUM")
        r1 = ax_val.twinx()
        for key, style in (("val/i2t_r1", "-"), ("val/t2i_r1", "--")):
            r1.plot(ep, [r[key] for r in val], linestyle=style, marker=".", label=key.removeprefix("val/"))
        r1.set_ylabel("R@1 (%)")
        r1.legend(fontsize=8, loc="lower right")
    else:
        ax_val.text(0.5, 0.5, "no validation records", ha="center", va="center", transform=ax_val.transAxes)
    # The folder with its parent: a run folder is often just "run" (demo/run), "training run run" says nothing.
    fig.suptitle(f"training run {Path(run_dir.resolve().parent.name) / run_dir.resolve().name}", fontsize=10)
    stem = figure_stem(out) if out else run_dir / "curves"
    return [stem.with_name(n) for n in save_figure(fig, stem)]


# ------------------------------------------------------------------------------------------ Recall@K bars


RECALL_GROUPS = (("i2t_r1", "R@1"), ("i2t_r5", "R@5"), ("i2t_r10", "R@10"),
                 ("t2i_r1", "R@1"), ("t2i_r5", "R@5"), ("t2i_r10", "R@10"))
"""The bar groups of :func:`recall_bars_figure`: image-to-text, then text-to-image recalls."""


def recall_bars_figure(frame: Mapping[str, Sequence], title: str | None = None):
    """Grouped bars of a comparison: one group per recall (i2t and t2i R@1/5/10), one bar per row (its mean), with
    the sample standard deviation over the row's runs as an error bar where a row has two or more.

    Args:
        frame: the comparison table as columns indexed by row number 0..n-1 (a pandas DataFrame such as
            ``Comparison.frame``, or a dict of lists): ``label``, ``source``, ``n`` (runs in the row) and
            ``{metric}_mean`` / ``{metric}_std`` for each metric of :data:`RECALL_GROUPS`.
        title: the axes title (default: the sources and what the error bars show).

    Returns:
        The matplotlib figure (axes 0 holds one ``BarContainer`` per row, in row order, labelled as the row).
    """
    plt = require_pyplot()
    rows, groups = len(frame["label"]), len(RECALL_GROUPS)
    means = np.array([[frame[f"{m}_mean"][r] for m, _ in RECALL_GROUPS] for r in range(rows)], dtype=float)
    stds = np.array([[frame[f"{m}_std"][r] if frame["n"][r] > 1 else math.nan for m, _ in RECALL_GROUPS]
                     for r in range(rows)], dtype=float)
    width = 0.8 / rows
    x = np.arange(groups) + np.where(np.arange(groups) >= 3, 0.4, 0.0)  # a gap between the two directions
    fig, ax = plt.subplots(figsize=(min(12.0, 6.0 + 0.45 * rows), 4.4),
                           constrained_layout=True)
    colours = plt.get_cmap("tab10").colors
    for r in range(rows):
        n = int(frame["n"][r])
        label = f"{frame['label'][r]} (n={n})"
        err = None if np.isnan(stds[r]).all() else np.nan_to_num(stds[r])
        ax.bar(x - 0.4 + width * (r + 0.5), means[r], width * 0.92, yerr=err, capsize=2.5, label=label,
               color=colours[r % len(colours)], error_kw={"elinewidth": 0.9, "ecolor": "0.25"})
    ax.set_xticks(x, [name for _, name in RECALL_GROUPS])
    for centre, text in ((x[1], "image → text"), (x[4], "text → image")):
        ax.annotate(text, (centre, 0), xycoords=("data", "axes fraction"), xytext=(0, -30),
                    textcoords="offset points", ha="center", va="top", fontsize=10)
    top = float(np.nanmax(means + np.nan_to_num(stds))) if rows else 100.0
    ax.set_ylim(0, min(100.0, top * 1.08) if top > 0 else 1.0)
    ax.set_ylabel("recall (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    spread = "error bars: sample std over the runs of a row" if np.isfinite(stds).any() else "one run per row"
    ax.set_title(title or f"Recall@K · {' / '.join(dict.fromkeys(frame['source']))} · {spread}", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", frameon=False, ncol=1 if rows <= 4 else 2)
    return fig


def plot_recall_bars(frame: Mapping[str, Sequence], out: str | Path, title: str | None = None) -> list[Path]:
    """:func:`recall_bars_figure` written as ``out``.png and ``out``.pdf; returns the files written."""
    stem = figure_stem(out)
    return [stem.with_name(n) for n in save_figure(recall_bars_figure(frame, title), stem)]


# ------------------------------------------------------------------------------------------ heatmaps (Figure 4)


def heatmaps_figure(raw: np.ndarray, aligned: np.ndarray, title: str):
    """Figure 4: two K x K heatmaps side by side, the elements in stored order and MaxMatch-aligned, each cell
    labelled with its value.

    One colour scale for both panels, fitted to their values (the cosines of a trained model sit in a narrow band
    that a fixed [0, 1] scale would flatten).

    Args:
        raw: (K, K') mean cosine of image element k and text element l.
        aligned: (K, K') the same with each caption's elements in MaxMatch order.
        title: the figure's title.
    """
    plt = require_pyplot()
    mats = {"raw": np.asarray(raw), "aligned": np.asarray(aligned)}
    lo = min(float(m.min()) for m in mats.values())
    hi = max(float(m.max()) for m in mats.values())
    hi = hi if hi > lo else lo + 1e-6
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 4.2), constrained_layout=True)
    for ax, (name, panel) in zip(axes, (("raw", "stored order"), ("aligned", "MaxMatch-aligned"))):
        m = mats[name]
        im = ax.imshow(m, cmap="viridis", vmin=lo, vmax=hi)
        for (k, l), v in np.ndenumerate(m):
            ax.text(l, k, f"{v:.2f}", ha="center", va="center", fontsize=8,
                    color="w" if (v - lo) / (hi - lo) < 0.6 else "k")
        if name == "raw":
            ax.set_xticks(range(m.shape[1]), [f"T{l + 1}" for l in range(m.shape[1])])
            ax.set_xlabel("text element")
        else:  # column l holds, per caption, the text element MaxMatch matched to image element l
            ax.set_xticks(range(m.shape[1]), [f"↔V{l + 1}" for l in range(m.shape[1])])
            ax.set_xlabel("text element matched to image element")
        ax.set_yticks(range(m.shape[0]), [f"V{k + 1}" for k in range(m.shape[0])])
        ax.set_ylabel("image element")
        ax.set_title(panel)
    fig.colorbar(im, ax=axes, shrink=0.8, label="mean cosine, image set vs its own captions")
    fig.suptitle(title, fontsize=10)
    return fig


# ------------------------------------------------------------------------------------------ t-SNE (Figure 3)


def tsne_figure(coords: np.ndarray, modality: np.ndarray, slot: np.ndarray, title: str):
    """Figure 3: the t-SNE of set elements; colour = element index k, dots = image elements, crosses = text
    elements. Axes carry no scale (t-SNE distances have no units).

    Args:
        coords: (M, 2) point coordinates.
        modality: (M,) 'image' or 'text' for each point.
        slot: (M,) element index k (0-based) of each point within its set.
        title: the axes title.
    """
    plt = require_pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 5.6), constrained_layout=True)
    colours = plt.get_cmap("tab10").colors
    k_max = int(slot.max()) + 1 if len(slot) else 0
    # text first, so the fewer image dots stay visible on top
    for kind, marker, size, alpha in (("text", "x", 14, 0.55), ("image", "o", 16, 0.9)):
        for k in range(k_max):
            sel = (modality == kind) & (slot == k)
            ax.scatter(coords[sel, 0], coords[sel, 1], s=size, marker=marker, linewidths=0.9,
                       color=colours[k % len(colours)], alpha=alpha, edgecolors="none" if marker == "o" else None)
    handles = [plt.Line2D([], [], linestyle="", marker="s", markersize=7, color=colours[k % len(colours)],
                          label=f"element {k + 1}") for k in range(k_max)]
    handles += [plt.Line2D([], [], linestyle="", marker="o", color="0.3", label="image"),
                plt.Line2D([], [], linestyle="", marker="x", color="0.3", label="text")]
    ax.legend(handles=handles, fontsize=8, loc="best", framealpha=0.85)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("t-SNE 1")
    ax.set_ylabel("t-SNE 2")
    ax.set_title(title, fontsize=9)
    return fig
