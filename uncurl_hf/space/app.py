"""The Gradio Space: an original and a pruned checkpoint side by side, on one input or on N task examples.

Every number the page shows comes from two plain functions, :func:`~uncurl_hf.space.comparison.compare` (one input)
and :func:`~uncurl_hf.space.comparison.compare_batch` (N test examples), which return JSON-able dicts. The UI
(:func:`build_demo`) only formats those dicts (:mod:`uncurl_hf.space.render`), and the tests call the same functions
directly and through ``gradio_client``, so "what the page shows" and "what the Python API returns" cannot drift apart.
``spaces/app.py``, ``uncurl demo`` (:func:`launch`) and the tests all build the page with :func:`build_demo` and serve
it with :func:`launch_demo`.

Everything works offline: a model is a local folder, a zoo name, or a Hub id that is already in the local Hugging
Face cache (never downloaded; :mod:`uncurl_hf.io.resolve`). Gradio and matplotlib are imported lazily, so
:func:`~uncurl_hf.space.comparison.compare` runs without them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported anywhere: no phoning home

from uncurl_hf.errors import UncurlError  # noqa: E402
from uncurl_hf.io.resolve import resolve_model  # noqa: E402
from uncurl_hf.recipe import DEFAULT_METHOD  # noqa: E402  (one default for CLI, recipe and Space)
from uncurl_hf.space.comparison import (  # noqa: E402
    DEFAULT_TASK,
    classification_task,
    compare,
    compare_batch,
    display_text,
)
from uncurl_hf.space.inputs import DEFAULT_PROMPT_FORMAT, PROMPT_FORMAT_HELP, PROMPT_FORMATS  # noqa: E402
from uncurl_hf.space.limits import MAX_BATCH, MAX_INPUT_CHARS, MAX_QUEUE, REQUEST_TIMEOUT_S  # noqa: E402
from uncurl_hf.space.render import (  # noqa: E402
    batch_html,
    expert_usage_figure,
    latency_figure,
    ratios_html,
    side_html,
)

if TYPE_CHECKING:
    import gradio as gr

logger = logging.getLogger(__name__)

DEFAULT_ZOO_MODEL = "tiny-switch-8"
DEFAULT_FACTORS: tuple[float, ...] = (2, 4, 8)
DEFAULT_BATCH = 32


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, UncurlError):
        return f"⚠️ {exc}"
    logger.exception("demo request failed")
    return f"⚠️ Unexpected error: {type(exc).__name__}: {exc}"


INTRO = """# uncurl-hf: original vs pruned
Task-specific expert pruning of a sparse mixture-of-experts model (an encoder-decoder such as Switch Transformers, or a
decoder-only LM such as Mixtral, Qwen-MoE, OLMoE or gpt-oss), compared side by side on the **{task}** task.
Pick a base model and a pruned checkpoint (a listed one, a local folder, or a Hub id already in the local cache),
type a sentence or pick an example, and press **Compare**. Labels are scored as `uncurl eval` scores them (a decoder
through the task's prompt); both models run the same experts kernel. Inputs are limited to {limit} characters."""

PROMPT_INFO = "what generation starts from: " + "; ".join(f"{k}: {v}" for k, v in PROMPT_FORMAT_HELP.items())


def build_demo(
    base: str | Path,
    pruned_choices: Sequence[str | Path] | Mapping[str, str | Path],
    task: str = DEFAULT_TASK,
    num_examples: int = 12,
    request_timeout: float | None = REQUEST_TIMEOUT_S,
    max_queue: int = MAX_QUEUE,
) -> "gr.Blocks":
    """The Blocks app: a Compare tab (one input) and a Batch tab (N test examples), queue enabled.

    ``pruned_choices`` is a list of checkpoint references or a ``{label: reference}`` mapping; the first is
    selected. Both dropdowns also accept a typed folder path or cached Hub id. Every request gets
    ``request_timeout`` seconds of processing (``None``: unlimited) and at most ``max_queue`` wait in the queue.
    """
    import gradio as gr

    if isinstance(pruned_choices, Mapping):
        choices = [(label, str(ref)) for label, ref in pruned_choices.items()]
    else:
        choices = [(str(ref), str(ref)) for ref in pruned_choices]
    if not choices:
        raise UncurlError("The demo needs at least one pruned checkpoint to compare with.")
    task_obj = classification_task(task)
    examples = [[display_text(task_obj, e.source)] for e in task_obj.load_split("test")[:num_examples]]

    def ui_compare(
        text: str, base_ref: str, pruned_ref: str, prompt_format: str = DEFAULT_PROMPT_FORMAT
    ) -> tuple[Any, ...]:
        try:
            start = time.perf_counter()
            result = compare(text, base_ref, pruned_ref, task, timeout=request_timeout, prompt_format=prompt_format)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a message on the page, never a crash
            return _error_text(exc), "", "", "", None, None
        status = f"Compared in {time.perf_counter() - start:.2f} s."
        return (
            status,
            side_html(result["original"], "original"),
            side_html(result["pruned"], "pruned"),
            ratios_html(result),
            expert_usage_figure(result),
            result,
        )

    def ui_batch(n: float, base_ref: str, pruned_ref: str) -> tuple[Any, ...]:
        try:
            batch = compare_batch(n, base_ref, pruned_ref, task, timeout=request_timeout)
        except Exception as exc:  # noqa: BLE001
            return _error_text(exc), "", None, None
        rows = [[r["text"], r["gold"], r["original"], r["pruned"]] for r in batch["rows"]]
        return f"Ran {batch['n']} examples.", batch_html(batch), latency_figure(batch), rows

    def api_compare(text: str, base: str, pruned: str, prompt_format: str = DEFAULT_PROMPT_FORMAT) -> dict:
        """Compare one input (the Python `uncurl_hf.space.comparison.compare` result)."""
        try:
            return compare(text, base, pruned, task, timeout=request_timeout, prompt_format=prompt_format)
        except UncurlError as exc:
            raise gr.Error(str(exc)) from exc

    def api_compare_batch(n: int, base: str, pruned: str) -> dict:
        """Compare the first n test examples (the Python `uncurl_hf.space.comparison.compare_batch` result)."""
        try:
            return compare_batch(n, base, pruned, task, timeout=request_timeout)
        except UncurlError as exc:
            raise gr.Error(str(exc)) from exc

    with gr.Blocks(title="uncurl-hf: original vs pruned") as demo:
        gr.Markdown(INTRO.format(task=task_obj.name, limit=MAX_INPUT_CHARS))
        with gr.Row():
            base_box = gr.Dropdown(
                choices=[str(base)], value=str(base), allow_custom_value=True, label="Base model", elem_id="base-model"
            )
            pruned_box = gr.Dropdown(
                choices=choices, value=choices[0][1], allow_custom_value=True, label="Pruned checkpoint",
                elem_id="pruned-model",
            )
        with gr.Tab("Compare"):
            text = gr.Textbox(
                label=f"Input text ({task_obj.name})", info=task_obj.description, lines=3, max_lines=8,
                elem_id="input-text",
                placeholder="e.g. a gorgeous, witty, seductive movie.",
            )
            gr.Examples(examples=examples, inputs=[text], label=f"{task_obj.name} test examples")
            prompt_format = gr.Radio(list(PROMPT_FORMATS), value=DEFAULT_PROMPT_FORMAT, label="Generation prompt",
                                     info=PROMPT_INFO, elem_id="prompt-format")
            button = gr.Button("Compare", variant="primary", elem_id="compare-button")
            status = gr.Markdown(elem_id="status")
            with gr.Row():
                original_out = gr.HTML(elem_id="original-output")
                pruned_out = gr.HTML(elem_id="pruned-output")
            ratios = gr.HTML(elem_id="ratios")
            heatmap = gr.Plot(label="Expert usage", show_label=False, elem_id="heatmap")
            with gr.Accordion("Raw result (JSON)", open=False):
                raw = gr.JSON(elem_id="raw-result")
            outputs = [status, original_out, pruned_out, ratios, heatmap, raw]
            # progress shows on the result cards, so the status line only ever holds a final message
            progress_on = [original_out, pruned_out]
            inputs = [text, base_box, pruned_box, prompt_format]
            button.click(ui_compare, inputs, outputs, api_name="compare", concurrency_id="models",
                         show_progress_on=progress_on)
            text.submit(ui_compare, inputs, outputs, api_visibility="private", concurrency_id="models",
                        show_progress_on=progress_on)
        with gr.Tab("Batch"):
            n = gr.Slider(1, MAX_BATCH, value=DEFAULT_BATCH, step=1, label="test examples", elem_id="batch-n")
            batch_button = gr.Button("Run batch", variant="primary", elem_id="batch-button")
            batch_status = gr.Markdown(elem_id="batch-status")
            summary = gr.HTML(elem_id="batch-summary")
            plot = gr.Plot(label="Latency distribution", elem_id="latency-plot")
            table = gr.Dataframe(headers=["text", "gold", "original", "pruned"], label="Predictions", wrap=True)
            batch_button.click(ui_batch, [n, base_box, pruned_box], [batch_status, summary, plot, table],
                               api_name="batch", concurrency_id="models", show_progress_on=[summary, plot])
        gr.api(api_compare, api_name="compare_json", concurrency_id="models")
        gr.api(api_compare_batch, api_name="compare_batch_json", concurrency_id="models")
    demo.queue(default_concurrency_limit=1, max_size=max_queue)
    return demo


def _fingerprint(folder: Path) -> str:
    """Short content digest of a checkpoint, so pruned defaults are rebuilt when the base model changes."""
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for file in sorted(folder.glob("*.safetensors")):
        digest.update(f"{file.name}:{file.stat().st_size}".encode())
        with file.open("rb") as handle:
            digest.update(handle.read(1 << 20))
    return digest.hexdigest()[:10]


def default_models(
    base: str | Path = DEFAULT_ZOO_MODEL,
    factors: Sequence[float] = DEFAULT_FACTORS,
    method: str = DEFAULT_METHOD,
    task: str = DEFAULT_TASK,
    progress: bool = True,
    cache_root: str | Path | None = None,
    num_calibration_examples: int = 256,
) -> tuple[Path, dict[str, str]]:
    """The base folder and ``{label: folder}`` of its pruned versions, pruning the missing ones into the cache.

    The zoo model is built if it is missing (a one-off training run). Pruned versions go to
    ``<cache_root or cache_dir()/space>/<name>-<fingerprint>-<task>-<method>-x<factor>``, keyed by the base's
    content so a rebuilt base never pairs with stale pruned copies.
    """
    from uncurl_hf.options import RunOptions
    from uncurl_hf.pipeline.prune import prune
    from uncurl_hf.recipe import CalibrationSpec, PruneRecipe
    from uncurl_hf.zoo import registry, sources

    ref = str(base)
    if ref in registry.available_models() and not Path(ref).exists():
        base_path = registry.zoo_path(ref, build_if_missing=True, progress=progress)
    else:
        base_path = resolve_model(ref)
    stamp = _fingerprint(base_path)
    root = Path(cache_root) if cache_root is not None else sources.cache_dir() / "space"
    pruned: dict[str, str] = {}
    for factor in factors:
        folder = root / f"{base_path.name}-{stamp}-{task}-{method}-x{factor:g}"
        if not ((folder / "config.json").is_file() and any(folder.glob("*.safetensors"))):
            logger.info("pruning %s x%g with %s on %s into %s (first launch only)",
                        base_path, factor, method, task, folder)
            recipe = PruneRecipe(method=method, factor=factor,
                                 calibration=CalibrationSpec(task=task, num_examples=num_calibration_examples))
            prune(str(base_path), recipe, folder, RunOptions(overwrite=True, progress=progress))
        pruned[f"{base_path.name} · {method} ×{factor:g}"] = str(folder)
    return base_path, pruned


def launch_demo(
    demo: "gr.Blocks",
    host: str = "127.0.0.1",
    port: int | None = None,
    share: bool = False,
    prevent_thread_lock: bool = False,
    quiet: bool = False,
) -> str:
    """Start the server (queue already on); returns the local URL. Blocks unless ``prevent_thread_lock``."""
    _, local_url, _ = demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        prevent_thread_lock=prevent_thread_lock,
        quiet=quiet,
        show_error=True,
        footer_links=["api", "settings"],
    )
    return str(local_url)


def launch(
    base: str | Path | None = None,
    pruned: Sequence[str | Path] | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    share: bool = False,
    task: str = DEFAULT_TASK,
    progress: bool = True,
    request_timeout: float | None = REQUEST_TIMEOUT_S,
) -> None:
    """``uncurl demo``: with no ``pruned`` list, prune ``base`` (default: the zoo model) at factors 2/4/8 first."""
    if pruned:
        base_path = resolve_model(base or DEFAULT_ZOO_MODEL)
        choices: Sequence[str | Path] | Mapping[str, str] = [str(resolve_model(p)) for p in pruned]
    else:
        base_path, choices = default_models(base or DEFAULT_ZOO_MODEL, task=task, progress=progress)
    demo = build_demo(str(base_path), choices, task=task, request_timeout=request_timeout)
    launch_demo(demo, host=host, port=port, share=share)
