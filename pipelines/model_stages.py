"""Model stages of the Ray Data pipeline: curation with the model being trained.

- ``--score-with MODEL_DIR [--min-score X]``: the ITC similarity of each sample's media and caption goes
  into its json (``score``) and parquet row; a sample below ``--min-score`` is counted as ``low_score``
  and not written.
- ``--caption-with MODEL_DIR``: a generated caption goes into the json under ``--caption-field``, beside
  the original caption (``txt`` is left as it is).

Each stage is an actor pool (the model loads once per actor): one GPU per actor (or ``--model-gpus`` of
one, so several actors share it) in bf16 where the cluster has GPUs, one CPU per actor in fp32 otherwise.
The model code is :class:`mplug2.inference.Predictor`; the frames it sees are the shard's own JPEGs, so
it scores exactly what the sample holds.
"""

from __future__ import annotations

import io
import json
from abc import ABC, abstractmethod
from typing import Callable

from pipelines import shards
from pipelines.config import PreprocessConfig
from pipelines.errors import LOW_SCORE, SampleError
from pipelines.shard_stages import ShardWork, run_stage
from pipelines.rows import RowOutcome, fail_record


def _frames(fields: dict[str, bytes]) -> list:
    """The sample's frames as PIL images: ``jpg`` for an image, ``f000.jpg``... for a video."""
    from PIL import Image

    names = ["jpg"] if "jpg" in fields else sorted(n for n in fields if n.startswith("f") and n.endswith(".jpg"))
    return [Image.open(io.BytesIO(fields[n])).convert("RGB") for n in names]


def _set_json(o: RowOutcome, name: str, value) -> None:
    meta = json.loads(o.fields["json"])
    meta[name] = value
    o.fields["json"] = shards.canonical_json(meta)
    o.record[name] = value


class _ModelStage(ABC):
    """One actor of a model stage: a :class:`~mplug2.inference.Predictor` loaded once, applied to the
    written samples of each shard in batches of ``model_batch_size`` items with the same frame count."""

    def __init__(self, config_dict: dict, model_dir: str, use_gpu: bool):
        from mplug2.inference import Predictor

        self.config_dict = config_dict
        self.config = PreprocessConfig.from_dict(config_dict)
        self.predictor = Predictor.load(model_dir, device="cuda" if use_gpu else "cpu")  # bf16 on CUDA

    def __call__(self, row: dict) -> dict:
        return {"work": run_stage(self.apply, self.config_dict, row["work"])}

    def apply(self, config: PreprocessConfig, work: ShardWork) -> None:
        import torch

        written = [o for o in work.outcomes if o.fields is not None]
        by_frames: dict[int, list[tuple[RowOutcome, object]]] = {}
        for o in written:
            pixels = self.predictor.pixels_from_frames(_frames(o.fields))
            by_frames.setdefault(pixels.shape[0], []).append((o, pixels))
        n = config.model_batch_size
        for group in by_frames.values():
            for i in range(0, len(group), n):
                work.check_time()
                batch = group[i:i + n]
                self.on_batch([o for o, _ in batch], torch.stack([p for _, p in batch]))

    @abstractmethod
    def on_batch(self, outcomes: list[RowOutcome], pixels) -> None:
        """Write this stage's fields into a batch of samples (``pixels``: ``(B, T, 3, H, W)``)."""


class ScoreStage(_ModelStage):
    """ITC similarity of media and caption into ``score``; below ``min_score``: ``low_score``, not written."""

    def on_batch(self, outcomes: list[RowOutcome], pixels) -> None:
        media = self.predictor.embed_media(pixels)
        texts = self.predictor.embed_texts([o.fields["txt"].decode("utf-8") for o in outcomes])
        scores = (media * texts).sum(-1).tolist()
        floor = self.config.min_score
        for o, s in zip(outcomes, scores):
            s = round(float(s), 6)
            _set_json(o, "score", s)
            if floor is not None and s < floor:
                o.fields = None
                fail_record(o.record, SampleError(LOW_SCORE, f"ITC score {s:.4f} < --min-score {floor:g}"),
                      int(o.record.get("attempts") or 1))


class CaptionStage(_ModelStage):
    """A generated caption into the json field ``caption_field``, beside the original."""

    def on_batch(self, outcomes: list[RowOutcome], pixels) -> None:
        for o, text in zip(outcomes, self.predictor.caption(pixels)):
            _set_json(o, self.config.caption_field, text)


def add_model_stages(ds, config: PreprocessConfig, cpus_in_cluster: float, gpus_in_cluster: float):
    """Append the configured model stages (score first: no caption is generated for a dropped sample).

    CPU actors hold at most half the cluster's CPUs between them: an actor keeps its CPUs while alive, and
    the fetch, decode and commit stages must still be schedulable (else the pipeline waits forever).
    """
    import ray.data

    stages: list[tuple[Callable, str]] = []
    if config.score_with:
        stages.append((ScoreStage, config.score_with))
    if config.caption_with:
        stages.append((CaptionStage, config.caption_with))
    use_gpu = gpus_in_cluster > 0
    cpu_share = min(1.0, cpus_in_cluster / (2 * len(stages) * config.model_actors))
    resources = {"num_gpus": config.model_gpus} if use_gpu else {"num_cpus": cpu_share}
    for cls, model_dir in stages:
        ds = ds.map(cls, fn_constructor_kwargs={"config_dict": config.to_dict(), "model_dir": model_dir,
                                                "use_gpu": use_gpu},
                    compute=ray.data.ActorPoolStrategy(min_size=1, max_size=config.model_actors), **resources)
    return ds
