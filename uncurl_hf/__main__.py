"""``python -m uncurl_hf`` = the ``uncurl`` console script."""

import sys

from uncurl_hf.cli.main import main

sys.exit(main())
