"""``metafew export-backbone``: a trained run's backbone as a plain backbone file."""

from __future__ import annotations

import argparse
from typing import Any

from .common import add_command

EPILOG = """\
examples:
  metafew export-backbone --checkpoint runs/protonet-5w1s/best.safetensors --out backbones/proto-omniglot
  metafew adapt --backbone backbones/proto-omniglot.safetensors --data my_images/ --out model.safetensors

The file holds the backbone's weights with its record (architecture, image format, the
normalisation of the run's training dataset, its classes, the run's config), as
`metafew pretrain` writes it; the run's training dataset is read for its normalisation and
classes (downloaded into the data root on first use unless --no-download). `metafew adapt
--backbone` also takes the run checkpoint itself."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = add_command(
        subparsers,
        "export-backbone",
        help="write a trained run's backbone as a backbone file",
        description="Take the backbone out of a checkpoint of `metafew train` or `metafew bench` "
        "(best.safetensors or last.safetensors) and save it as a backbone file, for `metafew adapt`, "
        "`metafew train --backbone-checkpoint` or any safetensors reader.",
        epilog=EPILOG,
        common=("data_root", "download"),
    )
    p.add_argument("--checkpoint", required=True, metavar="FILE", help="a run checkpoint (best/last.safetensors)")
    p.add_argument("--out", required=True, metavar="FILE", help="where to save the backbone (.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if metafew wrote it earlier")
    return p


def run(args: argparse.Namespace) -> int:
    from ..config import export_backbone

    path = export_backbone(
        args.checkpoint, args.out, data_root=args.data_root, overwrite=args.overwrite, download=args.download
    )
    print(f"saved {path}")
    return 0
