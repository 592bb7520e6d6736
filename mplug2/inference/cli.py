"""``mplug2-model caption | qa | embed | retrieve | classify | classify-text | ground``: a model folder applied
to one's own media and texts.

    mplug2-model caption clip.mp4 photo.jpg https://host/v.mp4 --model m
    mplug2-model qa clip.mp4 --question "what is the man doing?" --model m
    mplug2-model embed clips/*.mp4 --texts queries.txt --out emb.parquet --model m
    mplug2-model retrieve --index emb.parquet --query "a dog on a beach" -k 10 --model m [--rerank]
    mplug2-model classify clip.mp4 --model runs/classify/best            (a `classify` run's export)
    mplug2-model classify-text "a fine film" --model runs/sst2/best      (a `text_classify` run's export)
    mplug2-model ground photo.jpg --expression "the man on the left" --model runs/refcoco/best

Output: a table (``--json``: one JSON object per line). An item that cannot be read gets its own error row with the
reason (``not_found``, ``decode_error``, ``timeout``, ...); the others still run; the exit code is 1 when any item
failed, 2 for a usage error (bad model folder, bad index).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

import torch

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- output
class Output:
    """Rows as an aligned table (after the last row) or as JSON lines (as they come)."""

    def __init__(self, columns: Sequence[str], as_json: bool) -> None:
        self.columns, self.as_json = list(columns), as_json
        self.rows: list[dict] = []
        self.failed = 0

    def row(self, **fields) -> None:
        if "error" in fields:
            self.failed += 1
        if self.as_json:
            print(json.dumps(fields, ensure_ascii=False), flush=True)
        else:
            self.rows.append(fields)

    def error(self, position: int, exc) -> None:
        self.row(input=exc.source, position=position, error={"reason": exc.reason, "message": exc.message})

    def close(self) -> None:
        if self.as_json:
            return
        self.rows.sort(key=lambda r: r.get("position", 0))
        last = len(self.columns) - 1
        cells = [[_cell(r, c, i == last) for i, c in enumerate(self.columns)] for r in self.rows]
        widths = [min(60, max([len(c)] + [len(row[i]) for row in cells])) for i, c in enumerate(self.columns)]
        line = lambda vals: "  ".join(v.ljust(w) if i < len(vals) - 1 else v  # noqa: E731
                                      for i, (v, w) in enumerate(zip(vals, widths)))
        print(line(self.columns))
        print(line(["-" * w for w in widths]))
        for row in cells:
            print(line([_fit(v, w, tail=c in ("input", "id")) for v, w, c in zip(row, widths, self.columns)]))


def _cell(row: dict, column: str, last: bool) -> str:
    if "error" in row and column not in ("input", "position", "rank"):
        err = row["error"]
        return f"ERROR {err['reason']}: {err['message']}" if last else ""
    v = row.get(column, "")
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _fit(v: str, w: int, tail: bool) -> str:
    """Cut to the column width; paths and URLs keep their end (the file name)."""
    if len(v) <= w:
        return v
    return "..." + v[-(w - 3):] if tail else v[: w - 3] + "..."


# ---------------------------------------------------------------------------------------------------- commands
def _device(args: argparse.Namespace) -> str:
    if not args.verbose:
        logging.getLogger().setLevel(logging.WARNING)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"{args.cmd}: --device {device} but no CUDA device is visible; use --device cpu")
    return device


def _load(args: argparse.Namespace, load):
    """``load(device)``; a model folder that cannot be loaded is one line (exit 1), never a traceback."""
    device = _device(args)
    try:
        return load(device)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as exc:
        raise SystemExit(f"{args.cmd}: cannot load the model folder {args.model}: {' '.join(str(exc).split())}")


def _predictor(args: argparse.Namespace):
    from mplug2.inference.predictor import Predictor

    return _load(args, lambda device: Predictor.load(args.model, device=device, num_frames=args.frames))


def _options(args: argparse.Namespace, predictor):
    from dataclasses import replace

    from mplug2.inference.media import MediaOptions

    opts = MediaOptions(num_frames=predictor.num_frames)
    if args.timeout:
        opts = replace(opts, video_timeout_s=args.timeout, fetch=replace(opts.fetch, timeout_s=args.timeout))
    return opts


def _task_predictor(args: argparse.Namespace, task: str):
    """A fine-tuned task's export (classification, grounding)."""
    from mplug2.inference.task_predictor import TaskPredictor

    return _load(args, lambda device: TaskPredictor.load(args.model, task, device=device, num_frames=args.frames))


def _top(probs: torch.Tensor, classes: Sequence[str], k: int) -> dict:
    """One item's best class (``output``, ``score``) and its top ``k`` (``top``: JSON only)."""
    p, i = probs.topk(min(k, len(classes)))
    top = [{"label": classes[j], "p": round(float(q), 4)} for q, j in zip(p.tolist(), i.tolist())]
    return {"output": top[0]["label"], "score": f"{top[0]['p']:.3f}", "top": top}


def _run_media(args: argparse.Namespace, columns: list[str], fn, predictor=None) -> int:
    """Load ``args.media`` in batches and write ``fn(batch) -> list[dict]`` rows; errors as rows."""
    from mplug2.inference.batches import pixel_batches

    predictor = predictor or _predictor(args)
    out = Output(columns, args.json)
    errors: list = []
    for batch in pixel_batches(predictor, args.media, batch_size=args.batch_size, options=_options(args, predictor),
                               errors=errors, progress=not args.json and sys.stderr.isatty()):
        for pos, err in errors:
            out.error(pos, err)
        errors.clear()
        for pos, media, fields in zip(batch.positions, batch.items, fn(predictor, batch)):
            out.row(input=media.source, position=pos, modality=media.modality, **fields)
    for pos, err in errors:
        out.error(pos, err)
    out.close()
    if out.failed:
        print(f"{out.failed} of {len(args.media)} items failed", file=sys.stderr)
    return 1 if out.failed else 0


def cmd_caption(args: argparse.Namespace) -> int:
    def run(p, batch):
        caps = p.caption(batch.pixels, beam_size=args.beam_size, min_len=args.min_len, max_len=args.max_len,
                         prompt=args.prompt, official_decoding=args.official_decoding)
        return [{"output": c} for c in caps]
    return _run_media(args, ["input", "modality", "output"], run)


def cmd_qa(args: argparse.Namespace) -> int:
    def run(p, batch):
        answers = p.answer(batch.pixels, [args.question] * len(batch.items), beam_size=args.beam_size,
                           max_len=args.max_len, official_decoding=args.official_decoding)
        return [{"question": args.question, "output": a} for a in answers]
    return _run_media(args, ["input", "modality", "question", "output"], run)


def cmd_classify(args: argparse.Namespace) -> int:
    tp = _task_predictor(args, "classify")

    def run(_, batch):
        return [_top(p, tp.classes, args.top_k) for p in tp.classify(batch.pixels)]
    return _run_media(args, ["input", "modality", "output", "score"], run, predictor=tp.media)


def cmd_classify_text(args: argparse.Namespace) -> int:
    if args.pair and len(args.pair) != len(args.texts):
        raise SystemExit(f"classify-text: {len(args.texts)} texts but {len(args.pair)} --pair sentences; give one "
                         "--pair per text (sentence-pair tasks) or none")
    tp = _task_predictor(args, "text_classify")
    out = Output(["input", "output", "score"], args.json)
    for i in range(0, len(args.texts), args.batch_size):
        a = args.texts[i:i + args.batch_size]
        b = args.pair[i:i + args.batch_size] if args.pair else None
        for j, probs in enumerate(tp.classify_texts(a, b, max_len=args.max_text_len)):
            text = a[j] if b is None else f"{a[j]} | {b[j]}"
            out.row(input=text, position=i + j, **_top(probs, tp.classes, args.top_k))
    out.close()
    return 0


def cmd_ground(args: argparse.Namespace) -> int:
    from pipelines.resize import source_box

    exprs = args.expression
    if len(exprs) not in (1, len(args.media)):
        raise SystemExit(f"ground: {len(args.media)} inputs but {len(exprs)} --expression; give one for all of "
                         "them or one per input, in order")
    tp = _task_predictor(args, "grounding")
    opts = _options(args, tp.media)
    expression_of = (lambda pos: exprs[0]) if len(exprs) == 1 else exprs.__getitem__

    def run(_, batch):
        said = [expression_of(pos) for pos in batch.positions]
        still = [i for i, media in enumerate(batch.items) if media.modality == "image"]
        boxes = dict(zip(still, tp.ground(batch.pixels[still], [said[i] for i in still]).tolist())) if still else {}
        rows = []
        for i, (media, expression) in enumerate(zip(batch.items, said)):
            if i not in boxes:
                rows.append({"error": {"reason": "invalid_input",
                                       "message": "grounding takes still images; extract a frame of the video"}})
                continue
            x1, y1, x2, y2 = boxes[i]
            m = media.meta        # the pipeline's resize: written size, and the user's image size
            w, h = m["width"], m["height"]
            box = source_box((x1 * w, y1 * h, (x2 - x1) * w, (y2 - y1) * h), m["original_width"],
                             m["original_height"], opts.image.size, opts.image.resize_mode)
            box = [round(v, 1) for v in box] if box else None
            rows.append({"expression": expression, "box": box,
                         "output": " ".join(f"{v:g}" for v in box) if box else "(in the padding)"})
        return rows
    return _run_media(args, ["input", "expression", "output"], run, predictor=tp.media)


def cmd_embed(args: argparse.Namespace) -> int:
    from mplug2.inference.batches import pixel_batches
    from mplug2.inference.index import write_index

    if not args.media and not args.texts:
        raise SystemExit("embed: give media items and/or --texts FILE")
    texts: list[str] = []
    if args.texts:
        try:
            with open(args.texts, encoding="utf-8") as f:
                texts = [line.strip() for line in f if line.strip()]
        except OSError as exc:
            raise SystemExit(f"embed: cannot read --texts {args.texts}: {exc.strerror}")
    predictor = _predictor(args)
    out = Output(["input", "modality", "output"], args.json)
    ids, mods, sources, embs = [], [], [], []
    errors: list = []
    for batch in pixel_batches(predictor, args.media, batch_size=args.batch_size, options=_options(args, predictor),
                               errors=errors, progress=not args.json and sys.stderr.isatty()):
        e = predictor.embed_media(batch.pixels)
        for pos, media, vec in zip(batch.positions, batch.items, e):
            ids.append(media.source)
            mods.append(media.modality)
            sources.append(media.source)
            embs.append(vec)
            out.row(input=media.source, position=pos, modality=media.modality, output=f"{vec.numel()}-d embedding")
    for pos, err in errors:
        out.error(pos, err)
    for i in range(0, len(texts), args.batch_size):
        chunk = texts[i:i + args.batch_size]
        for j, (t, vec) in enumerate(zip(chunk, predictor.embed_texts(chunk))):
            ids.append(t)
            mods.append("text")
            sources.append(None)
            embs.append(vec)
            out.row(input=t, position=len(args.media) + i + j, modality="text", output=f"{vec.numel()}-d embedding")
    if embs:
        write_index(args.out, ids, mods, torch.stack(embs), sources)
    out.close()
    print(f"wrote {len(embs)} embeddings to {args.out}" if embs else "no embeddings written", file=sys.stderr)
    if out.failed:
        print(f"{out.failed} of {len(args.media)} items failed", file=sys.stderr)
    return 1 if out.failed or not embs else 0


def cmd_retrieve(args: argparse.Namespace) -> int:
    from mplug2.inference.index import read_index

    try:
        index = read_index(args.index)
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise SystemExit(f"retrieve: cannot read --index {args.index}: {' '.join(str(exc).split())}")
    predictor = _predictor(args)
    queries = predictor.embed_texts(args.query)
    try:
        hits = index.search(queries, args.k * (3 if args.rerank else 1))
    except ValueError as exc:
        raise SystemExit(f"retrieve: {exc}")
    columns = ["query", "rank", "id", "modality", "score"] + (["itm", "rerank"] if args.rerank else [])
    out = Output(columns, args.json)
    for q, top in zip(args.query, hits):
        rows = [{"query": q, "id": index.ids[i], "modality": index.modalities[i], "score": s} for i, s in top]
        if args.rerank:
            rows = _rerank(predictor, index, q, top, rows, args, out)
        for rank, r in enumerate(rows[: args.k], 1):
            out.row(rank=rank, position=rank, **r)
    out.close()
    return 1 if out.failed else 0


def _rerank(predictor, index, query: str, top, rows: list[dict], args, out: Output) -> list[dict]:
    """ITM on the ITC top candidates (re-read from their ``source``), ranked by evaluation's re-rank score
    (ITC and ITM together: :meth:`Predictor.rerank_scores`); ``itm`` is the match probability."""
    from mplug2.inference.batches import pixel_batches

    sources = [index.sources[i] or index.ids[i] for i, _ in top]
    errors: list = []
    logits: dict[int, torch.Tensor] = {}
    for batch in pixel_batches(predictor, sources, batch_size=args.batch_size, options=_options(args, predictor),
                               errors=errors):
        for pos, lg in zip(batch.positions, predictor.itm_logits(batch.pixels, [query] * len(batch.items))):
            logits[pos] = lg
    for pos, err in errors:
        out.error(pos, err)
    kept = [pos for pos in range(len(rows)) if pos in logits]
    if not kept:
        return []
    lg = torch.stack([logits[pos] for pos in kept])
    scores = predictor.rerank_scores(lg, torch.tensor([rows[pos]["score"] for pos in kept]))
    match = torch.softmax(lg, dim=-1)[:, 1]
    ranked = [dict(rows[pos], itm=float(p), rerank=float(s)) for pos, p, s in zip(kept, match, scores)]
    return sorted(ranked, key=lambda r: -r["rerank"])


# ---------------------------------------------------------------------------------------------------- parser
def add_commands(sub) -> None:
    """Register the inference commands on ``mplug2-model``'s subparsers."""
    def common(p: argparse.ArgumentParser, media: str | None = "+") -> None:
        if media:
            p.add_argument("media", nargs=media,
                           help="local paths, file://, s3:// or http(s):// URLs; videos or images")
        p.add_argument("--model", required=True, help="model folder (local or s3://): convert, import-official or "
                                                      "a fine-tuning run's best/")
        p.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when available); bf16 on GPU")
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--frames", type=int, help="frames per video (default: the model's num_frames)")
        p.add_argument("--timeout", type=float, help="seconds per download and per video decode "
                                                     "(default: preprocessing's 10 s / 60 s)")
        p.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
        p.add_argument("-v", "--verbose", action="store_true", help="log model loading")

    pc = sub.add_parser("caption", help="caption videos / images", description="Caption videos or images.")
    common(pc)
    pc.add_argument("--beam-size", type=int, help="beams (default: the model config's)")
    pc.add_argument("--min-len", type=int, help="minimum tokens after the prompt")
    pc.add_argument("--max-len", type=int, help="maximum tokens after the prompt")
    pc.add_argument("--prompt", default="a video of", help="decoder prompt, stripped from the output")
    pc.add_argument("--official-decoding", action="store_true",
                    help="the release's decoding: from [CLS], the model writes the prompt; beam 5, 4-20 tokens "
                         "counting it")
    pc.set_defaults(fn=cmd_caption)

    pq_ = sub.add_parser("qa", help="answer a question about videos / images",
                         description="Answer one question about each video or image.")
    common(pq_)
    pq_.add_argument("--question", required=True)
    pq_.add_argument("--beam-size", type=int, help="beams (default: the model config's)")
    pq_.add_argument("--max-len", type=int, help="maximum answer tokens (default: the model's max_answer_len)")
    pq_.add_argument("--official-decoding", action="store_true", help="the release's decoding: beam 5, max 10")
    pq_.set_defaults(fn=cmd_qa)

    pe = sub.add_parser("embed", help="ITC embeddings of media and texts into a Parquet file",
                        description="Write ITC embeddings (id, modality, embedding, source) to Parquet; the schema "
                                    "is in mplug2/inference/index.py.")
    common(pe, media="*")
    pe.add_argument("--texts", help="a text file, one text per line, embedded as modality 'text'")
    pe.add_argument("--out", required=True, help="output .parquet (local or s3://)")
    pe.set_defaults(fn=cmd_embed)

    pk = sub.add_parser("classify", help="classify videos / images with a `classify` run's export",
                        description="Class of each video or image (the classes of the run's classes.json).")
    common(pk)
    pk.add_argument("--top-k", type=int, default=3, help="classes per item in --json output")
    pk.set_defaults(fn=cmd_classify)

    pt = sub.add_parser("classify-text", help="classify sentences (or pairs) with a `text_classify` run's export",
                        description="Class of each sentence; with --pair, of each (sentence, pair) as GLUE's "
                                    "pair tasks (RTE, MNLI, QNLI...).")
    common(pt, media=None)
    pt.add_argument("texts", nargs="+", help="sentences (the first of each pair)")
    pt.add_argument("--pair", action="append", default=[], help="the second sentence of each pair, in order "
                                                                "(repeatable: one per text)")
    pt.add_argument("--max-text-len", type=int, default=128, help="tokens per example, truncated longest first")
    pt.add_argument("--top-k", type=int, default=3, help="classes per item in --json output")
    pt.set_defaults(fn=cmd_classify_text)

    pg = sub.add_parser("ground", help="the box a referring expression names, with a `grounding` run's export",
                        description="Box (x y w h, in pixels of each input image) of what --expression names.")
    common(pg)
    pg.add_argument("--expression", action="append", required=True,
                    help='referring expression, e.g. "the red square on the left": one for every input, or '
                         'repeated, one per input in order')
    pg.set_defaults(fn=cmd_ground)

    pr = sub.add_parser("retrieve", help="search an embedding index with text queries",
                        description="Top-k items of an embedding index (a file, a folder of per-shard files, or "
                                    "s3://) by ITC similarity to each query; --rerank re-scores them with ITC + ITM.")
    common(pr, media=None)
    pr.add_argument("--index", required=True, help="embedding .parquet file or folder of them")
    pr.add_argument("--query", action="append", required=True, help="query text (repeatable)")
    pr.add_argument("-k", type=int, default=10, help="results per query")
    pr.add_argument("--rerank", action="store_true",
                    help="re-rank the ITC top 3k by ITC + ITM, as evaluation does (re-reads the media)")
    pr.set_defaults(fn=cmd_retrieve)
