"""Figures: training curves of a run, and the shared plumbing (headless matplotlib, PNG + PDF, atomic writes).

matplotlib is the optional ``viz`` extra (installed by ``make``); without it every function here returns no
files and the callers say so. Figures are written as ``<stem>.png`` (for a look) and ``<stem>.pdf`` (for a paper).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.fileio import atomic_write

__all__ = ["plot_training_curves", "pyplot", "save_figure"]


def pyplot():
    """matplotlib.pyplot on the headless Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig, stem: Path) -> list[str]:
    """Write ``fig`` as ``stem``.png (120 dpi) and ``stem``.pdf, each atomically; close it; return the file names."""
    plt = pyplot()
    names = []
    try:
        for fmt, kwargs in (("png", {"dpi": 120}), ("pdf", {})):
            path = stem.with_suffix(f".{fmt}")
            atomic_write(path, lambda tmp, fmt=fmt, kwargs=kwargs: fig.savefig(tmp, format=fmt, **kwargs))
            names.append(path.name)
    finally:
        plt.close(fig)
    return names


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by an interrupted run
    return records


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
    plt = pyplot()
    if plt is None:
        raise MaxMatchError("plots need matplotlib, which is not installed", hint="pip install 'maxmatch[viz]'")
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
    fig.suptitle(f"training run {run_dir.resolve().name}", fontsize=10)
    stem = Path(out) if out else run_dir / "curves"
    return [stem.with_name(n) for n in save_figure(fig, stem)]
