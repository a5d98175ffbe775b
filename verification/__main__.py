"""``python -m verification``: the same as ``singd-verify``."""

import sys

from verification.cli import main

sys.exit(main())
