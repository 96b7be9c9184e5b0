"""``metafew data``: what a dataset holds and where it is, and downloading it."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from .common import add_command

EPILOG = """\
examples:
  metafew data info omniglot                 # classes, images and location of each subset
  metafew data info pneumoniamnist --data-root /mnt/data
  metafew data info folder:/path/to/images   # a folder of class sub-folders
  metafew data download omniglot             # fetch from the official source into the data root
  METAFEW_MIRROR=https://host/files metafew data download omniglot   # the same files from a mirror

Datasets: omniglot (Vinyals split: train/val/test/trainval), omniglot-lake (background/
evaluation), MedMNIST (pneumoniamnist, breastmnist, ...), caltech101, mini-imagenet, tiered-imagenet,
cifar-fs, fc100, cub, folder:PATH."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = add_command(
        subparsers,
        "data",
        help="inspect or download a dataset",
        description="Show what a dataset holds (subsets, classes, images, image format, where it was found), "
        "or download it from its official source into the data root.",
        epilog=EPILOG,
        common=("data_root",),
    )
    p.add_argument("action", choices=["info", "download"], help="info: describe the dataset; download: fetch it")
    p.add_argument("name", help="dataset name, e.g. omniglot, omniglot-lake, pneumoniamnist, caltech101, folder:PATH")
    p.add_argument("--subset", help="(download) the subset to fetch and decode (default: every subset)")
    return p


def _lines(info: Any, indent: str = "") -> list[str]:
    if dataclasses.is_dataclass(info) and not isinstance(info, type):
        info = dataclasses.asdict(info)
    if isinstance(info, dict):
        out = []
        for k, v in info.items():
            if (
                isinstance(v, (dict, list))
                and v
                and not all(isinstance(x, (int, float, str)) for x in (v.values() if isinstance(v, dict) else v))
            ):
                out.append(f"{indent}{k}:")
                out.extend(_lines(v, indent + "  "))
            else:
                out.append(f"{indent}{k}: {v}")
        return out
    if isinstance(info, list):
        return [line for item in info for line in _lines(item, indent)]
    return [f"{indent}{line}" for line in str(info).splitlines()]


def run(args: argparse.Namespace) -> int:
    from ..data import dataset_info, lake_runs, load_dataset
    from ..errors import DatasetNotFoundError

    if args.action == "info":
        info = dataset_info(args.name, args.data_root)
        subsets = info.pop("subsets", None) or {}
        message = info.pop("message", None)
        print("\n".join(_lines(info)))
        if subsets:
            print("subsets:")
            for name, counts in subsets.items():
                images = counts.get("images")
                shown = "? (counted on first load)" if images is None else images  # e.g. a pickle not yet read
                print(f"  {name}: {counts.get('classes')} classes, {shown} images")
        if info.get("found") is False:
            raise DatasetNotFoundError(message or f"{args.name} not found under {info.get('data_root')}")
        if subsets and not any(c.get("images") is None or int(c["images"]) for c in subsets.values()):
            from ..errors import DatasetError

            raise DatasetError(
                f"{args.name} holds no images{' (' + message + ')' if message else ''}; "
                "put one sub-folder of images per class in it"
            )
        return 0
    found = dataset_info(args.name, args.data_root) if args.subset is None else None
    subsets = [args.subset] if args.subset else list(_subsets(found)) or ["train"]
    for subset in subsets:
        ds = load_dataset(args.name, subset, root=args.data_root, download=True)
        ds.images  # decode once now, so later runs read the cache  # noqa: B018
        print(f"{args.name}/{subset}: {len(ds)} images, {ds.num_classes} classes")
    if args.name.lower() == "omniglot-lake" and args.subset is None:
        runs = lake_runs(args.data_root, download=True)  # the benchmark's 20 official runs
        print(f"omniglot-lake runs: {len(runs)} official 20-way 1-shot runs")
    where = dataset_info(args.name, args.data_root).get("path")
    if where:
        print(f"{args.name} is in {where}")
    return 0


def _subsets(info: Any) -> list[str]:
    if dataclasses.is_dataclass(info) and not isinstance(info, type):
        info = dataclasses.asdict(info)
    subsets = info.get("subsets") if isinstance(info, dict) else getattr(info, "subsets", None)
    if isinstance(subsets, dict):
        return list(subsets)
    return list(subsets or [])
