"""Options and helpers shared by the ``metafew`` subcommands."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..errors import ConfigError


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps description/epilog line breaks; shows a default where there is one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text
            or not action.option_strings
            or any(action.default is v for v in (None, True, False, argparse.SUPPRESS))
        ):
            return text
        return text + " (default: %(default)s)"


ALL_COMMON = ("device", "seed", "data_root", "download", "amp", "progress")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def common_parser(options: tuple[str, ...] = ALL_COMMON) -> argparse.ArgumentParser:
    """The shared options a command honours, from ``--device``, ``--seed``, ``--data-root``, ``--no-download``, ``--amp``, ``--no-progress``.

    ``--no-download`` (``args.download``, default True): a command that reads a named dataset
    with an official source downloads it into the data root on first use, as ``metafew
    bench`` always has (:func:`metafew.data.download.fetch_on_first_use`); the flag, or
    ``METAFEW_OFFLINE=1``, refuses and the command stops with where it looked.
    """
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("common options")
    if "device" in options:
        g.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    if "seed" in options:
        g.add_argument(
            "--seed", type=non_negative_int, default=0, help="seed of the initialisation and of the episodes"
        )
    if "data_root" in options:
        g.add_argument(
            "--data-root",
            metavar="DIR",
            default=None,
            help="where datasets live and are downloaded to (default: $METAFEW_DATA, else ~/.cache/metafew/data)",
        )
    if "download" in options:
        g.add_argument(
            "--no-download",
            dest="download",
            action="store_false",
            help="never download a missing dataset: stop with where it was looked for (also METAFEW_OFFLINE=1; "
            "default: fetch it from its official source on first use)",
        )
    if "amp" in options:
        g.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="mixed precision (default: float32)")
    if "progress" in options:
        g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


def fetch_named_data(data: str | None, args: argparse.Namespace, subset: str = "train", **options: Any) -> None:
    """Download ``data`` on first use when it names a dataset (``pneumoniamnist``, ``name:subset``), not a folder.

    For the commands that hand a name on to code loading it deeper down (``adapt --data``,
    ``adapt --align-source``, ``predict --evaluate``), under the same rule and flags as every
    command (``--no-download``, ``--data-root``; :func:`metafew.data.download.ensure_dataset`).
    An existing path, or a name metafew does not know, is left to that code.
    """
    import os
    from pathlib import Path

    if not data or Path(data).expanduser().exists() or os.sep in data:
        return
    from ..data import available_datasets
    from ..data.download import ensure_dataset

    name, _, sub = str(data).partition(":")
    if name.lower() not in [n for n in available_datasets() if ":" not in n]:
        return
    ensure_dataset(
        name.lower(),
        sub or subset,
        root=getattr(args, "data_root", None),
        download=getattr(args, "download", True),
        **options,
    )


def add_command(
    subparsers: Any, name: str, help: str, description: str, epilog: str = "", common: tuple[str, ...] = ALL_COMMON
) -> argparse.ArgumentParser:
    """A subcommand parser with the common options it honours (``common``) and a readable help layout."""
    return subparsers.add_parser(
        name,
        help=help,
        description=description,
        epilog=epilog,
        parents=[common_parser(common)],
        formatter_class=HelpFormatter,
    )


def add_config_arguments(
    parser: argparse.ArgumentParser | Any,
    names: list[str],
    *,
    flags: dict[str, str] | None = None,
    title: str | None = None,
    show_defaults: bool = True,
    config: type | None = None,
) -> None:
    """Flags for the fields ``names`` of ``config`` (default RunConfig), with each field's help and default.

    A flag left out parses to None (not an override).

    ``flags`` renames a field's flag for one command (``{"eval_episodes": "--episodes"}``).
    """
    from dataclasses import MISSING, fields

    from ..config import RunConfig

    meta = {f.name: f for f in fields(config or RunConfig)}
    g = parser.add_argument_group(title) if title else parser
    for name in names:
        f = meta[name]
        help = f.metadata["help"]
        if show_defaults and "default" not in help and f.default not in (None, MISSING, ""):
            help += f" (default: {f.default})"
        base = {"int": int, "float": float}.get(_base_type(f.type), str)
        metavar = "FILE" if name.endswith("checkpoint") else {int: "N", float: "X"}.get(base, "NAME")
        typ: Any = base
        if base is int:
            typ = non_negative_int if name in ("steps", "val_episodes") else positive_int
        elif base is float:
            typ = _non_negative_float
        flag = (flags or {}).get(name, "--" + name.replace("_", "-"))
        if str(f.type) == "bool":  # a switch: left out parses to None, like every other flag
            g.add_argument(flag, dest=name, action="store_true", default=None, help=f.metadata["help"])
            continue
        if "choices" in f.metadata:
            g.add_argument(flag, dest=name, choices=f.metadata["choices"], default=None, help=help)
            continue
        g.add_argument(flag, dest=name, type=typ, default=None, metavar=metavar, help=help)


def _base_type(annotation: Any) -> str:
    text = str(annotation)
    return "int" if text.startswith("int") else "float" if text.startswith("float") else "str"


def _non_negative_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not v >= 0 or v == float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return v


def config_overrides(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    """The RunConfig fields given on the command line (flags left out are not overrides)."""
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def parse_value(text: str) -> Any:
    """A JSON/TOML-ish literal (``0.4``, ``true``, ``[0, 0.999]``, ``"x"``), else the text itself."""
    low = text.strip()
    if low in ("true", "True"):
        return True
    if low in ("false", "False"):
        return False
    if low in ("none", "None", "null"):
        return None
    try:
        return json.loads(low)
    except json.JSONDecodeError:
        return text


def parse_options(items: list[str] | None, what: str = "option") -> dict[str, Any]:
    """``["inner_lr=0.4", "first_order=true"]`` -> ``{"inner_lr": 0.4, "first_order": True}``."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{what} {item!r} is not of the form KEY=VALUE")
        out[key.strip().replace("-", "_")] = parse_value(value)
    return out
