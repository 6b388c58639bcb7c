"""Hugging Face Space: task-specific expert pruning (uncurl-hf), original vs pruned side by side.

Everything lives in :mod:`uncurl_hf.space` so this Space, `uncurl demo` and the tests run the same code. On first
launch the embedded zoo model (tiny-switch-8) is pruned at factors 2/4/8 on the sentiment task into the cache.
Runs offline: nothing is downloaded from the Hub.
"""

from __future__ import annotations

import logging
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from uncurl_hf.space.app import build_demo, default_models, launch_demo  # noqa: E402

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

base, pruned = default_models(progress=False)
demo = build_demo(str(base), pruned)

if __name__ == "__main__":
    # On Spaces the server must listen on all interfaces; locally GRADIO_SERVER_NAME can say otherwise.
    launch_demo(demo, host=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"))
