"""Writing a set-collapse report (``maxmatch analyze-collapse``): CSV files, figures and ``collapse.json``.

:func:`maxmatch_cli.evaluation.collapse.analyze_collapse` computes the numbers; :func:`write_collapse_report` puts
them on disk, drawing the heatmaps (paper Figure 4) and the t-SNE (Figure 3) with
:mod:`maxmatch_cli.reporting.plots` from the report's plain arrays.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from maxmatch_cli.evaluation.collapse import CollapseReport, TsnePoints
from maxmatch_cli.evaluation.metrics import METRIC_KEYS
from maxmatch_cli.fileio import write_text
from maxmatch_cli.reporting import plots

__all__ = ["default_out_dir", "element_csv", "tsne_csv", "write_collapse_report"]


def default_out_dir(report: CollapseReport) -> Path:
    """``collapse-<checkpoint stem>-<split>`` next to the report's checkpoint."""
    ckpt = Path(report.checkpoint)
    return ckpt.parent / f"collapse-{ckpt.stem}-{report.split}"


def write_collapse_report(report: CollapseReport, out_dir: str | Path | None = None) -> CollapseReport:
    """Write the CSV files, the figures (when matplotlib is importable) and ``collapse.json`` into ``out_dir``.

    Files: ``circular_variance.csv``, ``slot_ablation.csv``, ``heatmap_raw.csv``, ``heatmap_aligned.csv``,
    ``slot_retrieval.csv``, ``heatmaps.png`` / ``.pdf``; with the report's t-SNE points also ``tsne.csv`` (one row
    a point) and ``tsne.png`` / ``.pdf``; with per-element retrieval records (Figures 5–7) ``element_retrieval.csv``,
    ``elements_i2t.png`` / ``.pdf``, ``elements_t2i.png`` / ``.pdf`` and ``elements.html``; last ``collapse.json``
    (everything). Without matplotlib the figures are
    left out and a note says so.

    Args:
        report: what :func:`~maxmatch_cli.evaluation.collapse.analyze_collapse` computed.
        out_dir: output folder (default: :func:`default_out_dir`).

    Returns:
        ``report``, its ``out_dir``, ``files`` (names written, in order) and ``notes`` updated.
    """
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(report)
    report.out_dir = str(out_dir)
    report.files = []
    for name, text in _collapse_csvs(report).items():
        write_text(out_dir / name, text)
        report.files.append(name)
    figures = _heatmap_figures(report, out_dir / "heatmaps")
    report.files += figures
    points = report.points
    if points is not None:
        write_text(out_dir / "tsne.csv", tsne_csv(points))
        report.files.append("tsne.csv")
        tsne_files = _tsne_figure(report, points, out_dir / "tsne")
        report.files += tsne_files
        figures += tsne_files
    if report.elements:
        element_files = _element_files(report, out_dir)
        report.files += element_files
        figures += [name for name in element_files if name.endswith(".png")]
    if not figures and not any("matplotlib" in note for note in report.notes):
        what = "heatmaps and t-SNE" if points is not None else "heatmaps"
        report.notes.append(f"matplotlib is not installed: {what} written as CSV only "
                            "(pip install 'maxmatch[viz]' for the PNG/PDF figures)")
    report.files.append("collapse.json")
    write_text(out_dir / "collapse.json", json.dumps(report.to_json(), indent=2))
    return report


def tsne_csv(points: TsnePoints) -> str:
    """The t-SNE points as CSV: ``modality,item,element,x,y`` (element 1-based), one row a point."""
    lines = ["modality,item,element,x,y"]
    lines += [f"{m},{i},{k + 1},{x:.6f},{y:.6f}"
              for m, i, k, (x, y) in zip(points.modality, points.item, points.slot, points.coords)]
    return "\n".join(lines) + "\n"


def _matrix_csv(m: list[list[float]]) -> str:
    head = "," + ",".join(f"text{l + 1}" for l in range(len(m[0])))
    return "\n".join([head, *(f"image{k + 1}," + ",".join(f"{v:.6f}" for v in row) for k, row in enumerate(m))]) + "\n"


def _collapse_csvs(report: CollapseReport) -> dict[str, str]:
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
    """Both heatmaps side by side as ``stem``.png and .pdf (:func:`~maxmatch_cli.reporting.plots.heatmaps_figure`),
    titled with the checkpoint, split and similarity; [] when matplotlib is not installed."""
    if plots.pyplot() is None:
        return []
    ckpt = Path(report.checkpoint)
    title = (f"{ckpt.parent.name}/{ckpt.name} · split {report.split} · {report.similarity} "
             f"({report.n_images:,} images)")
    fig = plots.heatmaps_figure(np.asarray(report.heatmaps["raw"]), np.asarray(report.heatmaps["aligned"]), title)
    return plots.save_figure(fig, stem)


def _tsne_figure(report: CollapseReport, points: TsnePoints, stem: Path) -> list[str]:
    """Figure 3 as ``stem``.png and .pdf (:func:`~maxmatch_cli.reporting.plots.tsne_figure`); [] without
    matplotlib."""
    if plots.pyplot() is None:
        return []
    ckpt = Path(report.checkpoint)
    n_caps = points.n_images * points.captions_per_image
    title = (f"{ckpt.parent.name}/{ckpt.name} · split {report.split}\n"
             f"t-SNE of the set elements of {points.n_images:,} images and their {n_caps:,} captions (K={report.K})")
    return plots.save_figure(plots.tsne_figure(points.coords, points.modality, points.slot, title), stem)


def element_csv(records: list[dict]) -> str:
    """Per-element retrieval as CSV, one row per (model, query, element): ``model,direction,query_image_id,
    query_caption,k,item,item_image_id,score,correct,same_as,model_K``; item is a caption position (i2t) or an
    image position (t2i) in the split, query_caption the caption position of a t2i query, model_K the model's set
    size (k runs 1..model_K; compared models may differ)."""
    lines = ["model,direction,query_image_id,query_caption,k,item,item_image_id,score,correct,same_as,model_K"]
    for r in records:
        model = _csv_field(r["checkpoint"])
        for ex in r["examples"]:
            q = ex["query"]
            for e in ex["elements"]:
                item_image = e["image"] if ex["direction"] == "i2t" else e["image_id"]
                lines.append(",".join([model, ex["direction"], _csv_field(str(q["image_id"])),
                                       str(q.get("caption", "")), str(e["k"]), str(e["item"]),
                                       _csv_field(str(item_image)), f"{e['score']:.6f}", str(e["correct"]).lower(),
                                       str(e["same_as"] or ""), str(r["K"])]))
    return "\n".join(lines) + "\n"


def _csv_field(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text


def _element_files(report: CollapseReport, out_dir: Path) -> list[str]:
    """Figures 5–7 for each direction (without matplotlib: left out, the note says so), the HTML page and the
    CSV of the per-element retrieval."""
    from maxmatch_cli.reporting.element_figure import element_figure
    from maxmatch_cli.reporting.element_page import element_page

    names = [write_text(out_dir / "element_retrieval.csv", element_csv(report.elements)).name]
    ckpt = Path(report.checkpoint)
    where = f"split {report.split} of {Path(report.data).name} ({report.n_images:,} images)"
    if report.elements[0]["examples"] and plots.pyplot() is not None:
        for direction, what in (("i2t", "each image element's top caption"),
                                ("t2i", "each caption element's top image")):
            title = f"{ckpt.parent.name}/{ckpt.name} · {where}: {what}"
            names += plots.save_figure(element_figure(report.elements, direction, title),
                                       out_dir / f"elements_{direction}")
    page = element_page(report.elements, "What each set element retrieves",
                        f"{where} · " + " vs ".join(f"{r['checkpoint']} (K = {r['K']})" for r in report.elements))
    names.append(write_text(out_dir / "elements.html", page).name)
    return names
