"""The Gradio Space: an original and a pruned checkpoint side by side, on one input or on N task examples.

Every number the page shows comes from two plain functions, :func:`compare` (one input) and :func:`compare_batch`
(N test examples), which return JSON-able dicts. The UI (:func:`build_demo`) only formats those dicts, and the
tests call the same functions directly and through ``gradio_client``, so "what the page shows" and "what the
Python API returns" cannot drift apart. ``spaces/app.py``, ``uncurl demo`` (:func:`launch`) and the tests all build the
page with :func:`build_demo` and serve it with :func:`launch_demo`.

Everything works offline: a model is a local folder, a zoo name, or a Hub id that is already in the local Hugging
Face cache (never downloaded). Gradio and matplotlib are imported lazily, so :func:`compare` runs without them.
"""

from __future__ import annotations

import hashlib
import html
import logging
import os
import statistics
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported anywhere: no phoning home

import torch  # noqa: E402

from uncurl_hf.calibration.run import build_batches, calibrate  # noqa: E402
from uncurl_hf.io.checkpoint import count_parameters, load_model, load_tokenizer, weights_size  # noqa: E402
from uncurl_hf.errors import ModelNotFoundError, RequestTimeoutError, SpaceInputError, UncurlError  # noqa: E402
from uncurl_hf.evaluation.scoring import label_logprobs  # noqa: E402
from uncurl_hf.families import get_family  # noqa: E402
from uncurl_hf.plan import PLAN_FILENAME, PruningPlan  # noqa: E402
from uncurl_hf.evaluation.tasks import Example, Task, get_task  # noqa: E402

if TYPE_CHECKING:
    import gradio as gr
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

DEFAULT_ZOO_MODEL = "tiny-switch-8"
DEFAULT_TASK = "sentiment"
DEFAULT_METHOD = "frequency"
DEFAULT_FACTORS: tuple[float, ...] = (2, 4, 8)
MAX_INPUT_CHARS = 1000
MAX_BATCH = 200
DEFAULT_BATCH = 32
LATENCY_REPEATS = 3
MAX_NEW_TOKENS = 8
MODEL_CACHE_SIZE = 6
REQUEST_TIMEOUT_S = 60.0  # processing budget of one request (Compare or Batch), after it leaves the queue
MAX_QUEUE = 64  # requests waiting beyond this are refused at once by Gradio ("queue is full"), not kept forever

EMPTY_INPUT_MESSAGE = "The input is empty: type a sentence or pick one of the examples below."

T = TypeVar("T")




@dataclass
class Deadline:
    """The time budget of one request, checked between model runs (Python cannot interrupt a running forward).

    A budget of ``None`` never expires. Checks sit where a request can stop cleanly: after loading models, before
    each model run, between batch examples; ``generate`` gets the remaining time as ``max_time``. A single forward
    of the largest input is far shorter than any sensible budget, so the overrun past the budget is one forward.
    """

    seconds: float | None
    start: float = field(default_factory=time.perf_counter)

    def remaining(self) -> float | None:
        return None if self.seconds is None else self.seconds - (time.perf_counter() - self.start)

    def check(self, stage: str) -> None:
        left = self.remaining()
        if left is not None and left <= 0:
            raise RequestTimeoutError(
                f"The request took longer than its {self.seconds:g} s limit and was stopped ({stage}). Try a shorter "
                "input or fewer examples, or start the demo with a larger --request-timeout."
            )


def too_long_message(length: int) -> str:
    return (
        f"The input is {length} characters long; the limit is {MAX_INPUT_CHARS} characters. "
        "Shorten it: the cap keeps one request from tying up the shared CPU."
    )


def check_text(text: str | None) -> str:
    """The stripped input, or :class:`SpaceInputError` with the message the page shows (empty / too long)."""
    stripped = (text or "").strip()
    if not stripped:
        raise SpaceInputError(EMPTY_INPUT_MESSAGE)
    if len(stripped) > MAX_INPUT_CHARS:
        raise SpaceInputError(too_long_message(len(stripped)))
    return stripped


def check_batch_size(n: float | int | None) -> int:
    """``n`` as an int in ``[1, MAX_BATCH]``, or :class:`SpaceInputError`: a batch run must stay interactive."""
    try:
        value = float(n)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        value = float("nan")
    if not value.is_integer() or not 1 <= value <= MAX_BATCH:
        raise SpaceInputError(f"The number of examples must be a whole number from 1 to {MAX_BATCH}; got {n!r}.")
    return int(value)


# --------------------------------------------------------------------------------------------------------------
# Models: resolution (offline) and a small in-process cache, so a click does not reload weights.


def resolve_model(ref: str | Path) -> Path:
    """A local checkpoint folder for ``ref``: an existing folder, a built zoo model, or a Hub id already cached.

    Never downloads: the demo must work with no network, so a Hub id that is not in the local cache is an error
    that says how to get it there.
    """
    text = str(ref).strip()
    if not text:
        raise SpaceInputError("No model given: pick one from the list or type a local folder path.")
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"{path} is a file; give the checkpoint folder that contains it.")
        return path.resolve()
    from uncurl_hf.zoo import registry

    if text in registry.available_models():
        return registry.zoo_path(text, build_if_missing=False)
    from uncurl_hf.cards.model_card import is_hub_id

    if is_hub_id(text):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(snapshot_download(text, local_files_only=True))
        except LocalEntryNotFoundError:
            raise ModelNotFoundError(
                f"{text} is not in the local Hugging Face cache, and this demo never downloads (it runs offline). "
                f"Download it first on a machine with network (`hf download {text}`) or give a local folder."
            ) from None
    raise ModelNotFoundError(
        f"Model {text!r} is neither an existing folder, a zoo model ({', '.join(registry.available_models())}) "
        "nor a Hub id (namespace/name); give a local checkpoint folder."
    )


@dataclass
class LoadedModel:
    """A checkpoint in memory with the facts the page shows about it."""

    path: Path
    model: Any
    tokenizer: Any
    params: int
    disk_mb: float
    experts: dict[str, int]
    plan: PruningPlan | None

    def layer_groups(self, layer: str) -> tuple[list[list[int]], int] | None:
        """``(groups of original experts per output expert, original count)`` from the plan, when there is one."""
        if self.plan is None:
            return None
        try:
            layer_plan = self.plan.layer(layer)
        except KeyError:  # a plan for other layer names (e.g. of a different model) gives no mapping
            return None
        return layer_plan.groups, layer_plan.num_experts


_models: OrderedDict[str, LoadedModel] = OrderedDict()
_models_lock = threading.Lock()
# One model run at a time: latencies are only comparable when the two models do not compete for the CPU.
_run_lock = threading.Lock()


def get_model(ref: str | Path) -> LoadedModel:
    """Load (or reuse) the checkpoint ``ref``; keeps the last :data:`MODEL_CACHE_SIZE` models in memory."""
    path = resolve_model(ref)
    key = str(path)
    with _models_lock:
        if key in _models:
            _models.move_to_end(key)
            return _models[key]
    model = load_model(path)
    tokenizer = load_tokenizer(path)
    family = get_family(model)
    plan_file = path / PLAN_FILENAME
    loaded = LoadedModel(
        path=path,
        model=model,
        tokenizer=tokenizer,
        params=count_parameters(model),
        disk_mb=round(weights_size(path) / 1e6, 3),
        experts=family.layer_sizes(model),
        plan=PruningPlan.load(plan_file) if plan_file.is_file() else None,
    )
    with _models_lock:
        _models[key] = loaded
        while len(_models) > MODEL_CACHE_SIZE:
            _models.popitem(last=False)
    return loaded


def clear_model_cache() -> None:
    """Forget loaded models (e.g. after a checkpoint folder was rewritten)."""
    with _models_lock:
        _models.clear()


# --------------------------------------------------------------------------------------------------------------
# The two functions behind the page.


@dataclass
class SideResult:
    """One model's answer to one input (``compare()['original']`` / ``['pruned']``)."""

    model: str
    label: str
    probabilities: dict[str, float]
    generated: str
    latency_ms: float
    generate_ms: float
    new_tokens: int
    tokens_per_s: float
    input_tokens: int
    params: int
    disk_mb: float
    experts: dict[str, int]
    expert_usage: dict[str, dict[str, Any]]


def _timed(fn: Callable[[], T], repeats: int | None = None, warmup: int = 1) -> tuple[T, float]:
    """``fn()``'s result and its median wall time in ms over ``repeats`` runs after ``warmup`` runs.

    The median of a few runs (default :data:`LATENCY_REPEATS`), not one run: on a shared CPU a single timing of
    a ~ms call is mostly noise.
    """
    repeats = LATENCY_REPEATS if repeats is None else repeats
    for _ in range(warmup):
        fn()
    times = []
    result: T
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - start) * 1000)
    return result, statistics.median(times)


def model_input(task: Task, text: str) -> str:
    """The model's input for user text: the task prefix is added unless the text already starts with it."""
    text = text.strip()
    if task.prefix and text.lower().startswith(task.prefix.strip().lower()):
        return text
    return task.format(text)


def display_text(task: Task, source: str) -> str:
    """A task example as a user would type it (without the task prefix)."""
    if task.prefix and source.startswith(task.prefix):
        return source[len(task.prefix) :]
    return source


def expert_usage(loaded: LoadedModel, source: str, target: str, max_length: int) -> dict[str, dict[str, Any]]:
    """Per sparse layer: how many of this input's tokens the router sent to each expert.

    Encoder layers see the input tokens; decoder layers see the (teacher-forced) ``target`` tokens, here the
    model's own predicted label. Uses the same hooks as calibration, so it shows exactly what pruning saw.
    """
    family = get_family(loaded.model)
    batches = build_batches([Example(source, target)], loaded.tokenizer, batch_size=1, max_length=max_length)
    stats = calibrate(loaded.model, family, batches, max_logit_samples=1, progress=False)
    usage: dict[str, dict[str, Any]] = {}
    for name, layer_stats in stats.items():
        mapping = loaded.layer_groups(name)
        usage[name] = {
            "tokens": int(layer_stats.num_tokens),
            "counts": [int(c) for c in layer_stats.counts.tolist()],
            "groups": mapping[0] if mapping else None,
            "source_experts": mapping[1] if mapping else None,
        }
    return usage


@torch.no_grad()
def _run_side(loaded: LoadedModel, task: Task, source: str, deadline: Deadline | None = None) -> SideResult:
    deadline = deadline or Deadline(None)
    tokenizer, model = loaded.tokenizer, loaded.model
    deadline.check(f"before scoring with {loaded.path.name}")
    scores, latency_ms = _timed(lambda: label_logprobs(model, tokenizer, [source], task.labels, task.max_source_tokens))
    probs = torch.softmax(scores[0].float(), dim=-1).tolist()
    label = task.labels[int(torch.tensor(probs).argmax())]
    enc = tokenizer(source, truncation=True, max_length=task.max_source_tokens, return_tensors="pt")
    deadline.check(f"before generating with {loaded.path.name}")
    left = deadline.remaining()
    budget = {} if left is None else {"max_time": max(left, 1e-3) / (LATENCY_REPEATS + 1)}
    output, generate_ms = _timed(
        lambda: model.generate(**enc, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, num_beams=1, **budget)
    )
    deadline.check(f"after generating with {loaded.path.name}")
    new = output[0, 1:]  # drop the decoder start token; with one sequence every later position was generated
    new_tokens = int(new.numel())
    return SideResult(
        model=str(loaded.path),
        label=label,
        probabilities={lab: round(float(p), 6) for lab, p in zip(task.labels, probs)},
        generated=tokenizer.decode(new, skip_special_tokens=True).strip(),
        latency_ms=round(latency_ms, 3),
        generate_ms=round(generate_ms, 3),
        new_tokens=new_tokens,
        tokens_per_s=round(new_tokens / (generate_ms / 1000), 1) if generate_ms > 0 else 0.0,
        input_tokens=int(enc["input_ids"].shape[1]),
        params=loaded.params,
        disk_mb=loaded.disk_mb,
        experts=loaded.experts,
        expert_usage=expert_usage(loaded, source, label, task.max_source_tokens),
    )


@contextmanager
def _locked(deadline: Deadline) -> Iterator[None]:
    """Hold the model-run lock (one request computes at a time), waiting at most the request's remaining budget."""
    left = deadline.remaining()
    if not _run_lock.acquire(timeout=-1 if left is None else max(left, 0.0)):
        deadline.check("waiting for the models to be free")
        raise RequestTimeoutError("The models stayed busy for the whole request budget; try again in a moment.")
    try:
        yield
    finally:
        _run_lock.release()


def _ratio(after: float, before: float) -> float | None:
    return round(after / before, 4) if before else None


def _classification_task(task: str) -> Task:
    task_obj = get_task(task)
    if not task_obj.labels:
        raise SpaceInputError(f"The demo compares classification tasks; {task!r} is a generation task.")
    return task_obj


def compare(
    text: str, base: str | Path, pruned: str | Path, task: str = DEFAULT_TASK, timeout: float | None = None
) -> dict[str, Any]:
    """Run ``text`` through the base and the pruned model; everything the Compare tab shows.

    Returns ``{"text", "model_input", "task", "labels", "original": SideResult, "pruned": SideResult, "ratios",
    "agree"}`` (SideResults as dicts). Labels and probabilities come from label scoring (softmax over the labels'
    sequence log-likelihoods, as in evaluation), ``generated`` from greedy ``generate``; ``latency_ms`` is the
    median time to score the labels for this input, ``tokens_per_s`` the generation throughput.
    Raises :class:`SpaceInputError` (empty / too long input), :class:`RequestTimeoutError` when the work takes
    longer than ``timeout`` seconds (``None``: no limit), and the loading errors of :func:`get_model`.
    """
    deadline = Deadline(timeout)
    text = check_text(text)
    task_obj = _classification_task(task)
    source = model_input(task_obj, text)
    original_model, pruned_model = get_model(base), get_model(pruned)
    with _locked(deadline):
        original = _run_side(original_model, task_obj, source, deadline)
        reduced = _run_side(pruned_model, task_obj, source, deadline)
    return {
        "text": text,
        "model_input": source,
        "task": task_obj.name,
        "labels": list(task_obj.labels),
        "original": asdict(original),
        "pruned": asdict(reduced),
        "ratios": {
            "params": _ratio(reduced.params, original.params),
            "disk_mb": _ratio(reduced.disk_mb, original.disk_mb),
            "latency_ms": _ratio(reduced.latency_ms, original.latency_ms),
            "tokens_per_s": _ratio(reduced.tokens_per_s, original.tokens_per_s),
        },
        "agree": original.label == reduced.label,
    }


def compare_batch(
    n: int, base: str | Path, pruned: str | Path, task: str = DEFAULT_TASK, timeout: float | None = None
) -> dict[str, Any]:
    """Score the first ``n`` test examples with both models; everything the Batch tab shows.

    Returns ``{"task", "split", "n", "metric", "scores": {original, pruned}, "agreement" (0..1),
    "latency_ms": {original: [...], pruned: [...]} (per example, batch 1), "median_latency_ms", "rows"}``.
    Examples run one at a time, alternating models, so both see the same background load. Raises
    :class:`RequestTimeoutError` when the batch takes longer than ``timeout`` seconds (checked between examples).
    """
    from uncurl_hf.evaluation.metrics import load_metric

    deadline = Deadline(timeout)
    count = check_batch_size(n)
    task_obj = _classification_task(task)
    examples = task_obj.load_split("test")[:count]
    models = {"original": get_model(base), "pruned": get_model(pruned)}
    preds: dict[str, list[str]] = {side: [] for side in models}
    latency: dict[str, list[float]] = {side: [] for side in models}
    with _locked(deadline), torch.no_grad():
        for side, loaded in models.items():  # warm-up: first calls allocate and are not representative
            label_logprobs(loaded.model, loaded.tokenizer, [examples[0].source], task_obj.labels)
        for index, example in enumerate(examples):
            deadline.check(f"after {index} of {count} examples")
            for side, loaded in models.items():
                scores, ms = _timed(
                    lambda: label_logprobs(
                        loaded.model, loaded.tokenizer, [example.source], task_obj.labels, task_obj.max_source_tokens
                    ),
                    repeats=1,
                    warmup=0,
                )
                preds[side].append(task_obj.labels[int(scores[0].argmax())])
                latency[side].append(round(ms, 3))
    metric = load_metric(task_obj.metric)
    references = [e.target for e in examples]
    scores_by_side = {
        side: float(metric.compute(predictions=p, references=references)[task_obj.metric]) for side, p in preds.items()
    }
    agreement = sum(a == b for a, b in zip(preds["original"], preds["pruned"])) / count
    return {
        "task": task_obj.name,
        "split": "test",
        "n": count,
        "metric": task_obj.metric,
        "scores": scores_by_side,
        "agreement": agreement,
        "latency_ms": latency,
        "median_latency_ms": {side: round(statistics.median(v), 3) for side, v in latency.items()},
        "rows": [
            {"text": display_text(task_obj, e.source), "gold": e.target, "original": a, "pruned": b}
            for e, a, b in zip(examples, preds["original"], preds["pruned"])
        ],
    }


# --------------------------------------------------------------------------------------------------------------
# Figures (matplotlib's object API: no pyplot global state, safe in the server's worker threads).


def _usage_matrix(result: Mapping[str, Any], side: str, layers: list[str], width: int) -> list[list[float]]:
    """Share of each layer's tokens per column; columns are original expert ids where the plan maps them."""
    nan = float("nan")
    rows = []
    for layer in layers:
        usage = result[side]["expert_usage"].get(layer)
        row = [nan] * width
        if usage is not None:
            tokens = max(1, usage["tokens"])
            groups = usage["groups"]
            use_plan = side == "pruned" and groups is not None and usage["source_experts"] == width
            for j, count in enumerate(usage["counts"]):
                column = groups[j][0] if use_plan else j
                if column < width:
                    row[column] = count / tokens
        rows.append(row)
    return rows


def expert_usage_figure(result: Mapping[str, Any]) -> "Figure":
    """Heatmaps (layer x expert) of where this input's tokens were routed, original vs pruned.

    Pruned columns sit at the original expert id that survived (the anchor of a merged group), so a reader sees
    which experts the input used before and what is left of them after; grey cells are experts that do not exist.
    """
    from matplotlib.figure import Figure

    layers = list(result["original"]["expert_usage"])
    for layer in result["pruned"]["expert_usage"]:
        if layer not in layers:
            layers.append(layer)
    width = max([*result["original"]["experts"].values(), *result["pruned"]["experts"].values(), 1])
    fig = Figure(figsize=(max(6.0, 1.1 * width + 2), 0.45 * len(layers) + 1.8), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    image = None
    for ax, side, title in zip(axes, ("original", "pruned"), ("original", "pruned")):
        matrix = _usage_matrix(result, side, layers, width)
        image = ax.imshow(matrix, cmap=_colormap(), vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_title(f"{title} ({sum(result[side]['experts'].values())} experts)", fontsize=10)
        ax.set_xticks(range(width))
        ax.set_xlabel("expert (original id)")
        ax.set_yticks(range(len(layers)), layers, fontsize=8)
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                if value == value and value > 0:  # not NaN
                    ax.text(j, i, f"{value:.0%}", ha="center", va="center", fontsize=7,
                            color="white" if value > 0.5 else "black")
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="share of the layer's tokens")
    fig.suptitle("Experts this input's tokens were routed to, per layer (grey: expert removed by pruning)",
                 fontsize=10)
    return fig


def _colormap() -> Any:
    from matplotlib import colormaps

    return colormaps["viridis"].with_extremes(bad="#d9d9d9")


def latency_figure(batch: Mapping[str, Any]) -> "Figure":
    """Histogram of per-example latencies of both models on shared bins, with their medians."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7, 3.2), layout="constrained")
    ax = fig.subplots()
    values = batch["latency_ms"]
    everything = [v for side in values.values() for v in side]
    low, high = min(everything), max(everything)
    bins = [low + (high - low) * i / 20 for i in range(21)] if high > low else 10
    for side, color in (("original", "#1f77b4"), ("pruned", "#ff7f0e")):
        median = batch["median_latency_ms"][side]
        ax.hist(values[side], bins=bins, alpha=0.55, color=color, label=f"{side} (median {median:.2f} ms)")
        ax.axvline(median, color=color, linestyle="--")
    ax.set_xlabel("ms per example (batch 1)")
    ax.set_ylabel("examples")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    return fig


# --------------------------------------------------------------------------------------------------------------
# Formatting (pure, so tests can rebuild what the page must show from compare()'s dict).


def format_probability(p: float) -> str:
    return f"{p:.4f}"


def side_html(side: Mapping[str, Any], title: str) -> str:
    """One model's card: predicted label, probabilities, generated text, latency, tokens/s, size."""
    e = html.escape
    probs = "".join(
        f'<li><span class="prob-label">{e(label)}</span>: <span class="prob">{format_probability(p)}</span></li>'
        for label, p in side["probabilities"].items()
    )
    return (
        f'<div class="uncurl-side"><h3>{e(title)}</h3>'
        f'<p>prediction: <b class="pred-label">{e(side["label"])}</b></p>'
        f'<ul class="probs">{probs}</ul>'
        f'<p>generate: <code class="generated">{e(side["generated"]) or "(empty)"}</code></p>'
        f'<p>latency: <span class="latency">{side["latency_ms"]:.2f} ms</span> per example · '
        f'<span class="tokens-per-s">{side["tokens_per_s"]:.1f} tokens/s</span> generating</p>'
        f'<p class="size">{side["params"]:,} parameters · {side["disk_mb"]:.2f} MB on disk · '
        f'{sum(side["experts"].values())} experts</p>'
        f'<p class="path"><small>{e(side["model"])}</small></p></div>'
    )


def _fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def ratios_html(result: Mapping[str, Any]) -> str:
    """Original vs pruned table with the pruned/original ratio of each number."""
    a, b, r = result["original"], result["pruned"], result["ratios"]
    rows = [
        ("parameters", f"{a['params']:,}", f"{b['params']:,}", _fmt_ratio(r["params"])),
        ("weights on disk (MB)", f"{a['disk_mb']:.2f}", f"{b['disk_mb']:.2f}", _fmt_ratio(r["disk_mb"])),
        ("latency (ms / example)", f"{a['latency_ms']:.2f}", f"{b['latency_ms']:.2f}", _fmt_ratio(r["latency_ms"])),
        ("generate (tokens / s)", f"{a['tokens_per_s']:.1f}", f"{b['tokens_per_s']:.1f}",
         _fmt_ratio(r["tokens_per_s"])),
        ("experts (all layers)", str(sum(a["experts"].values())), str(sum(b["experts"].values())),
         _fmt_ratio(_ratio(sum(b["experts"].values()), sum(a["experts"].values())))),
    ]
    body = "".join(f"<tr><td>{n}</td><td>{x}</td><td>{y}</td><td>{z}</td></tr>" for n, x, y, z in rows)
    agree = "the models agree" if result["agree"] else "the models disagree"
    return (
        '<table class="uncurl-ratios"><thead><tr><th></th><th>original</th><th>pruned</th>'
        f"<th>pruned / original</th></tr></thead><tbody>{body}</tbody></table><p>{agree}</p>"
    )


def batch_html(batch: Mapping[str, Any]) -> str:
    """Agreement, the task metric of each model and median latencies of a batch run."""
    s, m, name = batch["scores"], batch["median_latency_ms"], html.escape(batch["metric"])
    return (
        f'<p><b class="agreement">{batch["agreement"]:.1%}</b> agreement on {batch["n"]} {html.escape(batch["task"])} '
        f"test examples</p>"
        '<table class="uncurl-batch"><thead><tr><th></th><th>original</th><th>pruned</th></tr></thead><tbody>'
        f'<tr><td>{name}</td><td class="score-original">{s["original"]:.4f}</td>'
        f'<td class="score-pruned">{s["pruned"]:.4f}</td></tr>'
        f"<tr><td>median ms / example</td><td>{m['original']:.2f}</td><td>{m['pruned']:.2f}</td></tr>"
        "</tbody></table>"
    )


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, UncurlError):
        return f"⚠️ {exc}"
    logger.exception("demo request failed")
    return f"⚠️ Unexpected error: {type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------------------------------------------
# The page.

INTRO = """# uncurl-hf: original vs pruned
Task-specific expert pruning of a sparse mixture-of-experts model, compared side by side on the **{task}** task.
Pick a base model and a pruned checkpoint (a listed one, a local folder, or a Hub id already in the local cache),
type a sentence or pick an example, and press **Compare**. Inputs are limited to {limit} characters."""


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
    task_obj = _classification_task(task)
    examples = [[display_text(task_obj, e.source)] for e in task_obj.load_split("test")[:num_examples]]

    def ui_compare(text: str, base_ref: str, pruned_ref: str) -> tuple[Any, ...]:
        try:
            start = time.perf_counter()
            result = compare(text, base_ref, pruned_ref, task, timeout=request_timeout)
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

    def api_compare(text: str, base: str, pruned: str) -> dict:
        """Compare one input (the Python `uncurl_hf.space.app.compare` result)."""
        try:
            return compare(text, base, pruned, task, timeout=request_timeout)
        except UncurlError as exc:
            raise gr.Error(str(exc)) from exc

    def api_compare_batch(n: int, base: str, pruned: str) -> dict:
        """Compare the first n test examples (the Python `uncurl_hf.space.app.compare_batch` result)."""
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
            button.click(ui_compare, [text, base_box, pruned_box], outputs, api_name="compare", concurrency_id="models",
                         show_progress_on=progress_on)
            text.submit(ui_compare, [text, base_box, pruned_box], outputs, api_visibility="private",
                        concurrency_id="models", show_progress_on=progress_on)
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


# --------------------------------------------------------------------------------------------------------------
# Default models and launching.


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
    from uncurl_hf.pipeline.prune import prune
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
            prune(str(base_path), output_dir=folder, factor=factor, method=method, task=task, overwrite=True,
                  num_calibration_examples=num_calibration_examples, progress=progress)
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
