"""The demo's last step: the fine-tuned caption and QA models applied to held-out clips through the same inference
API that ``mplug2-model caption | qa`` uses (:class:`mplug2.inference.Predictor`), printed next to the ground
truth, and the one command that does the same for a user's own file."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from mplug2 import storage
from mplug2.inference import MediaLoader, MediaOptions, Predictor
from mplug2.model_folder import local_model_folder

__all__ = ["showcase"]


def _rows(manifest: str, n: int) -> list[dict]:
    with open(manifest) as f:
        return [json.loads(line) for line, _ in zip(f, range(n))]


def _table(header: Sequence[str], rows: list[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def _predict(model: str, items: list[dict], fn) -> list[str]:
    pred = Predictor.load(model)
    out = []
    with MediaLoader(MediaOptions(num_frames=pred.num_frames)) as loader:
        for item in items:
            try:
                pixels = pred.pixels_from_frames(loader.load(item["path"]).frames)[None]
                out.append(fn(pred, pixels, item))
            except Exception as exc:  # noqa: BLE001  (the demo shows the error for that clip and goes on)
                out.append(f"ERROR {exc}")
    return out


def local_model(run: str, dest: Path) -> str:
    """A run's exported model (``best/``, else ``final/``) copied to the local folder ``dest``, which outlives the
    demo's embedded S3."""
    best = storage.join(run, "best")
    src = best if storage.exists(storage.join(best, "model.safetensors")) else storage.join(run, "final")
    if dest.exists():
        shutil.rmtree(dest)
    with local_model_folder(src) as folder:
        shutil.copytree(folder, dest)
    return str(dest)


def showcase(caption_run: str, qa_run: str, caption_manifest: str, qa_manifest: str, models_dir: Path,
             n: int = 4) -> str:
    """Caption ``n`` held-out clips and answer their questions with the runs' models (copied into ``models_dir``);
    returns the printed text."""
    caption_model = local_model(caption_run, models_dir / "caption")
    qa_model = local_model(qa_run, models_dir / "qa")
    caps = _rows(caption_manifest, n)
    qas = _rows(qa_manifest, n)
    got_caps = _predict(caption_model, caps, lambda p, px, it: p.caption(px)[0])
    got_ans = _predict(qa_model, qas, lambda p, px, it: p.answer(px, [it["caption"]])[0])
    name = lambda it: it["path"].rsplit("/", 1)[-1]  # noqa: E731
    text = "\n".join([
        "[demo] the fine-tuned models on held-out clips (mplug2.inference, as `mplug2-model caption | qa`):",
        _table(["clip", "caption (model)", "ground truth"],
               [[name(it), got, it["caption"]] for it, got in zip(caps, got_caps)]),
        "",
        _table(["clip", "question", "answer (model)", "ground truth"],
               [[name(it), it["caption"], got, str(it["answer"])] for it, got in zip(qas, got_ans)]),
        "",
        "[demo] the same for your own video, image or URL:",
        f"  mplug2-model caption YOUR_FILE_OR_URL --model {caption_model}",
        f"  mplug2-model qa YOUR_FILE_OR_URL --question \"what colour is the shape?\" --model {qa_model}",
    ])
    print(text, flush=True)
    return text
