"""The Gradio Space (uncurl_hf/space/): the pure functions, the running server through gradio_client, and the page
in a real browser (Debian's Chromium through Playwright), on tiny random models so nothing waits for the zoo model.

Browser tests check that what the page shows equals what :func:`uncurl_hf.space.comparison.compare` returns for the
same input.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any

import pytest
from browser import RESULT_TIMEOUT_MS, chromium_page, chromium_path, open_app, run_compare

from uncurl_hf.errors import ModelNotFoundError, RequestTimeoutError, SpaceInputError
from uncurl_hf.io.resolve import resolve_model
from uncurl_hf.space import app, comparison
from uncurl_hf.space.app import build_demo, default_models, launch_demo
from uncurl_hf.space.comparison import compare, compare_batch, display_text, model_input
from uncurl_hf.space.limits import (
    EMPTY_INPUT_MESSAGE,
    MAX_BATCH,
    MAX_INPUT_CHARS,
    check_batch_size,
    check_text,
    too_long_message,
)
from uncurl_hf.space.render import expert_usage_figure, format_probability, latency_figure, side_html
from helpers import prune_flat
from uncurl_hf.evaluation.tasks import get_task

REPO = Path(__file__).resolve().parents[1]
LATENCY = re.compile(r"^\d+\.\d{2} ms$")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stable(side: dict[str, Any]) -> dict[str, Any]:
    """The parts of one model's result that do not depend on timing."""
    keys = ("model", "label", "probabilities", "generated", "new_tokens", "input_tokens", "params", "disk_mb",
            "experts", "expert_usage")
    return {key: side[key] for key in keys}


@pytest.fixture(autouse=True)
def _one_timing_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Time each call once instead of taking a median: the tests check values, not speed."""
    monkeypatch.setattr(comparison, "LATENCY_REPEATS", 1)


@pytest.fixture(scope="module")
def models(switch_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny random Switch model and a frequency x2 pruned copy calibrated on the sentiment task."""
    pruned = tmp_path_factory.mktemp("space") / "switch-frequency-x2"
    prune_flat(str(switch_dir), output_dir=pruned, factor=2, method="frequency", task="sentiment",
          num_calibration_examples=16, progress=False)
    return switch_dir, pruned


@pytest.fixture(scope="module")
def example_text() -> str:
    task = get_task("sentiment")
    return display_text(task, task.load_split("test")[0].source)


@pytest.fixture(scope="module")
def app_url(models: tuple[Path, Path]) -> Any:
    base, pruned = models
    demo = build_demo(str(base), {"tiny switch · frequency ×2": str(pruned)}, num_examples=4)
    url = launch_demo(demo, host="127.0.0.1", port=_free_port(), prevent_thread_lock=True, quiet=True)
    yield url
    demo.close()


@pytest.fixture(scope="module")
def page(app_url: str) -> Any:
    if chromium_path() is None:
        pytest.skip("chromium is not on PATH after scripts/install_browser.sh (needs root and apt-get); "
                    "browser tests skipped")
    with chromium_page() as browser_page:
        open_app(browser_page, app_url)
        yield browser_page


# ---------------------------------------------------------------------------------------------- pure functions


def test_input_checks() -> None:
    for empty in ("", "   \n", None):
        with pytest.raises(SpaceInputError, match="The input is empty"):
            check_text(empty)
    assert check_text("  fine  ") == "fine"
    assert check_text("x" * MAX_INPUT_CHARS) == "x" * MAX_INPUT_CHARS
    with pytest.raises(SpaceInputError, match=f"limit is {MAX_INPUT_CHARS} characters"):
        check_text("x" * (MAX_INPUT_CHARS + 1))
    assert check_batch_size(4.0) == 4
    for bad in (0, MAX_BATCH + 1, 2.5, None, "x", float("nan")):
        with pytest.raises(SpaceInputError, match="whole number"):
            check_batch_size(bad)


def test_compare_result(models: tuple[Path, Path], example_text: str) -> None:
    base, pruned = models
    result = compare(example_text, base, pruned)
    task = get_task("sentiment")
    assert result["model_input"] == task.format(example_text)
    assert model_input(task, "Sentiment: " + example_text) == "Sentiment: " + example_text  # no double prefix
    for side in ("original", "pruned"):
        out = result[side]
        assert set(out["probabilities"]) == set(task.labels)
        assert sum(out["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert out["label"] == max(out["probabilities"], key=out["probabilities"].get)
        assert out["latency_ms"] > 0 and out["generate_ms"] > 0 and out["tokens_per_s"] > 0
        assert out["new_tokens"] >= 1 and out["input_tokens"] >= 2
        for layer, usage in out["expert_usage"].items():
            assert len(usage["counts"]) == out["experts"][layer]
            assert sum(usage["counts"]) == usage["tokens"] > 0  # top-1 routing: one expert per token
    assert sum(result["pruned"]["experts"].values()) * 2 == sum(result["original"]["experts"].values())
    assert 0 < result["ratios"]["params"] < 1 and 0 < result["ratios"]["disk_mb"] < 1
    assert result["agree"] == (result["original"]["label"] == result["pruned"]["label"])
    # pruned experts are mapped back to original ids through the plan written beside the weights
    usage = result["pruned"]["expert_usage"]["encoder.block.1"]
    assert usage["source_experts"] == 8 and len(usage["groups"]) == 4
    again = compare(example_text, base, pruned)
    assert _stable(again["original"]) == _stable(result["original"])
    assert _stable(again["pruned"]) == _stable(result["pruned"])
    figure = expert_usage_figure(result)
    assert len(figure.axes) == 3  # original, pruned, colour bar
    html = side_html(result["pruned"], "pruned")
    assert result["pruned"]["label"] in html and "ms" in html and "tokens/s" in html


def test_requests_stop_at_their_time_budget(models: tuple[Path, Path], example_text: str) -> None:
    """A request over its budget stops between model runs with a message naming the fix; a generous budget changes
    nothing, and a timed-out request leaves the models free for the next one."""
    base, pruned = models
    with pytest.raises(RequestTimeoutError, match=r"longer than its 1e-09 s limit .*--request-timeout"):
        compare(example_text, base, pruned, timeout=1e-9)
    with pytest.raises(RequestTimeoutError, match="fewer examples"):
        compare_batch(5, base, pruned, timeout=1e-9)
    generous = compare(example_text, base, pruned, timeout=600)
    unlimited = compare(example_text, base, pruned)
    assert {s: _stable(generous[s]) for s in ("original", "pruned")} == {
        s: _stable(unlimited[s]) for s in ("original", "pruned")
    }


def test_compare_batch(models: tuple[Path, Path]) -> None:
    base, pruned = models
    batch = compare_batch(4, base, pruned)
    assert batch["n"] == 4 and len(batch["rows"]) == 4
    rows = batch["rows"]
    assert batch["agreement"] == sum(r["original"] == r["pruned"] for r in rows) / 4
    for side in ("original", "pruned"):
        assert batch["scores"][side] == sum(r[side] == r["gold"] for r in rows) / 4  # accuracy
        assert len(batch["latency_ms"][side]) == 4 and min(batch["latency_ms"][side]) > 0
    assert latency_figure(batch).axes
    with pytest.raises(SpaceInputError):
        compare_batch(0, base, pruned)


def test_resolve_model_is_offline(models: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from huggingface_hub import constants

    base, _ = models
    assert resolve_model(str(base)) == base.resolve()
    with pytest.raises(ModelNotFoundError, match="neither an existing folder"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(ModelNotFoundError, match="No model given"):  # the one resolver (uncurl_hf.io.resolve)
        resolve_model("  ")
    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache"):
        resolve_model("someone/not-cached")
    # a Hub id that is in the cache resolves to its snapshot folder, with no network involved
    repo = cache / "models--someone--tiny-switch"
    snapshot = repo / "snapshots" / ("a" * 40)
    shutil.copytree(base, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    assert resolve_model("someone/tiny-switch") == snapshot


def test_default_models_prunes_once(switch_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "space-cache"
    base, pruned = default_models(str(switch_dir), factors=(4,), cache_root=root, progress=False,
                                        num_calibration_examples=8)
    assert base == switch_dir.resolve() and len(pruned) == 1
    (label, folder), = pruned.items()
    assert "×4" in label and Path(folder).parent == root and (Path(folder) / "config.json").is_file()
    stamp = (Path(folder) / "config.json").stat().st_mtime_ns
    assert default_models(str(switch_dir), factors=(4,), cache_root=root, progress=False)[1] == pruned
    assert (Path(folder) / "config.json").stat().st_mtime_ns == stamp  # reused, not pruned again


def test_cli_demo_forwards_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    from uncurl_hf.cli.main import main

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(app, "launch", lambda **kwargs: calls.append(kwargs))
    assert main(["demo", "--share", "false", "--port", "7999", "--host", "127.0.0.1", "--base", "B",
                 "--pruned", "P1", "--pruned", "P2", "--no-progress"]) == 0
    assert main(["demo", "--request-timeout", "0"]) == 0
    assert calls == [
        {"base": "B", "pruned": ["P1", "P2"], "host": "127.0.0.1", "port": 7999, "share": False, "task": "sentiment",
         "progress": False, "request_timeout": 60.0},
        {"base": "tiny-switch-8", "pruned": None, "host": "127.0.0.1", "port": None, "share": False,
         "task": "sentiment", "progress": True, "request_timeout": None},
    ]
    assert main(["demo", "--share", "maybe"]) == 2


def test_spaces_folder_can_be_pushed() -> None:
    import gradio
    import yaml

    readme = (REPO / "spaces" / "README.md").read_text(encoding="utf-8")
    front = yaml.safe_load(readme.split("---\n")[1])
    assert front["sdk"] == "gradio" and front["sdk_version"] == gradio.__version__
    assert front["app_file"] == "app.py" and (REPO / "spaces" / front["app_file"]).is_file()
    assert front["title"] and front["emoji"] and front["license"] and front["models"]
    requirements = (REPO / "spaces" / "requirements.txt").read_text(encoding="utf-8")
    assert "torch==2.13.0" in requirements and "uncurl-hf[space]" in requirements
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert f'"gradio=={gradio.__version__}"' in pyproject


# ---------------------------------------------------------------------------------------------- running server


def test_gradio_client(app_url: str, models: tuple[Path, Path], example_text: str) -> None:
    from gradio_client import Client

    base, pruned = models
    client = Client(app_url, verbose=False)
    remote = client.predict(example_text, str(base), str(pruned), api_name="/compare_json")
    local = compare(example_text, base, pruned)
    for side in ("original", "pruned"):
        assert _stable(remote[side]) == _stable(local[side])
    with pytest.raises(Exception, match="The input is empty"):
        client.predict("", str(base), str(pruned), api_name="/compare_json")
    batch = client.predict(3, str(base), str(pruned), api_name="/compare_batch_json")
    assert batch["rows"] == compare_batch(3, base, pruned)["rows"]
    status, original_html, *_ = client.predict(example_text, str(base), str(pruned), api_name="/compare")
    assert status.startswith("Compared in") and local["original"]["label"] in original_html
    status, original_html, *_ = client.predict("x" * 1001, str(base), str(pruned), api_name="/compare")
    assert "limit is 1000 characters" in status and original_html == ""


def test_app_enforces_its_request_timeout(models: tuple[Path, Path], example_text: str) -> None:
    """The running app applies build_demo's request_timeout to every endpoint: the page shows the message, the
    JSON API raises it, and the queue stays usable."""
    from gradio_client import Client

    base, pruned = models
    demo = build_demo(str(base), [str(pruned)], num_examples=1, request_timeout=1e-9)
    url = launch_demo(demo, host="127.0.0.1", port=_free_port(), prevent_thread_lock=True, quiet=True)
    try:
        client = Client(url, verbose=False)
        for _ in range(2):
            status, original_html, *_ = client.predict(example_text, str(base), str(pruned), api_name="/compare")
            assert "limit and was stopped" in status and original_html == ""
        with pytest.raises(Exception, match="limit and was stopped"):
            client.predict(3, str(base), str(pruned), api_name="/compare_batch_json")
    finally:
        demo.close()


# ---------------------------------------------------------------------------------------------- real browser


def test_browser_compare_matches_python_api(
    page: Any, models: tuple[Path, Path], example_text: str, tmp_path: Path
) -> None:
    base, pruned = models
    shown = run_compare(page, example_text)
    assert shown["status"].startswith("Compared in"), shown["status"]
    expected = compare(example_text, base, pruned)
    for side in ("original", "pruned"):
        assert shown[side]["label"] == expected[side]["label"]
        assert shown[side]["probabilities"] == {
            label: format_probability(p) for label, p in expected[side]["probabilities"].items()
        }
        assert shown[side]["generated"] == (expected[side]["generated"] or "(empty)")
        assert LATENCY.match(shown[side]["latency"]), shown[side]["latency"]
        assert shown[side]["tokens_per_s"].endswith("tokens/s")
    assert "pruned / original" in page.locator("#ratios").inner_text()
    page.locator("#heatmap img").first.wait_for(state="visible")
    screenshot = tmp_path / "space.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000


def test_browser_input_messages(page: Any) -> None:
    shown = run_compare(page, "")
    assert EMPTY_INPUT_MESSAGE in shown["status"]
    assert shown["original"] is None and shown["pruned"] is None
    shown = run_compare(page, "a fine film. " * 100)
    assert too_long_message(len(("a fine film. " * 100).strip())) in shown["status"]
    assert shown["original"] is None and shown["pruned"] is None


def test_browser_batch_tab(page: Any, models: tuple[Path, Path]) -> None:
    from playwright.sync_api import expect

    base, pruned = models
    page.get_by_role("tab", name="Batch").click()
    number = page.locator("#batch-n input[type=number]")
    number.fill("3")
    number.press("Enter")
    page.click("#batch-button")
    expect(page.locator("#batch-status")).to_contain_text("Ran 3 examples", timeout=RESULT_TIMEOUT_MS)
    expected = compare_batch(3, base, pruned)
    assert page.locator("#batch-summary .agreement").inner_text() == f"{expected['agreement']:.1%}"
    assert page.locator("#batch-summary .score-pruned").inner_text() == f"{expected['scores']['pruned']:.4f}"
    page.locator("#latency-plot img").first.wait_for(state="visible")
    page.get_by_role("tab", name="Compare").click()


def test_concurrent_requests_are_all_answered_correctly(app_url: str, models: tuple[Path, Path]) -> None:
    """Bounded load test on 127.0.0.1: 50 requests in flight at once through gradio_client, queued by the app
    (one model run at a time); every one is answered, and each answer equals the Python API's for its input."""
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client

    from uncurl_hf.evaluation.tasks import get_task

    base, pruned = models
    texts = [e.source.removeprefix("sentiment: ") for e in get_task("sentiment").load_split("test")[:5]]
    expected = {t: {side: _stable(compare(t, base, pruned)[side]) for side in ("original", "pruned")} for t in texts}
    client = Client(app_url, verbose=False)

    def ask(i: int) -> tuple[str, dict[str, Any]]:
        text = texts[i % len(texts)]
        return text, client.submit(text, str(base), str(pruned), api_name="/compare_json").result(timeout=120)

    with ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(ask, range(50)))
    assert len(answers) == 50
    for text, answer in answers:
        assert {side: _stable(answer[side]) for side in ("original", "pruned")} == expected[text]
