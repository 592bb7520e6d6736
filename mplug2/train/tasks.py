"""The task registry: every training task in one table, looked up by name by the config, the loop, the CLI
and evaluation (no string dispatch elsewhere).

A :class:`TaskSpec` says how a task is built (the module whose ``forward(batch)`` returns the loss and whose
methods predict), how it is evaluated on a held-out corpus, its typed options (``task_options:`` in the run
YAML), which config fields it requires, and what its export carries besides the bare model. Evaluation is
data-parallel: each rank scores its slice of the eval corpus (:func:`mplug2.train.evalset.load_eval_set`) and
the pieces are gathered, so every rank reports the numbers a single process would.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from mplug2.models.mplug2 import MPLUG2
from mplug2.train.evalset import EvalSet

# Builders and validators receive the run's ``mplug2.train.config.TrainConfig`` (which imports this registry
# to check ``task`` and ``task_options``; annotated ``RunConfig`` here so the two modules do not know each other).
RunConfig = Any
log = logging.getLogger(__name__)

__all__ = ["GroundingOptions", "TaskSpec", "EvalContext", "REGISTRY", "get_task", "task_names", "describe_tasks", "gather"]


@dataclass
class EvalContext:
    """What an evaluation needs besides the task module and the data."""

    tokenizer: Any
    max_text_len: int = 30
    device: torch.device | None = None
    batch_size: int = 32
    options: Any = None             # the task's typed options (TaskSpec.options_type)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    summary: str
    build: Callable[[RunConfig, MPLUG2, Any, int], nn.Module]
    evaluate: Callable[[nn.Module, EvalSet, EvalContext], dict[str, float]] | None = None
    options_type: type = dict
    validate: Callable[[RunConfig], None] = lambda cfg: None
    # files written beside the exported model (name -> bytes), and config fields read back from them
    export_files: Callable[[nn.Module], dict[str, bytes]] = lambda task: {}
    import_fields: Callable[[Callable[[str], bytes | None]], dict[str, Any]] = lambda read: {}
    uses_every_parameter: bool = False   # DDP may skip the unused-parameter search (all-video pretraining)
    # Tasks whose data are not shard corpora (text-only): their own train loader (cfg, tokenizer, rank, world)
    # and eval data (cfg, path, rank, world); None: the shard loader and mplug2.train.evalset.
    train_loader: Callable[[RunConfig, Any, int, int], Any] | None = None
    load_eval: Callable[[RunConfig, str, int, int], Any] | None = None
    preflight: Callable[[RunConfig], None] = lambda cfg: None   # driver-side data checks before workers start

    def options(self, raw: dict[str, Any] | None) -> Any:
        """The typed options from a run's ``task_options`` (unknown keys are an error)."""
        raw = dict(raw or {})
        if self.options_type is dict:
            if raw:
                raise ValueError(f"task {self.name!r} takes no task_options, got {sorted(raw)}")
            return {}
        names = {f.name for f in dataclasses.fields(self.options_type)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ValueError(f"task {self.name!r}: unknown task_options {unknown}; known: {sorted(names)}")
        return self.options_type(**raw)


# ------------------------------------------------------------------------------------------ gathering

def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` without torch.distributed). Tensors travel on the CPU."""
    _, world = _world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _by_position(parts: list[tuple[list[int], list[Any]]]) -> list[Any]:
    """Merge per-rank ``(positions, values)`` into manifest order."""
    pairs = sorted(((p, v) for pos, vals in parts for p, v in zip(pos, vals)), key=lambda pv: pv[0])
    return [v for _, v in pairs]


# ---------------------------------------------------------------------------------------- retrieval

@dataclass
class RetrievalOptions:
    k_test: int = 16                # ITM re-ranks each query's top-k ITC candidates (128/256 at scale)

    def __post_init__(self) -> None:
        if self.k_test < 1:
            raise ValueError(f"task_options.k_test must be >= 1, got {self.k_test}")


def _build_retrieval(cfg: RunConfig, model: MPLUG2, tokenizer, world_size: int) -> nn.Module:
    from mplug2.tasks.retrieval import RetrievalConfig, Retriever

    return Retriever(model, tokenizer, RetrievalConfig(
        global_batch=cfg.data.batch_size * world_size, itm_weight=cfg.loss_weights.get("itm", 1.0)))


def _evaluate_retrieval(task: nn.Module, data: EvalSet, ctx: EvalContext) -> dict[str, float]:
    """Each rank encodes its items and their texts; features are gathered; each rank re-ranks the queries
    of its own items; the re-ranked rows are gathered; every rank computes the same recalls."""
    from mplug2.eval.retrieval_metrics import hard_pair_itc, itm_hard_pair_metrics, retrieval_recall

    dev = ctx.device or next(task.parameters()).device
    texts = [c for caps in data.captions for c in caps]
    counts = [len(caps) for caps in data.captions]
    tok = ctx.tokenizer(texts, max_length=ctx.max_text_len)
    ids, tmask = tok["input_ids"].to(dev), tok["attention_mask"].to(dev)
    vis, vmask, f_v, text, f_t = task.encode(data.pixels.to(dev), ids, tmask)
    mine = (data.positions, vis.cpu(), vmask.cpu(), f_v.cpu(), text.cpu(), tmask.cpu(), f_t.cpu(), counts)
    parts = gather(mine)
    items: list[tuple] = []          # (position, vis, vmask, f_v, [(text, tmask, f_t), ...])
    for pos, v, vm, fv, t, tm, ft, cnt in parts:
        start = 0
        for r, p in enumerate(pos):
            n = cnt[r]
            items.append((p, v[r], vm[r], fv[r], [(t[start + j], tm[start + j], ft[start + j]) for j in range(n)]))
            start += n
    items.sort(key=lambda x: x[0])
    text_to_item = [i for i, it in enumerate(items) for _ in it[4]]
    g_vis = torch.stack([it[1] for it in items]).to(dev)
    g_vmask = torch.stack([it[2] for it in items]).to(dev)
    g_fv = torch.stack([it[3] for it in items]).to(dev)
    g_text = torch.stack([t[0] for it in items for t in it[4]]).to(dev)
    g_tmask = torch.stack([t[1] for it in items for t in it[4]]).to(dev)
    g_ft = torch.stack([t[2] for it in items for t in it[4]]).to(dev)
    sim = g_fv.float() @ g_ft.float().t()
    rank, world = _world()
    my_items = [i for i in range(len(items)) if i % world == rank]
    my_texts = [j for j in range(len(text_to_item)) if text_to_item[j] % world == rank]
    k = ctx.options.k_test if isinstance(ctx.options, RetrievalOptions) else RetrievalOptions().k_test
    i2t_rows, t2i_rows = task.rerank(sim, g_vis, g_vmask, g_text, g_tmask, my_items, my_texts,
                                     k=min(k, len(items)))
    rows = gather((my_items, i2t_rows.cpu(), my_texts, t2i_rows.cpu()))
    i2t = torch.stack(_by_position([(r[0], list(r[1])) for r in rows]))
    t2i = torch.stack(_by_position([(r[2], list(r[3])) for r in rows]))
    out = retrieval_recall(i2t, text_to_item, sim_t2i=t2i)
    out.update({f"itc_{key}": v for key, v in retrieval_recall(sim.cpu(), text_to_item).items()})
    if len(items) > 2:   # ITM on held-out hard pairs: each rank its own texts, gathered
        logp = task.hard_pair_logp(sim, g_vis, g_vmask, g_text, g_tmask, my_texts, text_to_item)
        itc = hard_pair_itc(sim.cpu(), text_to_item)[my_texts]
        parts = gather((logp.cpu(), itc))
        out.update(itm_hard_pair_metrics(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])))
    return {key: float(v) for key, v in out.items()}


# ----------------------------------------------------------------------------------------- captioning

def _build_caption(cfg: RunConfig, model: MPLUG2, tokenizer, world_size: int) -> nn.Module:
    from mplug2.tasks.caption import CaptionConfig, Captioner

    return Captioner(model, tokenizer, CaptionConfig())


def _evaluate_caption(task: nn.Module, data: EvalSet, ctx: EvalContext) -> dict[str, float]:
    from mplug2.eval.caption_metrics import coco_caption_scores

    dev = ctx.device or next(task.parameters()).device
    bs = ctx.batch_size
    preds: list[str] = []
    for i in range(0, len(data.keys), bs):
        preds += task.predict(data.pixels[i:i + bs].to(dev))
    rows = _by_position(gather((data.positions, list(zip(data.keys, preds, data.captions)))))
    cands = {key: text for key, text, _ in rows}
    refs = {key: caps for key, _, caps in rows}
    log.info("caption samples: %s", "; ".join(f"{k}: {cands[k]!r} (ref {refs[k][0]!r})" for k, *_ in rows[:3]))
    return {k: float(v) for k, v in coco_caption_scores(refs, cands).items()}


# ------------------------------------------------------------------------------------------------- QA

@dataclass
class QAOptions:
    mode: str = "generate"          # generate: beam-search the answer | rank: pick it from an answer list
    answer_list: list[str] = field(default_factory=list)   # rank: the candidates (default: the eval answers)
    k_test: int = 128               # rank: candidates kept after the first-token pass

    def __post_init__(self) -> None:
        if self.mode not in ("generate", "rank"):
            raise ValueError(f"task_options.mode must be 'generate' or 'rank', got {self.mode!r}")
        if self.k_test < 1:
            raise ValueError(f"task_options.k_test must be >= 1, got {self.k_test}")


def _build_qa(cfg: RunConfig, model: MPLUG2, tokenizer, world_size: int) -> nn.Module:
    from mplug2.tasks.qa import QATask

    return QATask(model, tokenizer, max_answer_len=model.config.max_answer_len)


def _qa_candidates(data: EvalSet, opts: QAOptions) -> list[str]:
    """The answer list: configured, else every answer of the eval corpus (gathered: the same on every rank)."""
    if opts.answer_list:
        return list(dict.fromkeys(opts.answer_list))
    mine = [a for a in data.answers if a is not None]
    mine += [a for lst in (data.answer_lists or []) if lst for a in lst]
    return sorted({a for part in gather(sorted(set(mine))) for a in part})


def _evaluate_qa(task: nn.Module, data: EvalSet, ctx: EvalContext) -> dict[str, float]:
    """Exact-match accuracy against the sample's answer; VQA accuracy (min(#humans agreeing / 3, 1), averaged
    over the 10 leave-one-out subsets) when every question carries a list of human answers."""
    from mplug2.eval.qa_metrics import exact_match_accuracy, vqa_accuracy

    opts = ctx.options if isinstance(ctx.options, QAOptions) else QAOptions()
    dev = ctx.device or next(task.parameters()).device
    bs = ctx.batch_size
    candidates = _qa_candidates(data, opts) if opts.mode == "rank" else []
    if candidates:
        enc = task.tok(candidates, max_length=task.max_answer_len + 2)
        cand_ids, cand_mask = enc["input_ids"].to(dev), enc["attention_mask"].to(dev)
    preds: list[str] = []
    for i in range(0, len(data.keys), bs):
        tok = ctx.tokenizer([c[0] for c in data.captions[i:i + bs]], max_length=ctx.max_text_len)
        px, ids, mask = data.pixels[i:i + bs].to(dev), tok["input_ids"].to(dev), tok["attention_mask"].to(dev)
        if candidates:
            best = task.qa.rank_answer(px, ids, mask, cand_ids, cand_mask, k=opts.k_test).best
            preds += [candidates[j] for j in best.tolist()]
        else:
            preds += task.predict(px, ids, mask)
    lists = data.answer_lists or [None] * len(data.keys)
    rows = _by_position(gather((data.positions, list(zip(data.captions, preds, data.answers, lists)))))
    log.info("qa samples: %s", "; ".join(f"{c[0]!r} -> {p!r} (gold {a!r})" for c, p, a, _ in rows[:3]))
    out = {"accuracy": float(exact_match_accuracy([r[1] for r in rows], [r[2] for r in rows]))}
    if all(r[3] for r in rows):
        out["vqa_accuracy"] = float(vqa_accuracy([r[1] for r in rows], [r[3] for r in rows]))
    return out


# ------------------------------------------------------------------------------------- classification

def _validate_classify(cfg: RunConfig) -> None:
    if len(cfg.classes) < 2 or len(set(cfg.classes)) != len(cfg.classes):
        raise ValueError(f"task 'classify' needs `classes`: at least two distinct label names, got {cfg.classes!r}")


def _build_classify(cfg: RunConfig, model: MPLUG2, tokenizer, world_size: int) -> nn.Module:
    from mplug2.tasks.classify import ClassifyTask

    return ClassifyTask(model, cfg.classes)


def _evaluate_classify(task: nn.Module, data: EvalSet, ctx: EvalContext) -> dict[str, float]:
    if not data.labels or any(lb is None for lb in data.labels):
        raise ValueError("the classification eval corpus needs a label in every sample's json")
    dev = ctx.device or next(task.parameters()).device
    bs = ctx.batch_size
    gold = task.label_ids(list(data.labels))
    logits = torch.cat([task.logits(data.pixels[i:i + bs].to(dev)).cpu() for i in range(0, len(data.keys), bs)])
    rows = _by_position(gather((data.positions, list(zip(logits, gold)))))
    logits, gold = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
    k = min(5, logits.shape[1])
    topk = logits.topk(k, dim=1).indices
    return {"top1": 100.0 * float((topk[:, 0] == gold).float().mean()),
            f"top{k}": 100.0 * float((topk == gold[:, None]).any(dim=1).float().mean())}


def _classes_file(task: nn.Module) -> dict[str, bytes]:
    return {"classes.json": json.dumps(list(task.classes)).encode()}


def _classes_from_export(read: Callable[[str], bytes | None]) -> dict[str, Any]:
    raw = read("classes.json")
    if raw is None:
        raise ValueError("the model folder has no classes.json: export a `classify` or `text_classify` run's "
                         "best/final model")
    return {"classes": json.loads(raw)}


# ------------------------------------------------------------------------------------------ grounding

@dataclass
class GroundingOptions:
    """``head``: ``tokens`` (model-spec §5: 4 box tokens from the decoder) or ``regression`` (an MLP on the
    fused [CLS], L1 + GIoU; mplug2.tasks.grounding.BoxRegressor). Box-token layout: None picks the vocabulary's
    default ([unused339] / [unused340]... for BERT, [unused8] / [unused9]... for the tiny vocab); ``num_bins``
    None = image_res + 1."""

    head: str = "tokens"
    prefix_token: str | None = None
    first_bin_token: str | None = None
    num_bins: int | None = None
    iou_threshold: float = 0.5

    def __post_init__(self) -> None:
        from mplug2.tasks.grounding import HEADS

        if self.head not in HEADS:
            raise ValueError(f"task_options.head must be one of {HEADS}, got {self.head!r}")
        if self.num_bins is not None and self.num_bins < 2:
            raise ValueError(f"task_options.num_bins must be >= 2, got {self.num_bins}")
        if not 0 < self.iou_threshold <= 1:
            raise ValueError(f"task_options.iou_threshold must be in (0, 1], got {self.iou_threshold}")


def _validate_grounding(cfg: RunConfig) -> None:
    if cfg.data.train and cfg.data.augment:
        raise ValueError("task 'grounding' needs `data.augment: false`: RandAugment's shear / translate / rotate "
                         "move the pixels under the box (the crop and flip still apply, and move the box)")


def _build_grounding(cfg: RunConfig, model: MPLUG2, tokenizer, world_size: int) -> nn.Module:
    from mplug2.tasks.grounding import GroundingConfig, GroundingTask

    opts = get_task("grounding").options(cfg.task_options)
    base = GroundingConfig.tiny() if model.config.tokenizer == "tiny" else GroundingConfig()
    return GroundingTask(model, tokenizer, GroundingConfig(
        prefix_token=opts.prefix_token or base.prefix_token, first_bin_token=opts.first_bin_token
        or base.first_bin_token, num_bins=opts.num_bins), head=opts.head)


def _grounding_file(task: nn.Module) -> dict[str, bytes]:
    return {"grounding.json": json.dumps({"head": task.head}).encode()}


def _grounding_from_export(read: Callable[[str], bytes | None]) -> dict[str, Any]:
    raw = read("grounding.json")
    if raw is None:
        raise ValueError("the model folder has no grounding.json: export a `grounding` run's best/final model")
    return {"task_options": {"head": json.loads(raw)["head"]}}


def _evaluate_grounding(task: nn.Module, data: EvalSet, ctx: EvalContext) -> dict[str, float]:
    """acc@IoU >= 0.5 (RefCOCO's metric), mean IoU, and chance: the best one fixed box's accuracy."""
    from mplug2.tasks.grounding import best_constant_box_accuracy, box_iou

    if not data.boxes or any(b is None for b in data.boxes):
        raise ValueError("the grounding eval corpus needs a box in every sample's json (preprocess with --box-col)")
    opts = ctx.options if isinstance(ctx.options, GroundingOptions) else GroundingOptions()
    dev = ctx.device or next(task.parameters()).device
    bs = ctx.batch_size
    preds = []
    for i in range(0, len(data.keys), bs):
        tok = ctx.tokenizer([c[0] for c in data.captions[i:i + bs]], max_length=ctx.max_text_len)
        preds.append(task.predict(data.pixels[i:i + bs].to(dev), tok["input_ids"].to(dev),
                                  tok["attention_mask"].to(dev)).cpu())
    pred = torch.cat(preds)
    rows = _by_position(gather((data.positions, list(zip(pred, data.boxes)))))
    pred = torch.stack([r[0] for r in rows]).float()
    gold = torch.tensor([list(r[1]) for r in rows], dtype=torch.float32)
    iou = box_iou(pred, gold)
    return {"acc_iou50" if opts.iou_threshold == 0.5 else f"acc_iou{opts.iou_threshold:g}":
            100.0 * float((iou >= opts.iou_threshold).float().mean()),
            "mean_iou": 100.0 * float(iou.mean()),
            "chance_acc": 100.0 * best_constant_box_accuracy(gold, opts.iou_threshold)}


# --------------------------------------------------------------------------------- text classification

@dataclass
class TextClassifyOptions:
    text_columns: list[str] = field(default_factory=list)   # one or two header names; [] = GLUE's (glue.py)
    label_column: str = ""                                   # "" = label / gold_label / is_duplicate


def _read_text_split(cfg: RunConfig, path: str):
    from mplug2.data.glue import read_glue_tsv

    opts = get_task("text_classify").options(cfg.task_options)
    return read_glue_tsv(path, text_columns=opts.text_columns, label_column=opts.label_column)


def _text_classes(cfg: RunConfig) -> list[str]:
    """The configured ``classes``, else the label set of the train file."""
    from mplug2.data.glue import label_set

    if cfg.classes:
        return list(cfg.classes)
    if not cfg.data.train:
        raise ValueError("task 'text_classify' needs `classes` or a train tsv (data.train) to read them from")
    return label_set(_read_text_split(cfg, cfg.data.train[0].path))


def _validate_text_classify(cfg: RunConfig) -> None:
    if len(cfg.data.train) > 1:
        raise ValueError(f"task 'text_classify' reads one train tsv, data.train lists {len(cfg.data.train)}")
    if cfg.classes and (len(cfg.classes) < 2 or len(set(cfg.classes)) != len(cfg.classes)):
        raise ValueError(f"text_classify `classes`: at least two distinct label names, got {cfg.classes!r}")


def _preflight_text_classify(cfg: RunConfig) -> None:
    """Read the train and eval tsv on the driver: a malformed file fails in one line before any worker starts."""
    from mplug2.data.glue import label_ids

    classes = _text_classes(cfg)
    if len(classes) < 2:
        raise ValueError(f"{cfg.data.train[0].path}: one label ({classes[0]!r}) in the train file; "
                         "classification needs at least two")
    if cfg.data.eval is not None:
        label_ids(_read_text_split(cfg, cfg.data.eval.path), classes)


def _build_text_classify(cfg: RunConfig, model: MPLUG2, tokenizer, world_size: int) -> nn.Module:
    from mplug2.tasks.classify import TextClassifyTask

    return TextClassifyTask(model, _text_classes(cfg))


def _text_train_loader(cfg: RunConfig, tokenizer, rank: int, world_size: int):
    from mplug2.data.glue import TextPairLoader

    if not cfg.data.train:
        raise ValueError("data.train names no train tsv")
    return TextPairLoader(_read_text_split(cfg, cfg.data.train[0].path), _text_classes(cfg), tokenizer,
                          batch_size=cfg.data.batch_size, max_length=cfg.data.max_text_len, seed=cfg.seed,
                          rank=rank, world_size=world_size)


def _load_text_eval(cfg: RunConfig, path: str, rank: int, world_size: int):
    data = _read_text_split(cfg, path)
    if len(data) < world_size:
        raise ValueError(f"eval tsv {path} has {len(data)} examples: fewer than the {world_size} ranks")
    return data.shard(rank, world_size)


def _evaluate_text_classify(task: nn.Module, data, ctx: EvalContext) -> dict[str, float]:
    """Each rank scores its slice of the tsv; predictions are gathered; accuracy (+ F1 and Matthews if binary)."""
    from mplug2.data.glue import label_ids, tokenize
    from mplug2.eval.classification_metrics import classification_scores

    dev = ctx.device or next(task.parameters()).device
    gold = label_ids(data, task.classes)
    preds = []
    for i in range(0, len(data), ctx.batch_size):
        enc = tokenize(ctx.tokenizer, data.text_a[i:i + ctx.batch_size],
                       None if data.text_b is None else data.text_b[i:i + ctx.batch_size], ctx.max_text_len)
        preds.append(task.logits(enc["input_ids"].to(dev), enc["attention_mask"].to(dev)).argmax(-1).cpu())
    rows = _by_position(gather((data.positions, list(zip(torch.cat(preds).tolist(), gold.tolist())))))
    return classification_scores(torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows]),
                                 len(task.classes))


# ------------------------------------------------------------------------------------------ pretraining

def _build_pretrain(cfg: RunConfig, model: MPLUG2, tokenizer, world_size: int) -> nn.Module:
    from mplug2.objectives.pretrain import MPLUG2Pretrainer, PretrainConfig

    w, total = cfg.loss_weights, cfg.schedule.total_steps
    return MPLUG2Pretrainer(model, tokenizer, PretrainConfig(
        itc_weight=w.get("itc", 1.0), itm_weight=w.get("itm", 1.0), mlm_weight=w.get("mlm", 1.0),
        prefix_lm_weight=w.get("prefix_lm", 1.0), global_batch=cfg.data.batch_size * world_size,
        alpha_ramp_steps=min(total, max(1, total // 10))))


REGISTRY: dict[str, TaskSpec] = {spec.name: spec for spec in (
    TaskSpec("pretrain", "ITC + ITM + MLM + prefix-LM pretraining", _build_pretrain, uses_every_parameter=True),
    TaskSpec("retrieval", "text<->video/image retrieval: ITC top-k, ITM re-rank; R@1/5/10 both ways",
             _build_retrieval, _evaluate_retrieval, options_type=RetrievalOptions),
    TaskSpec("caption", "video/image captioning; BLEU-4, ROUGE-L, CIDEr (pycocoevalcap)",
             _build_caption, _evaluate_caption),
    TaskSpec("qa", "video/image QA: answer generation or answer-list ranking; exact-match and VQA accuracy",
             _build_qa, _evaluate_qa, options_type=QAOptions),
    TaskSpec("classify", "video/image classification, labels from each sample's json; top-1 / top-5",
             _build_classify, _evaluate_classify, validate=_validate_classify, export_files=_classes_file,
             import_fields=_classes_from_export),
    TaskSpec("grounding", "visual grounding: expression -> box (box tokens or regression); acc@IoU>=0.5, mean IoU",
             _build_grounding, _evaluate_grounding, options_type=GroundingOptions, validate=_validate_grounding,
             export_files=_grounding_file, import_fields=_grounding_from_export),
    TaskSpec("text_classify", "GLUE-style text classification from a tsv (no visual input); accuracy, "
             "binary F1 / Matthews", _build_text_classify, _evaluate_text_classify,
             options_type=TextClassifyOptions, validate=_validate_text_classify, export_files=_classes_file,
             import_fields=_classes_from_export, train_loader=_text_train_loader, load_eval=_load_text_eval,
             preflight=_preflight_text_classify),
)}


def task_names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get_task(name: str) -> TaskSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"task must be one of {task_names()}, got {name!r}") from None


def describe_tasks(finetune_only: bool = True) -> str:
    """One line per task, for ``--help``."""
    return "\n".join(f"  {s.name:13s} {s.summary}" for s in REGISTRY.values()
                     if not (finetune_only and s.evaluate is None))
