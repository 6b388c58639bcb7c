"""``python -m uncurl_hf.cli`` (what torchrun and accelerate launch run)."""

import sys

from uncurl_hf.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
