"""Hugging Face Space: task-specific expert pruning (uncurl-hf), original vs pruned side by side.

Everything lives in :mod:`uncurl_hf.space` so this Space, `uncurl demo` and the tests run the same code. On first
launch the base model is pruned at factors 2/4/8 on the sentiment task into the cache: the embedded tiny-switch-8, or
the model the ``UNCURL_SPACE_BASE`` variable names (a zoo name such as tiny-qwen3moe-64, a folder or a cached Hub
id), set in the Space's settings so the page can show a decoder base without a code change.
Runs offline: nothing is downloaded from the Hub.
"""

from __future__ import annotations

import logging
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from uncurl_hf.space.app import DEFAULT_ZOO_MODEL, build_demo, default_models, launch_demo  # noqa: E402

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

base, pruned = default_models(os.environ.get("UNCURL_SPACE_BASE") or DEFAULT_ZOO_MODEL, progress=False)
demo = build_demo(str(base), pruned)

if __name__ == "__main__":
    # On Spaces the server must listen on all interfaces; locally GRADIO_SERVER_NAME can say otherwise.
    launch_demo(demo, host=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"))
