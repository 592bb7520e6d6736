"""Readers for the annotation files of public corpora that are not one-row-per-sample tables.

Each layout turns a parsed JSON file into flat records (one per *media file*) that the ordinary column
mapping then reads; ``PRESETS`` in :mod:`pipelines.config` names the layout and the columns for each
corpus, and ``docs/corpora.md`` shows the command and what each sample's json then holds. A layout is
chosen with ``--input-format`` (presets set it). Files are read whole: annotation files of these corpora
are megabytes, not gigabytes (HowTo100M's ``caption.json`` is the largest, a few GB of RAM).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from pipelines.errors import ConfigError

Record = dict[str, Any]


def _need(cond: bool, path: str, layout: str, what: str) -> None:
    if not cond:
        raise ConfigError(f"{path}: not a {layout} file ({what}); check --preset / --input-format")


def by_media(data: Any, path: str, media_keys: tuple[str, ...] = ("video", "image", "video_id", "image_id")
             ) -> Iterator[Record]:
    """A JSON list with one entry per (media, caption), as ALBEF/BLIP ship MSR-VTT, COCO and Flickr30k
    train files: entries of one media file are merged into one record (first-seen order), every caption
    kept in order in ``caption``; other fields keep their first value. Entries that already hold a caption
    list (the test files) pass through merged the same way."""
    if isinstance(data, dict):
        for k in ("annotations", "data", "items", "videos", "images"):
            if isinstance(data.get(k), list):
                data = data[k]
                break
    _need(isinstance(data, list), path, "json_by_media", "expected a list of objects")
    merged: dict[Any, Record] = {}
    for obj in data:
        if not isinstance(obj, dict):
            yield {"__invalid__": "list item is not an object"}
            continue
        key_field = next((k for k in media_keys if k in obj), None)
        if key_field is None or not isinstance(obj[key_field], (str, int)):
            yield {"__invalid__": f"entry without a media field ({'/'.join(media_keys)})"}
            continue
        caps = obj.get("caption", obj.get("captions", []))
        caps = list(caps) if isinstance(caps, (list, tuple)) else [caps]
        rec = merged.get(obj[key_field])
        if rec is None:
            merged[obj[key_field]] = {**{k: v for k, v in obj.items() if k not in ("caption", "captions")},
                                      "caption": caps}
        else:
            rec["caption"].extend(caps)
    yield from merged.values()


def msrvtt_videodatainfo(data: Any, path: str) -> Iterator[Record]:
    """MSR-VTT's original ``train_val_videodatainfo.json`` / ``test_videodatainfo.json``: ``videos`` and
    ``sentences`` joined on ``video_id``; one record per video with its sentences in ``sen_id`` order. The
    YouTube fields are kept under names that do not shadow the clip's own (``youtube_url``,
    ``youtube_start``, ``youtube_end``)."""
    _need(isinstance(data, dict) and isinstance(data.get("videos"), list)
          and isinstance(data.get("sentences"), list), path, "msrvtt_videodatainfo", "needs 'videos' and 'sentences'")
    sentences: dict[str, list[tuple[int, str]]] = {}
    for i, s in enumerate(data["sentences"]):
        if isinstance(s, dict) and "video_id" in s:
            sentences.setdefault(str(s["video_id"]), []).append((int(s.get("sen_id", i)), s.get("caption")))
    for v in data["videos"]:
        if not isinstance(v, dict) or "video_id" not in v:
            yield {"__invalid__": "video entry without video_id"}
            continue
        rec: Record = {"video_id": str(v["video_id"]),
                       "caption": [c for _, c in sorted(sentences.get(str(v["video_id"]), []), key=lambda t: t[0])]}
        for src, dst in (("url", "youtube_url"), ("start time", "youtube_start"), ("end time", "youtube_end"),
                         ("category", "category"), ("split", "split"), ("id", "msrvtt_index")):
            if src in v:
                rec[dst] = v[src]
        yield rec


def karpathy(data: Any, path: str) -> Iterator[Record]:
    """Karpathy's ``dataset_coco.json`` / ``dataset_flickr30k.json``: ``images`` with ``filepath``,
    ``filename``, ``split`` and ``sentences[].raw``; one record per image, every raw sentence kept."""
    _need(isinstance(data, dict) and isinstance(data.get("images"), list), path, "karpathy", "needs 'images'")
    for im in data["images"]:
        if not isinstance(im, dict) or "filename" not in im:
            yield {"__invalid__": "image entry without filename"}
            continue
        name = f"{im['filepath']}/{im['filename']}" if im.get("filepath") else im["filename"]
        rec: Record = {"image": name, "caption": [s.get("raw") for s in im.get("sentences", []) if isinstance(s, dict)],
                       "split": im.get("split")}
        for k in ("cocoid", "imgid"):
            if k in im:
                rec[k] = im[k]
        yield rec


def _clips_record(video_id: str, starts: list, ends: list, texts: list, path: str, extra: Record) -> Record:
    if not (isinstance(starts, list) and isinstance(ends, list) and isinstance(texts, list)
            and len(starts) == len(ends) == len(texts)):
        return {"__invalid__": f"{video_id}: start/end/text lists of different lengths"}
    return {"video_id": video_id, "caption": list(texts), "clips": [[s, e] for s, e in zip(starts, ends)], **extra}


def activitynet_captions(data: Any, path: str) -> Iterator[Record]:
    """ActivityNet Captions ``train.json`` / ``val_1.json``: ``{video_id: {duration, timestamps, sentences}}``;
    one record per video, one clip per timestamp, each clip with its own sentence (``--clip-captions``)."""
    _need(isinstance(data, dict), path, "activitynet_captions", "expected an object keyed by video id")
    for vid, v in data.items():
        if not isinstance(v, dict) or not isinstance(v.get("timestamps"), list):
            yield {"__invalid__": f"{vid}: no timestamps list"}
            continue
        ts = v["timestamps"]
        if not all(isinstance(t, (list, tuple)) and len(t) == 2 for t in ts):
            yield {"__invalid__": f"{vid}: timestamps are not [start, end] pairs"}
            continue
        yield _clips_record(str(vid), [t[0] for t in ts], [t[1] for t in ts], v.get("sentences"), path,
                            {"annotated_duration": v.get("duration")})


def howto100m_captions(data: Any, path: str) -> Iterator[Record]:
    """HowTo100M ``caption.json``: ``{video_id: {start: [...], end: [...], text: [...]}}``; one record per
    video, one clip per ASR segment, each with its own text (``--clip-captions``)."""
    _need(isinstance(data, dict), path, "howto100m_captions", "expected an object keyed by video id")
    for vid, v in data.items():
        if not isinstance(v, dict):
            yield {"__invalid__": f"{vid}: not an object"}
            continue
        yield _clips_record(str(vid), v.get("start"), v.get("end"), v.get("text"), path, {})


LAYOUTS: dict[str, Callable[[Any, str], Iterator[Record]]] = {
    "json_by_media": by_media,
    "msrvtt_videodatainfo": msrvtt_videodatainfo,
    "karpathy": karpathy,
    "activitynet_captions": activitynet_captions,
    "howto100m_captions": howto100m_captions,
}
