"""``maxmatch index`` (encode a gallery once) and ``maxmatch query`` (search it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from maxmatch_cli.cli.options import (CheckpointArgument, DataOption, DeviceOption, command_group, console, guarded,
                                      line, require_inputs, wrote)

PANEL = "Retrieval"

app = command_group()


@app.command("index", rich_help_panel=PANEL)
@guarded
def index_cmd(
    checkpoint: CheckpointArgument,
    out: Annotated[Path, typer.Option("--out", help="Index folder to create.")],
    data: DataOption = None,
    split: Annotated[Optional[str], typer.Option("--split", help="Split to index (default: eval.split).")] = None,
    kind: Annotated[str, typer.Option(
        "--kind", help="images (a gallery for `maxmatch query --text`) or captions.")] = "images",
    device: DeviceOption = "auto",
    batch_size: Annotated[Optional[int], typer.Option(
        "--batch-size", help="Items encoded and written at a time (default: eval.batch_size).")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace the index in OUT (kept until the new one is complete).")] = False,
    engine: Annotated[str, typer.Option(
        "--engine", help="exact (sets only: exhaustive exact search) or faiss (also a faiss IVF index over the set "
                         "elements for approximate candidates; needs faiss-cpu).")] = "exact",
    nlist: Annotated[Optional[int], typer.Option(
        "--nlist", help="faiss: inverted lists (default: about the square root of the element count).")] = None,
    shard: Annotated[Optional[str], typer.Option(
        "--shard", metavar="I/N", help="Build only shard I (from 0) of N, a contiguous slice of the gallery, into "
                                       "OUT/shard-I-of-N; `maxmatch query OUT` searches all N shards.")] = None,
) -> None:
    """Encode a gallery once into an index folder: float16 sets (memory-mapped when queried), ids, a manifest.

    The build streams in bounded memory and publishes the folder only when it is complete. A gallery too large
    for one machine is built in shards (one job per --shard I/N into a shared OUT) and queried as one index.

    Examples:
      [bold]maxmatch index demo/run --split test --out demo/index[/]
      [bold]maxmatch index demo/run --split test --engine faiss --out demo/index-faiss[/]
      [bold]maxmatch index demo/run --split test --kind captions --out demo/captions[/]
      [bold]maxmatch index demo/run --split test --shard 0/2 --out demo/sharded[/]
    """
    require_inputs(data=data)
    from maxmatch_cli.retrieval.index import build_index

    index = build_index(checkpoint, out, data=data, split=split, kind=kind, device=device, batch_size=batch_size,
                        overwrite=overwrite, engine=engine, nlist=nlist, shard=shard)
    m = index.manifest
    if "shard" in m:
        sh = m["shard"]
        line(f"shard {sh['index']}/{sh['count']}: rows {sh['rows'][0]:,}..{sh['rows'][1] - 1:,} of {sh['n_total']:,}")
    line(f"indexed {m['n_items']:,} {m['kind']} of split {m['split']} of {m['data']}")
    line(f"checkpoint {m['checkpoint']['path']} · K={m['K']}, D={m['D']} · similarity {m['similarity']} · "
          f"{(index.path / 'sets.npy').stat().st_size / 2**20:,.1f} MiB of sets")
    if index.has_element_index:
        info = m["element_index"]
        size = (index.path / info["file"]).stat().st_size
        line(f"faiss element index: {info['n_elements']:,} elements, nlist {info['nlist']}, {size / 2**20:,.1f} MiB")
    wrote(index.path)


@app.command("query", rich_help_panel=PANEL)
@guarded
def query_cmd(
    index: Annotated[Path, typer.Argument(help="An index folder written by `maxmatch index` (or a folder of "
                                                "its shards).")],
    text: Annotated[Optional[list[str]], typer.Option(
        "--text", help="A caption to search an image index for (repeatable).")] = None,
    image: Annotated[Optional[list[Path]], typer.Option(
        "--image", help="An image file to search a captions index for (repeatable); its features are extracted "
                        "as the index's feature file's were.")] = None,
    image_id: Annotated[Optional[list[str]], typer.Option(
        "--image-id", help="The id of an image of the index's feature file (or --data) to search a captions "
                           "index for (repeatable).")] = None,
    top_k: Annotated[int, typer.Option("-k", "--top-k", help="Results per query.")] = 10,
    checkpoint: Annotated[Optional[Path], typer.Option(
        "--checkpoint", help="The index's checkpoint, if it moved (it must be the same file).")] = None,
    data: Annotated[Optional[Path], typer.Option(
        "--data", help="Feature file of --image-id (default: the one the index was built from).")] = None,
    device: DeviceOption = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON on stdout.")] = False,
    engine: Annotated[str, typer.Option(
        "--engine", help="exact (exhaustive), faiss (approximate candidates, exact re-ranking; an index built with "
                         "--engine faiss) or auto (faiss when the index has it and faiss-cpu is installed).")] = "auto",
    candidates: Annotated[Optional[int], typer.Option(
        "--candidates", help="faiss: nearest gallery elements fetched per query element (default: grows with "
                              "the gallery, 128 up to 128K items, 1,024 at 1M; benchmarks/RESULTS.md).")] = None,
    nprobe: Annotated[Optional[int], typer.Option(
        "--nprobe", help="faiss: inverted lists searched per query element (default 32).")] = None,
) -> None:
    """Search an index: captions (--text) against images, or images (--image, --image-id) against captions.

    Each result shows rank, id, score and MaxMatch's one-to-one matching of query and result elements.
    Engines: exact scores every stored set (block by block over the memory-mapped index): the exact top-k under
    the checkpoint's similarity, in time linear in the gallery. faiss (an index built with --engine faiss) fetches
    candidates by approximate search over the set elements and re-ranks them exactly: exact scores, approximate
    recall (benchmarks/index.py measures it). A sharded index is searched shard by shard and the results merged.

    Examples:
      [bold]maxmatch query demo/index --text "a red bus next to a tree" -k 5[/]
      [bold]maxmatch query demo/index --text "dogs" --text "a cat" --json > hits.json[/]
      [bold]maxmatch query demo/captions --image-id 3517 -k 5[/]
      [bold]maxmatch query photos/captions --image photo.jpg[/]
    """
    require_inputs(image=image, checkpoint=checkpoint, data=data)
    from rich.table import Table

    from maxmatch_cli.retrieval.index import load_index, query_index

    idx = load_index(index)
    results, used = query_index(idx, text, k=top_k, checkpoint=checkpoint, device=device, engine=engine,
                                candidates=candidates, nprobe=nprobe, images=image, image_ids=image_id, data=data)
    side, queries = (("text", text) if text is not None else
                     ("image", [str(p) for p in image]) if image is not None else ("image_id", image_id))
    depth = {}
    if used == "faiss":  # what each shard's search applied (one value, or the distinct values of the shards)
        from maxmatch_cli.devices import resolve_device
        from maxmatch_cli.retrieval.index import search_depth

        dev = resolve_device(device)
        per_part = [search_depth(part.element_index(dev), part.manifest["K"], candidates, nprobe)
                    for part in getattr(idx, "shards", [idx])]
        depth = {name: values[0] if len(values) == 1 else values
                 for name, values in (("candidates", sorted({c for c, _ in per_part})),
                                      ("nprobe", sorted({p for _, p in per_part})))}
    if as_json:
        record = {"index": str(idx.path), "engine": used, **depth, "similarity": idx.similarity,
                  "checkpoint": str(checkpoint or idx.checkpoint),
                  "queries": [{side: q, "results": [h.to_json() for h in hits]} for q, hits in zip(queries, results)]}
        typer.echo(json.dumps(record, indent=2, ensure_ascii=False))
        return
    how = "exhaustive exact search"
    if used == "faiss":
        def shown(value) -> str:
            return "/".join(f"{v:,}" for v in value) if isinstance(value, list) else f"{value:,}"

        how = (f"faiss candidates ({shown(depth['candidates'])} per query element, nprobe "
               f"{shown(depth['nprobe'])}), exact re-ranking")
    shards = f" in {len(idx.shards)} shards" if hasattr(idx, "shards") else ""
    line(f"index {idx.path} · {len(idx):,} {idx.kind}{shards} · similarity {idx.similarity} · {how}")
    q_name, g_name = ("T", "V") if side == "text" else ("V", "T")
    for query, hits in zip(queries, results):
        label = {"text": "query", "image": "image", "image_id": "image id"}[side]
        table = Table(title=f"{label}: {escape(str(query))}", title_justify="left", caption_justify="left",
                      caption=f"matching: MaxMatch's one-to-one pairs, query element {q_name} ↔ result element "
                              f"{g_name} (cosine)")
        table.add_column("rank", justify="right")
        table.add_column("id", style="bold cyan")
        if idx.kind == "captions":
            table.add_column("caption", overflow="fold")
        table.add_column("score", justify="right")
        table.add_column("matching", overflow="fold")
        for h in hits:
            pairs = "  ".join(f"{q_name}{q + 1}↔{g_name}{g + 1} ({c:.2f})" for q, g, c in h.matching)
            cells = [str(h.rank), escape(str(h.id))] + ([escape(h.text or "")] if idx.kind == "captions" else [])
            table.add_row(*cells, f"{h.score:.4f}", pairs)
        console.print(table)
        if len(hits) < min(top_k, len(idx)):
            line(f"note: {len(hits)} of {min(top_k, len(idx)):,} results: the faiss candidates ran out; raise "
                  f"--candidates or --nprobe, or use --engine exact")
