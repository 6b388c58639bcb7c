"""Write docs/space.png: the Space comparing the zoo model with its pruned copy, as shown in headless Chromium.

Run by hand once the zoo model exists (it prunes x2/x4/x8 into the cache on first use, like the Space):

    nice -n 15 env OMP_NUM_THREADS=1 python scripts/space_screenshot.py [--out docs/space.png]

``--base DIR --pruned DIR`` photographs other checkpoints instead. Needs Debian's chromium
(``bash scripts/install_browser.sh``) and the test extra (playwright).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the shared Playwright helpers live beside the browser tests

from browser import chromium_page, open_app, run_compare  # noqa: E402

from uncurl_hf.io.resolve import resolve_model  # noqa: E402
from uncurl_hf.space.app import DEFAULT_ZOO_MODEL, build_demo, default_models, launch_demo  # noqa: E402
from uncurl_hf.space.comparison import DEFAULT_TASK, display_text  # noqa: E402
from uncurl_hf.evaluation.tasks import get_task  # noqa: E402

logger = logging.getLogger("space_screenshot")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "space.png"), help="PNG to write")
    parser.add_argument("--base", default=DEFAULT_ZOO_MODEL, help="base model (zoo name or folder)")
    parser.add_argument("--pruned", help="pruned folder (default: the base pruned x4 with frequency, cached)")
    parser.add_argument("--example", type=int, default=1, help="index of the sentiment test example to type")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.pruned:
        base = resolve_model(args.base)
        choices: dict[str, str] = {Path(args.pruned).name: str(resolve_model(args.pruned))}
    else:
        base, all_choices = default_models(args.base, factors=(4,))
        choices = all_choices
    task = get_task(DEFAULT_TASK)
    text = display_text(task, task.load_split("test")[args.example].source)
    demo = build_demo(str(base), choices)
    url = launch_demo(demo, prevent_thread_lock=True, quiet=True)
    try:
        with chromium_page(width=1280, height=1000) as page:
            open_app(page, url)
            shown = run_compare(page, text)
            logger.info("page shows %s", shown)
            page.locator("#heatmap img").first.wait_for(state="visible")
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
            logger.info("wrote %s", out)
    finally:
        demo.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
