"""The ``uncurl`` command line (``uncurl_hf.cli:main``)."""

from uncurl_hf.cli.main import main

__all__ = ["main"]
