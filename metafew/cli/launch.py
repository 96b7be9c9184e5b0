"""The ``metafew`` console script: the CLI, and a quiet exit when Ctrl-C comes during start-up.

Importing the CLI imports torch and every registered component (a second or more); a
Ctrl-C in that time would print a traceback of the import. This module imports nothing
heavy itself (``import metafew`` is lazy), so it can turn that Ctrl-C into exit code 130.
"""

from __future__ import annotations

import sys


def main() -> int:
    """Run ``metafew`` (:func:`metafew.cli.main.main`); 130 when interrupted while it loads."""
    try:
        from .main import main as run
    except KeyboardInterrupt:
        print("metafew: interrupted", file=sys.stderr)
        return 130
    return run()


if __name__ == "__main__":
    sys.exit(main())
