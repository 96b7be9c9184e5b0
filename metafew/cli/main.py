"""The ``metafew`` command: ``metafew <command> [options]``.

Each command is a module of this package exposing ``add_parser(subparsers)`` and
``run(args) -> int``; :data:`COMMANDS` lists them in the order ``--help`` shows.
Errors a user can fix (a :class:`~metafew.errors.MetafewError`, a missing file, a bad
value) print one line ``metafew: error: <message>`` and exit with status 2; Ctrl-C
exits with 130 (training saves a checkpoint first).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from types import ModuleType

from ..errors import MetafewError
from . import adapt, bench, data, evaluate, predict, pretrain, train
from .common import HelpFormatter

# The subcommands, in help order. A new command: a module with add_parser/run, listed here.
COMMANDS: list[ModuleType] = [data, pretrain, train, evaluate, bench, adapt, predict]

EPILOG = """\
examples:
  metafew data info omniglot                      # what a dataset holds and where it is
  metafew bench                                   # the quick suite: a few minutes on a CPU
  metafew bench --suite omniglot --out results/omniglot.json
  metafew train --dataset omniglot --learner protonet --n-way 5 --k-shot 1 \\
                --train-way 60 --train-query 5 --steps 20000 --out runs/proto-5w1s
  metafew eval --checkpoint runs/proto-5w1s/best.safetensors --episodes 600

Run `metafew COMMAND --help` for the options of a command."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metafew",
        description="Few-shot image classification by meta-learning: ProtoNet, MAML, FO-MAML, Reptile and "
        "fine-tuning on a shared backbone, trained and compared on fixed episodes.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"metafew {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for module in COMMANDS:
        sub = module.add_parser(subparsers)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("metafew: interrupted", file=sys.stderr)
        return 130
    except (MetafewError, FileNotFoundError, NotADirectoryError, ValueError) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"metafew: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
