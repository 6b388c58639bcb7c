"""``python -m uncurl_hf`` = the ``uncurl`` console script."""

import sys

from uncurl_hf.cli import main

sys.exit(main())
