"""What the page draws and prints from :func:`~uncurl_hf.space.comparison.compare`'s and
:func:`~uncurl_hf.space.comparison.compare_batch`'s dicts: HTML cards and tables (pure, so tests can rebuild what the
page must show) and figures (matplotlib's object API: no pyplot global state, safe in the server's worker threads).
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from uncurl_hf.space.comparison import ratio

if TYPE_CHECKING:
    from matplotlib.figure import Figure


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


MAX_ANNOTATED_EXPERTS = 16  # beyond this many columns, cell percentages would overlap: colour alone tells
MAX_FIGURE_INCHES = 16.0  # a 64- or 128-expert decoder must still fit the page


def _expert_ticks(width: int) -> list[int]:
    """Every expert id up to 16 columns, else about 16 evenly spaced ones (always including 0)."""
    step = 1 if width <= MAX_ANNOTATED_EXPERTS else -(-width // MAX_ANNOTATED_EXPERTS)
    return list(range(0, width, step))


def expert_usage_figure(result: Mapping[str, Any]) -> "Figure":
    """Heatmaps (layer x expert) of where this input's tokens were routed, original vs pruned.

    Pruned columns sit at the original expert id that survived (the anchor of a merged group), so a reader sees
    which experts the input used before and what is left of them after; grey cells are experts that do not exist.
    With top-k routing a token counts in each of its k experts, so a row's shares sum to k. The figure stays within
    :data:`MAX_FIGURE_INCHES` whatever the expert count (Switch's 8 or a decoder's 64+); cells are annotated only up
    to :data:`MAX_ANNOTATED_EXPERTS` columns.
    """
    from matplotlib.figure import Figure

    layers = list(result["original"]["expert_usage"])
    for layer in result["pruned"]["expert_usage"]:
        if layer not in layers:
            layers.append(layer)
    width = max([*result["original"]["experts"].values(), *result["pruned"]["experts"].values(), 1])
    annotate = width <= MAX_ANNOTATED_EXPERTS
    inches = min(MAX_FIGURE_INCHES, max(6.0, (1.1 if annotate else 0.2) * width + 2))
    fig = Figure(figsize=(inches, 0.45 * len(layers) + 1.8), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    image = None
    matrices = {side: _usage_matrix(result, side, layers, width) for side in ("original", "pruned")}
    # top-k routing spreads a layer's tokens over k experts: scale colours to the largest share, not to 1
    top = max([v for m in matrices.values() for row in m for v in row if v == v] + [0.0])
    vmax = 1.0 if top > 0.5 else max(top, 0.05)
    for ax, side in zip(axes, ("original", "pruned")):
        matrix = matrices[side]
        image = ax.imshow(matrix, cmap=_colormap(), vmin=0.0, vmax=vmax, aspect="auto", interpolation="nearest")
        ax.set_title(f"{side} ({sum(result[side]['experts'].values())} experts)", fontsize=10)
        ax.set_xticks(_expert_ticks(width))
        ax.set_xlabel("expert (original id)")
        ax.set_yticks(range(len(layers)), layers, fontsize=8)
        for i, row in enumerate(matrix if annotate else []):
            for j, value in enumerate(row):
                if value == value and value > 0:  # not NaN
                    ax.text(j, i, f"{value:.0%}", ha="center", va="center", fontsize=7,
                            color="black" if value > 0.5 * vmax else "white")  # viridis: light when high
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="share of the layer's tokens")
    fig.suptitle(_usage_title(result), fontsize=10)
    return fig


def _usage_title(result: Mapping[str, Any]) -> str:
    top_k = {usage.get("top_k", 1) for usage in result["original"]["expert_usage"].values()}
    routed = "" if top_k <= {1} else f" (top-{max(top_k)}: each token counts in each of its experts)"
    return f"Experts this input's tokens were routed to, per layer{routed}; grey: expert removed by pruning"


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


def format_probability(p: float) -> str:
    return f"{p:.4f}"


PRE = 'style="white-space: pre-wrap"'  # prompts and generations keep their newlines (a decoder prompt has one)


def side_html(side: Mapping[str, Any], title: str) -> str:
    """One model's card: predicted label, probabilities, the generation prompt and generated text, latency, tokens/s,
    size. A causal LM's generation continues its prompt, so the card shows both; a seq2seq one answers its input."""
    e = html.escape
    probs = "".join(
        f'<li><span class="prob-label">{e(label)}</span>: <span class="prob">{format_probability(p)}</span></li>'
        for label, p in side["probabilities"].items()
    )
    prompt = side.get("prompt", "")
    prompt_html = (f'<p>prompt: <code class="prompt" {PRE}>{e(prompt)}</code></p>'
                   if prompt else "")
    verb = "continues" if side.get("kind") == "causal" else "generates"
    return (
        f'<div class="uncurl-side"><h3>{e(title)}</h3>'
        f'<p>prediction: <b class="pred-label">{e(side["label"])}</b></p>'
        f'<ul class="probs">{probs}</ul>{prompt_html}'
        f'<p>{verb}: <code class="generated" {PRE}>{e(side["generated"]) or "(empty)"}</code></p>'
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
         _fmt_ratio(ratio(sum(b["experts"].values()), sum(a["experts"].values())))),
    ]
    body = "".join(f"<tr><td>{n}</td><td>{x}</td><td>{y}</td><td>{z}</td></tr>" for n, x, y, z in rows)
    agree = "the models agree" if result["agree"] else "the models disagree"
    return (
        '<table class="uncurl-ratios"><thead><tr><th></th><th>original</th><th>pruned</th>'
        f"<th>pruned / original</th></tr></thead><tbody>{body}</tbody></table><p>{agree}</p>"
        f"{kernel_html(result.get('experts_kernel'))}"
    )


def kernel_note(kernel: Mapping[str, Any] | None) -> str:
    """One sentence saying which experts kernel the latencies were measured on (and whether both sides shared it)."""
    if not kernel:
        return ""
    if kernel["same"]:
        return f"Latencies measured with the {kernel['original']} experts kernel on both models."
    return (f"Latencies measured with different experts kernels (original: {kernel['original']}, pruned: "
            f"{kernel['pruned']}): the pruned model could not run the original's, so the ratio compares kernels too.")


def kernel_html(kernel: Mapping[str, Any] | None) -> str:
    note = kernel_note(kernel)
    return f'<p class="experts-kernel">{html.escape(note)}</p>' if note else ""


def _number(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


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
        f"{_perplexity_row(batch)}</tbody></table>{_divergence_html(batch)}{kernel_html(batch.get('experts_kernel'))}"
    )


def _perplexity_row(batch: Mapping[str, Any]) -> str:
    ppl = batch.get("perplexity")
    if not ppl:
        return ""
    return (f'<tr><td>perplexity (prompt + gold label)</td><td class="ppl-original">{_number(ppl["original"], 2)}'
            f'</td><td class="ppl-pruned">{_number(ppl["pruned"], 2)}</td></tr>')


def _divergence_html(batch: Mapping[str, Any]) -> str:
    """KL(original || pruned): of the label distributions, and (causal LMs) of every next-token distribution."""
    parts = []
    if batch.get("kl_labels") is not None:
        parts.append(f'labels <b class="kl-labels">{batch["kl_labels"]:.4f}</b> nats per example')
    if batch.get("kl_tokens") is not None:
        parts.append(f'next token (teacher-forced) <b class="kl-tokens">{batch["kl_tokens"]:.4f}</b> nats per token')
    return f"<p>KL(original ‖ pruned): {' · '.join(parts)}</p>" if parts else ""
