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
        if "default" in text or not action.option_strings or any(action.default is v for v in (None, True, False, argparse.SUPPRESS)):
            return text
        return text + " (default: %(default)s)"


def common_parser() -> argparse.ArgumentParser:
    """``--device``, ``--seed``, ``--data-root``, ``--amp``, ``--no-progress``: accepted by every subcommand."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("common options")
    g.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    g.add_argument("--seed", type=int, default=0, help="seed of the initialisation and of the episodes")
    g.add_argument("--data-root", metavar="DIR", default=None,
                   help="where datasets live (default: $METAFEW_DATA, else ~/.cache/metafew/data)")
    g.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="mixed precision (default: float32)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


def add_command(subparsers: Any, name: str, help: str, description: str, epilog: str = "") -> argparse.ArgumentParser:
    """A subcommand parser with the common options and a readable help layout."""
    return subparsers.add_parser(
        name, help=help, description=description, epilog=epilog, parents=[common_parser()], formatter_class=HelpFormatter
    )


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
