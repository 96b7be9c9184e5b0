"""The ``metafew`` command: ``metafew <command> [options]``.

Each command is a module of this package exposing ``add_parser(subparsers)`` and
``run(args) -> int``; :data:`COMMANDS` lists them in the order ``--help`` shows.
Errors a user can fix (a :class:`~metafew.errors.MetafewError`, a missing file, a bad
value) print one line ``metafew: error: <message>`` and exit with status 2; Ctrl-C
exits with 130 (training saves a checkpoint first).

Under ``torchrun`` (``torchrun --nproc-per-node N -m metafew train ...``, see
:mod:`metafew.distributed`) every process joins the process group first; only rank 0
prints and writes, and an error on any rank prints its one line (``[rank r]``) and exits
non-zero, which makes ``torchrun`` end the others.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import NoReturn

from .. import distributed
from ..errors import MetafewError
from ..registry import did_you_mean
from . import adapt, bench, data, evaluate, export_backbone, predict, pretrain, train
from .common import HelpFormatter

# The subcommands, in help order. A new command: a module with add_parser/run, listed here.
COMMANDS: list[ModuleType] = [data, pretrain, train, evaluate, bench, export_backbone, adapt, predict]

EPILOG = """\
examples:
  metafew data info omniglot                      # what a dataset holds and where it is
  metafew bench                                   # the quick suite: a few minutes on a CPU
  metafew bench --suite omniglot --out results/omniglot.json
  metafew train --dataset omniglot --learner protonet --n-way 5 --k-shot 1 \\
                --train-way 60 --train-query 5 --steps 20000 --out runs/protonet-5w1s
  metafew eval --checkpoint runs/protonet-5w1s/best.safetensors --episodes 600

Run `metafew COMMAND --help` for the options of a command."""


class Parser(argparse.ArgumentParser):
    """argparse, with "did you mean ...?" for a misspelt command or choice."""

    def error(self, message: str) -> NoReturn:
        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:
            choices = re.findall(r"'([^']*)'", m.group(2)) or [c.strip() for c in m.group(2).split(",")]
            message += did_you_mean(m.group(1), choices)
        super().error(message)


def _registered() -> str:
    """What the registries hold (plug-ins included), for the help text."""
    from ..backbones import available, list_weights
    from ..data import available_datasets
    from ..learners import available as learners

    return (
        f"\n\nlearners: {', '.join(learners())}\nbackbones: {', '.join(available())}"
        f"\npretrained backbones (use the name as --backbone / --backbone-checkpoint): {', '.join(list_weights())}"
        f"\ndatasets: {', '.join(available_datasets())}"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="metafew",
        description="Few-shot image classification by meta-learning: ProtoNet, MAML, FO-MAML, Reptile and "
        "fine-tuning on a shared backbone, trained and compared on fixed episodes.",
        epilog=EPILOG + _registered(),
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
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if getattr(args, "_run", None) is None:
            parser.print_help()
            return 0
        if distributed.init(getattr(args, "device", "auto")) and not distributed.is_main():
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # rank 0 prints
                return int(args._run(args) or 0)
        return int(args._run(args) or 0)
    except KeyboardInterrupt as e:
        where = " ".join(str(e).split())  # the training loop says where its checkpoint is
        print(f"metafew: interrupted{_rank()}{': ' + where if where else ''}", file=sys.stderr)
        return 130
    except (MetafewError, ValueError) as e:
        print(f"metafew: error:{_rank()} {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # a missing file, a read-only folder, a full disk: the path and the reason
        print(f"metafew: error:{_rank()} {_os_error(e)}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()


def _rank() -> str:
    """`` [rank r]`` on the processes of a distributed run other than rank 0 (which speaks for the run)."""
    return f" [rank {distributed.rank()}]" if distributed.world() > 1 and not distributed.is_main() else ""


# What the library tells a Python caller to pass, and what a command-line user passes instead.
_CLI_WORDING = {
    "pass on_error='skip'": "use --skip-bad",
    "use too_few='skip'": "use --skip-bad",
    "pass download=True or run": "drop --no-download or run",
}


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    for python, cli in _CLI_WORDING.items():
        text = text.replace(python, cli)
    return text


def _os_error(e: OSError) -> str:
    if e.filename is None or isinstance(e, MetafewError):
        return _one_line(e)
    names = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
    return f"{names}: {e.strerror or _one_line(e)}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
