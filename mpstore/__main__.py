"""``python -m mpstore``: the ``mpstore`` command, where its script is not on ``PATH``."""

import sys

from ._cli import main

sys.exit(main())
