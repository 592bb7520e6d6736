"""``mplug2-model``: inspect and build mPLUG-2 models.

    mplug2-model params --preset large              # parameter count per module and total (built on `meta`)
    mplug2-model convert --preset base --bert <bert ckpt> --clip <clip ckpt> --out <folder>
    mplug2-model convert --preset tiny --out m       # random weights: a folder to try the commands below on
    mplug2-model import-official mplug2_caption.pth --task caption --out large-caption   # the release's weights
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from mplug2.config import PRESET_NAMES, MPLUG2Config

log = logging.getLogger("mplug2.cli")


def _config(args: argparse.Namespace) -> MPLUG2Config:
    if getattr(args, "config", None):
        return MPLUG2Config.from_yaml(args.config)
    return MPLUG2Config.preset(args.preset)


def count_parameters(cfg: MPLUG2Config) -> dict[str, int]:
    """Parameters per top-level module, from a model built on the ``meta`` device (no memory spent)."""
    from mplug2.models.mplug2 import MPLUG2

    with torch.device("meta"):
        model = MPLUG2(cfg)
    return model.parameter_counts()


def format_counts(counts: dict[str, int]) -> str:
    total = sum(counts.values())
    rows = [f"{'module':<12}{'parameters':>16}{'share':>8}"]
    for name, n in counts.items():
        rows.append(f"{name:<12}{n:>16,}{100 * n / total:>7.1f}%")
    rows.append(f"{'total':<12}{total:>16,}  ({total / 1e9:.3f} B)")
    return "\n".join(rows)


def cmd_params(args: argparse.Namespace) -> int:
    cfg = _config(args)
    print(f"preset: {args.config or args.preset}")
    print(format_counts(count_parameters(cfg)))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from mplug2.models.mplug2 import MPLUG2
    from mplug2.weights import load_pretrained

    cfg = _config(args)
    torch.manual_seed(args.seed)
    model = MPLUG2(cfg)
    if args.bert or args.clip:
        print(load_pretrained(model, bert=args.bert, clip=args.clip).summary())
    else:
        print(f"no --bert/--clip: every weight randomly initialised (seed {args.seed}); a model to try the "
              "commands on, not to use")
    out = model.save_pretrained(args.out)
    print(f"wrote {out}")
    return 0


def cmd_import_official(args: argparse.Namespace) -> int:
    from mplug2.official import OfficialCheckpointError, import_official

    try:
        report = import_official(args.checkpoint, args.task, args.out, cfg=_config(args), seed=args.seed)
    except OfficialCheckpointError as exc:
        print(f"import-official: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    print(f"wrote {args.out} (config.yaml with vision.image_mode: centre, model.safetensors, import_report.json)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mplug2-model", description="Inspect and build mPLUG-2 models.")
    sub = p.add_subparsers(dest="cmd", required=True)

    pp = sub.add_parser("params", help="print the parameter count per module and in total")
    pp.add_argument("--preset", choices=PRESET_NAMES, default="base")
    pp.add_argument("--config", help="a model YAML instead of a preset")
    pp.set_defaults(fn=cmd_params)

    pc = sub.add_parser("convert", help="import HF BERT and HF/OpenAI CLIP weights into a save_pretrained folder")
    pc.add_argument("--preset", choices=PRESET_NAMES, default="base")
    pc.add_argument("--config", help="a model YAML instead of a preset")
    pc.add_argument("--bert", help="BertModel / BertForPreTraining / BertForMaskedLM weights (file or folder)")
    pc.add_argument("--clip", help="HF CLIPVisionModel/CLIPModel or OpenAI CLIP weights (file or folder)")
    pc.add_argument("--out", required=True, help="output folder (config.yaml + model.safetensors)")
    pc.add_argument("--seed", type=int, default=0, help="seed for the newly initialised modules")
    pc.set_defaults(fn=cmd_convert)

    pi = sub.add_parser("import-official", help="import a released mPLUG-2 caption/QA .pth into a model folder",
                        description="Import the official X-PLUG/mPLUG-2 video-caption or video-QA checkpoint "
                                    "(memory-mapped; tensors renamed, unused ones dropped and reported).")
    pi.add_argument("checkpoint", help="the release's .pth file")
    pi.add_argument("--task", choices=["caption", "qa"], required=True, help="which release file it is")
    pi.add_argument("--out", required=True, help="output model folder")
    pi.add_argument("--preset", choices=PRESET_NAMES, default="large", help="model sizes of the file (release: large)")
    pi.add_argument("--config", help="a model YAML instead of a preset")
    pi.add_argument("--seed", type=int, default=0, help="seed for the MLM head, which the release does not have")
    pi.set_defaults(fn=cmd_import_official)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
