"""``maxmatch index`` (encode a gallery once) and ``maxmatch query`` (search it)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.markup import escape

from maxmatch_cli.cli.options import (CheckpointArgument, DataOption, DeviceOption, command_group, console, guarded,
                                      line, note, require_inputs, wrote)

if TYPE_CHECKING:
    from rich.table import Table

    from maxmatch_cli.retrieval.index import QueryAnswer

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
        "--engine", help="exact (sets only: exhaustive exact search), faiss (also a faiss IVF index over the set "
                         "elements for approximate candidates; needs faiss-cpu) or milvus (the set elements in a "
                         "Milvus collection, --uri; needs the milvus extra).")] = "exact",
    nlist: Annotated[Optional[int], typer.Option(
        "--nlist", help="faiss, milvus IVF: inverted lists (default: about the square root of the element "
                        "count).")] = None,
    shard: Annotated[Optional[str], typer.Option(
        "--shard", metavar="I/N", help="Build only shard I (from 0) of N, a contiguous slice of the gallery, into "
                                       "OUT/shard-I-of-N; `maxmatch query OUT` searches all N shards.")] = None,
    uri: Annotated[Optional[str], typer.Option(
        "--uri", help="milvus: FILE.db (milvus-lite, embedded, no server) or http://HOST:19530 (a Milvus server "
                      "or cluster).")] = None,
    token: Annotated[Optional[str], typer.Option(
        "--token", help="milvus: the server's token, USER:PASSWORD or an API key (default: "
                        "$MAXMATCH_MILVUS_TOKEN; not written into the index).")] = None,
    db: Annotated[Optional[str], typer.Option("--db", help="milvus: the server's database (default: default).")] = None,
    collection: Annotated[Optional[str], typer.Option(
        "--collection", help="milvus: the collection (default: maxmatch_, OUT's folder name and a hash of its "
                             "path).")] = None,
    index_type: Annotated[Optional[str], typer.Option(
        "--index-type", help="milvus: vector index type (default FLAT up to 100,000 elements, else IVF_FLAT; "
                             "milvus-lite builds FLAT, IVF_FLAT, IVF_SQ8, HNSW, HNSW_SQ, AUTOINDEX).")] = None,
) -> None:
    """Encode a gallery once into an index folder: float16 sets (memory-mapped when queried), ids, a manifest.

    The build streams in bounded memory and publishes the folder only when it is complete. A gallery too large
    for one machine is built in shards (one job per --shard I/N into a shared OUT) and queried as one index.

    Examples:
      [bold]maxmatch index demo/run --split test --out demo/index[/]
      [bold]maxmatch index demo/run --split test --engine faiss --out demo/index-faiss[/]
      [bold]maxmatch index demo/run --split test --kind captions --out demo/captions[/]
      [bold]maxmatch index demo/run --split test --shard 0/2 --out demo/sharded[/]
      [bold]maxmatch index demo/run --engine milvus --uri demo/g.db --out demo/im[/]
    """
    require_inputs(data=data)
    from maxmatch_cli.retrieval.index import build_index

    index = build_index(checkpoint, out, data=data, split=split, kind=kind, device=device, batch_size=batch_size,
                        overwrite=overwrite, engine=engine, nlist=nlist, shard=shard, uri=uri, token=token, db=db,
                        collection=collection, index_type=index_type)
    m = index.manifest
    if "shard" in m:
        sh = m["shard"]
        line(f"shard {sh['index']}/{sh['count']}: rows {sh['rows'][0]:,}..{sh['rows'][1] - 1:,} of {sh['n_total']:,}")
    line(f"indexed {m['n_items']:,} {m['kind']} of split {m['split']} of {m['data']}")
    if index.milvus is not None:
        info = m["element_index"]
        line(f"checkpoint {m['checkpoint']['path']} · K={m['K']}, D={m['D']} · similarity {m['similarity']}")
        line(f"Milvus collection '{info['collection']}' at {info['uri']}: {info['n_elements']:,} element rows, "
             f"index {info['index_type']}, metric {info['metric']}")
    else:
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
                         "--engine faiss), milvus (candidates from Milvus, exact re-ranking; an index built with "
                         "--engine milvus) or auto (milvus for a Milvus index; faiss when the index has it and "
                         "faiss-cpu is installed; else exact).")] = "auto",
    candidates: Annotated[Optional[int], typer.Option(
        "--candidates", help="faiss, milvus: nearest gallery elements fetched per query element (default: grows with "
                              "the gallery, 128 up to 128K items, 1,024 at 1M; benchmarks/RESULTS.md).")] = None,
    nprobe: Annotated[Optional[int], typer.Option(
        "--nprobe", help="faiss, milvus IVF: inverted lists searched per query element (default 32).")] = None,
    token: Annotated[Optional[str], typer.Option(
        "--token", help="milvus: the server's token (default: $MAXMATCH_MILVUS_TOKEN).")] = None,
) -> None:
    """Search an index: captions (--text) against images, or images (--image, --image-id) against captions.

    Each result shows rank, id, its caption or image file (where the feature file lists image files), score and
    MaxMatch's one-to-one matching of query and result elements; a query by --image-id marks the image's own
    captions (✓) and counts those in the top k.
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
    from maxmatch_cli.retrieval.index import answer_queries

    answer = answer_queries(index, text, image, image_id, k=top_k, checkpoint=checkpoint, data=data, device=device,
                            engine=engine, candidates=candidates, nprobe=nprobe, milvus_token=token)
    if as_json:
        typer.echo(json.dumps(_answer_record(answer), indent=2, ensure_ascii=False))
    else:
        _print_answer(answer)


def _print_answer(answer: QueryAnswer) -> None:
    """The index line, then per query its result table, its own-captions line (a query by image id) and a note
    where the candidates ran out before k results."""
    idx, used = answer.index, answer.engine
    shards = f" in {len(idx.shards)} shards" if hasattr(idx, "shards") else ""
    line(f"index {idx.path} · {len(idx):,} {idx.kind}{shards} · similarity {idx.similarity} · "
         f"{_search_how(used, answer.depth)}")
    wanted = min(answer.k, len(idx))
    for query, hits in zip(answer.queries, answer.hits):
        console.print(_result_table(idx, answer.side, query, hits))
        if answer.side == "image_id":
            _own_captions_line(idx, query, hits)
        if len(hits) < wanted:
            line(f"note: {len(hits)} of {wanted:,} results: the {used} candidates ran out; raise "
                 f"--candidates or --nprobe" + (", or use --engine exact" if used == "faiss" else ""))


def _search_how(engine: str, depth: dict) -> str:
    """How the engine searched, in words, with the candidate depth it applied."""
    if engine == "faiss":
        def shown(value) -> str:
            return "/".join(f"{v:,}" for v in value) if isinstance(value, list) else f"{value:,}"

        return (f"faiss candidates ({shown(depth['candidates'])} per query element, nprobe "
                f"{shown(depth['nprobe'])}), exact re-ranking")
    if engine == "milvus":
        return (f"Milvus candidates ({depth['candidates']:,} per query element, {depth['milvus_index']}"
                + "".join(f", {name} {depth[name]}" for name in ("nprobe", "ef") if name in depth)
                + "), exact re-ranking")
    return "exhaustive exact search"


def _answer_record(answer: QueryAnswer) -> dict:
    """``--json``: the index, how it was searched, and each query with its hits."""
    idx = answer.index
    return {"index": str(idx.path), "engine": answer.engine, **answer.depth, "similarity": idx.similarity,
            "checkpoint": str(answer.checkpoint),
            "queries": [_query_record(idx, answer.side, q, hits) for q, hits in zip(answer.queries, answer.hits)]}


CELL_WIDTH = 48
"""Characters per line of a result's caption or image file in the table (at most three lines of a caption, the
end of a long path), whatever the terminal's width; ``--json`` has them whole."""


def _cell_lines(value: str, kind: str) -> list[str]:
    """A caption wrapped (and cut after three lines), or an image file's path cut from the left, to CELL_WIDTH."""
    if kind == "path":
        return [value if len(value) <= CELL_WIDTH else "…" + value[-(CELL_WIDTH - 1):]]
    lines = textwrap.wrap(value, CELL_WIDTH) or [""]
    if len(lines) > 3:
        lines = lines[:2] + [lines[2][:CELL_WIDTH - 1].rstrip() + "…"]
    return lines


def _result_table(idx, side: str, query, hits) -> Table:
    """One query's results: rank, id, the caption or image file (where the index knows it), a ✓ on the queried
    image's own captions (a query by image id), score, and MaxMatch's element pairs."""
    from rich.table import Table

    q_name, g_name = ("T", "V") if side == "text" else ("V", "T")
    label = {"text": "query", "image": "image", "image_id": "image id"}[side]
    own = side == "image_id" and any(h.own is not None for h in hits)
    table = Table(title=f"{label}: {escape(str(query))}", title_justify="left", caption_justify="left",
                  caption=("own ✓: a caption of this image (its ground truth); " if own else "")
                  + f"matching: MaxMatch's one-to-one pairs, query element {q_name} ↔ result element {g_name} "
                    "(cosine)")
    table.add_column("rank", justify="right")
    table.add_column("id", style="bold cyan")
    if own:
        table.add_column("own", justify="center")
    detail, kind = (("caption", "text") if idx.kind == "captions" else
                    ("image file", "path") if any(h.path is not None for h in hits) else (None, None))
    cells = [_cell_lines(getattr(h, kind) or "", kind) for h in hits] if detail else []
    if detail:  # wrapped here, at CELL_WIDTH: the terminal's width does not re-wrap it (the matching column gives)
        table.add_column(detail, no_wrap=True)
    table.add_column("score", justify="right")
    table.add_column("matching", overflow="fold")
    for j, h in enumerate(hits):
        pairs = "  ".join(f"{q_name}{q + 1}↔{g_name}{g + 1} ({c:.2f})" for q, g, c in h.matching)
        row = [str(h.rank), escape(str(h.id))] + (["✓" if h.own else ""] if own else [])
        row += [escape("\n".join(cells[j]))] if detail else []
        table.add_row(*row, f"{h.score:.4f}", pairs)
    return table


def _own_captions_line(idx, image_id, hits) -> None:
    """How many of the queried image's captions (its ground truth) the results hold, or why that is unknown."""
    from maxmatch_cli.retrieval.index.metadata import own_captions

    total = own_captions(idx, image_id)
    if total is None:
        note(f"index {idx.path} does not record which image each caption describes (built by an older maxmatch, "
             f"and its feature file has moved or changed), so image {image_id}'s own captions are not marked; "
             "rebuild the index to mark them")
    elif total == 0:
        line(f"image {image_id} has none of its captions in this index (split {idx.manifest.get('split')})")
    else:
        found = sum(1 for h in hits if h.own)
        line(f"image {image_id}: {found} of its {total} captions in the index are in these {len(hits)} results "
             "(marked ✓)")


def _query_record(idx, side: str, query, hits) -> dict:
    """One query of ``--json``: the query, its hits and, for a query by image id, its own captions found."""
    record = {side: query, "results": [h.to_json() for h in hits]}
    if side == "image_id":
        from maxmatch_cli.retrieval.index.metadata import own_captions

        total = own_captions(idx, query)
        if total is not None:
            record["own_captions"] = {"in_results": sum(1 for h in hits if h.own), "in_index": total}
    return record
