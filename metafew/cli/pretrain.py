"""``metafew pretrain``: supervised pretraining of a backbone on a dataset's base classes."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..config import PretrainConfig
from .common import add_command, add_config_arguments, config_overrides, parse_options

EPILOG = """\
examples:
  metafew pretrain --dataset omniglot --subset train --backbone conv4 --epochs 30 --out backbones/conv4-omniglot
  metafew pretrain --dataset omniglot --subset train --val-subset val --keep best --augment flipcrop \\
                   --augment-option padding=2 --augment-option flip=false --out backbones/conv4-omniglot
  metafew pretrain --dataset caltech101 --subset train --backbone resnet12 --epochs 90 --val-subset val \\
                   --out backbones/resnet12-caltech --amp bf16

The backbone is saved with its record (architecture, image format, normalisation,
training classes, the recipe) and reused by `metafew train --backbone-checkpoint FILE`,
`metafew eval --checkpoint FILE --learner protonet` or `metafew adapt --backbone FILE`."""

# PretrainConfig fields taken as flags (all but the structured ones).
FLAGS = [f.name for f in fields(PretrainConfig) if f.metadata.get("cli", True)]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = add_command(
        subparsers,
        "pretrain",
        help="pretrain a backbone by supervised classification",
        description="Train a backbone with a linear head by cross-entropy over all images of a dataset's "
        "base classes (SGD, Nesterov momentum, cosine decay), then save the backbone without the head.",
        epilog=EPILOG,
    )
    add_config_arguments(p, FLAGS, config=PretrainConfig)
    p.add_argument("--dataset-option", action="append", metavar="KEY=VALUE", help="dataset option, e.g. image_size=28")
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave unreadable image files of a folder: dataset out (with a warning) instead of stopping",
    )
    p.add_argument("--backbone-option", action="append", metavar="KEY=VALUE", help="backbone option, repeatable")
    p.add_argument("--augment", choices=["flipcrop"], default=None, help="on-device augmentation (default: none)")
    p.add_argument("--augment-option", action="append", metavar="KEY=VALUE", help="augmentation option, e.g. padding=2")
    p.add_argument("--out", required=True, metavar="FILE", help="where to save the backbone (.safetensors)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace --out (and its .log.jsonl) if metafew wrote them earlier"
    )
    return p


def run(args: argparse.Namespace) -> int:
    from ..config import run_pretrain

    d = config_overrides(args, FLAGS)
    d.update(seed=args.seed, amp=args.amp)
    if args.dataset_option:
        d["dataset_options"] = parse_options(args.dataset_option, "--dataset-option")
    if args.skip_bad:
        from ..data.registry import dataset_options

        if "on_error" in dataset_options(d.get("dataset", PretrainConfig().dataset)):
            d["dataset_options"] = {**d.get("dataset_options", {}), "on_error": "skip"}
    if args.backbone_option:
        d["backbone_options"] = parse_options(args.backbone_option, "--backbone-option")
    if args.augment:
        d["augment"] = {"name": args.augment, **parse_options(args.augment_option, "--augment-option")}
    recipe = PretrainConfig.from_dict(d, where="options")
    out = Path(args.out).expanduser()
    print(f"pretraining {recipe.backbone} on {recipe.dataset}/{recipe.subset} for {recipe.epochs} epochs")
    path = run_pretrain(
        recipe, out, data_root=args.data_root, device=args.device, progress=args.progress, overwrite=args.overwrite
    )
    print(f"saved {path}")
    return 0
