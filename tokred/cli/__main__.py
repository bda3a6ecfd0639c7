"""``python -m tokred.cli``: the ``tokred`` command where its script is not on ``PATH``."""

import sys

from . import main

sys.exit(main())
