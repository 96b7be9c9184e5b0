"""``metafew pretrain``: supervised pretraining of a backbone on a dataset's base classes."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import add_command, parse_options

EPILOG = """\
examples:
  metafew pretrain --dataset omniglot --subset train --backbone conv4 --epochs 30 --out backbones/conv4-omniglot
  metafew pretrain --dataset caltech101 --subset train --backbone resnet12 --epochs 90 --val-subset val \\
                   --out backbones/resnet12-caltech --amp bf16

The backbone is saved with its record (architecture, image format, normalisation,
training classes) and reused by `metafew train --backbone-checkpoint FILE` or
`metafew eval --checkpoint FILE --learner protonet`."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = add_command(
        subparsers,
        "pretrain",
        help="pretrain a backbone by supervised classification",
        description="Train a backbone with a linear head by cross-entropy over all images of a dataset's "
        "base classes (SGD, Nesterov momentum, cosine decay), then save the backbone without the head.",
        epilog=EPILOG,
    )
    p.add_argument("--dataset", default="omniglot", help="dataset name")
    p.add_argument("--subset", default="train", help="subset of base classes to train on")
    p.add_argument("--val-subset", default=None, help="validation subset checked every epoch (few-shot accuracy)")
    p.add_argument("--backbone", default="conv4", help="backbone architecture")
    p.add_argument("--backbone-option", action="append", metavar="KEY=VALUE", help="backbone option, repeatable")
    p.add_argument("--epochs", type=int, default=30, help="passes over the training images")
    p.add_argument("--batch-size", type=int, default=128, help="images per step")
    p.add_argument("--lr", type=float, default=0.05, help="initial SGD learning rate")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="cross-entropy label smoothing")
    p.add_argument("--out", required=True, metavar="FILE", help="where to save the backbone (.safetensors)")
    return p


def run(args: argparse.Namespace) -> int:
    from ..data import load_dataset
    from ..engine.pretrain import pretrain

    dataset = load_dataset(args.dataset, args.subset, root=args.data_root)
    val = load_dataset(args.dataset, args.val_subset, root=args.data_root) if args.val_subset else None
    out = Path(args.out).expanduser()
    print(f"pretraining {args.backbone} on {dataset.name}: {len(dataset)} images, {dataset.num_classes} classes")
    pretrain(
        args.backbone, dataset, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, label_smoothing=args.label_smoothing, device=args.device, amp=args.amp,
        val=val, seed=args.seed, out=out, progress=args.progress, log=out.with_suffix(".log.jsonl"),
        backbone_options=parse_options(args.backbone_option, "--backbone-option") or None,
    )
    print(f"saved {out if out.suffix else out.with_name(out.name + '.safetensors')}")
    return 0
