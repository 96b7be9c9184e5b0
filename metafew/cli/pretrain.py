"""``metafew pretrain``: supervised pretraining of a backbone on a dataset's base classes."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..config import PretrainConfig
from ..errors import ConfigError
from .common import add_command, add_config_arguments, config_overrides, parse_options, positive_int

EPILOG = """\
examples:
  metafew pretrain --dataset omniglot --subset train --backbone conv4 --epochs 30 --out backbones/conv4-omniglot
  metafew pretrain --dataset omniglot --subset train --val-subset val --keep best --augment flipcrop \\
                   --augment-option padding=2 --augment-option flip=false --out backbones/conv4-omniglot
  metafew pretrain --dataset caltech101 --subset train --backbone resnet12 --epochs 90 --val-subset val \\
                   --out backbones/resnet12-caltech --amp bf16
  metafew pretrain --dataset breastmnist --image-size 28 --in-channels 1 --epochs 20 --out backbones/conv4-breast
  metafew pretrain --dataset folder:my_images --image-size 64 --in-channels 3 --out backbones/conv4-mine

--image-size/--in-channels set the image format the backbone is pretrained (and later
adapted) at: passed to the dataset as its image_size/channels option when it takes one
(Omniglot, Caltech-101, folder:PATH...), else checked against its fixed format
(MedMNIST: 28x28, 1 or 3 channels), so `--dataset-option image_size=N` is the same recipe.

The backbone is saved with its record (architecture, image format, normalisation,
training classes, the recipe) and reused by `metafew train --backbone-checkpoint FILE`,
`metafew eval --checkpoint FILE --learner protonet` or `metafew adapt --backbone FILE`.

Beside OUT.safetensors: OUT.log.jsonl (one row per epoch) and, while the run is not
finished, OUT.resume.safetensors (the whole training state, saved at the end of each
epoch, every --checkpoint-every N steps and on Ctrl-C). Ctrl-C finishes the step, saves
it and exits with status 130; the same command with --resume continues from it, to the
weights an uninterrupted run gives, bit for bit (a checkpoint of another recipe is refused).
  metafew pretrain --dataset omniglot --epochs 30 --out backbones/conv4-omniglot --resume

--tensorboard [DIR] also writes each epoch's row of the log (loss, accuracy, learning rate,
validation figures with their 95% CI, time per step) as TensorBoard scalars, into DIR
(default: OUT.tensorboard/); it needs `pip install -e ".[tensorboard]"` from the clone.
  metafew pretrain --dataset omniglot --out backbones/conv4-omniglot --tensorboard
  tensorboard --logdir backbones"""

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
    p.add_argument(
        "--image-size",
        type=positive_int,
        metavar="N",
        default=None,
        help="pretrain on NxN images (the dataset's image_size option; default: the dataset's size)",
    )
    p.add_argument(
        "--in-channels",
        type=int,
        choices=[1, 3],
        default=None,
        help="image channels: 1 (grayscale) or 3 (RGB) (the dataset's channels option; default: the dataset's)",
    )
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
        "--overwrite",
        action="store_true",
        help="replace --out (and its .log.jsonl, and an interrupted run's checkpoint) if metafew wrote them earlier",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted pretraining of --out from its .resume.safetensors (same options)",
    )
    p.add_argument(
        "--tensorboard",
        nargs="?",
        const=True,
        default=None,
        metavar="DIR",
        help=(
            "also log to TensorBoard, into DIR (default: OUT.tensorboard/); "
            'needs pip install -e ".[tensorboard]" from the clone'
        ),
    )
    return p


def run(args: argparse.Namespace) -> int:
    from ..config import run_pretrain

    d = config_overrides(args, FLAGS)
    d.update(seed=args.seed, amp=args.amp)
    if args.dataset_option:
        d["dataset_options"] = parse_options(args.dataset_option, "--dataset-option")
    if args.image_size is not None or args.in_channels is not None:
        d["dataset_options"] = image_format_options(
            d.get("dataset", PretrainConfig().dataset), d.get("dataset_options", {}), args.image_size, args.in_channels
        )
    if args.skip_bad:
        from ..data.registry import dataset_options

        if "on_error" in dataset_options(d.get("dataset", PretrainConfig().dataset)):
            d["dataset_options"] = {**d.get("dataset_options", {}), "on_error": "skip"}
    if args.backbone_option:
        d["backbone_options"] = parse_options(args.backbone_option, "--backbone-option")
    if args.augment:
        d["augment"] = {"name": args.augment, **parse_options(args.augment_option, "--augment-option")}
    if args.tensorboard is not None:
        d["tensorboard"] = args.tensorboard
    recipe = PretrainConfig.from_dict(d, where="options")
    out = Path(args.out).expanduser()
    if args.resume and not args.overwrite:
        from ..checkpoint import checkpoint_path
        from ..engine.pretrain import resume_path

        state = resume_path(out)
        if not state.exists() and not checkpoint_path(out).exists():
            raise ConfigError(
                f"--resume: there is no interrupted pretraining to continue ({state} does not exist); "
                "drop --resume to start one"
            )
    verb = "resuming the pretraining of" if args.resume else "pretraining"
    print(f"{verb} {recipe.backbone} on {recipe.dataset}/{recipe.subset} for {recipe.epochs} epochs")
    path = run_pretrain(
        recipe,
        out,
        data_root=args.data_root,
        device=args.device,
        progress=args.progress,
        overwrite=args.overwrite,
        download=args.download,
        resume=args.resume,
    )
    print(f"saved {path}")
    return 0


def image_format_options(
    dataset: str, options: dict[str, Any], image_size: int | None, in_channels: int | None
) -> dict[str, Any]:
    """``options`` with ``--image-size``/``--in-channels`` applied as the dataset's own options.

    A dataset that takes ``image_size`` (``channels``) gets it as that option, so the recipe
    (and its cache key) is the one a TOML ``[pretrain]`` table with ``dataset_options`` gives;
    one with a fixed format is only checked against it. Raises a one-line ConfigError when
    the dataset cannot give that format or ``--dataset-option`` says otherwise.
    """
    from ..data.registry import _lookup, dataset_options

    takes = dataset_options(dataset)
    native = _lookup(dataset)[0].image_shape  # (C, H, W) at the default options, None when data-dependent
    out = dict(options)
    wanted = (
        ("--image-size", "image_size", image_size, None if native is None else (int(native[1]), int(native[2]))),
        ("--in-channels", "channels", in_channels, None if native is None else int(native[0])),
    )
    for flag, key, value, fixed in wanted:
        if value is None:
            continue
        if key in out and out[key] != value:
            raise ConfigError(f"{flag} {value} contradicts --dataset-option {key}={out[key]}")
        if key in takes:
            out[key] = value
            continue
        if fixed == ((value, value) if key == "image_size" else value):
            continue  # the dataset's fixed format already: nothing to pass
        what = "data-dependent" if fixed is None else "x".join(map(str, fixed)) if isinstance(fixed, tuple) else fixed
        thing = "size" if key == "image_size" else "channel count"
        raise ConfigError(
            f"{flag} {value}: dataset {dataset!r} has a fixed {thing} ({what}) and no {key} option; "
            f"leave {flag} out or use a dataset that takes it (e.g. folder:PATH)"
        )
    return out
