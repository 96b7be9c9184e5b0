"""``python -m metafew``: the ``metafew`` command, also as ``torchrun --nproc-per-node N -m metafew ...``."""

import sys

from .cli.launch import main

if __name__ == "__main__":
    sys.exit(main())
