"""``python -m metafew.cli``: the same as the ``metafew`` command."""

import sys

from .main import main

sys.exit(main())
