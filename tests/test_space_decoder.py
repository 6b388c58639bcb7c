"""The Space with decoder-only MoE bases (uncurl_hf/space/ on causal LMs): the pure functions, the running server
through gradio_client, and one click in a real browser.

What is specified, on tiny random decoders built from real transformers configs (the tiny-switch-8 tokenizer):

* :func:`compare` on a decoder pair, pruned to the stock format (equal counts) and to the pruned class (unequal
  counts): label probabilities are the causal scorer's through the task prompt and sum to 1, the generation is the
  model's own greedy continuation of that prompt, expert usage counts every prompt + label token ``top_k`` times;
* :func:`compare_batch`: a model against itself gives agreement 100 %, KL 0 and two equal perplexities (evaluation's
  own); against its pruned copy the KL and perplexities are evaluation's, recombined over chunks;
* both models run one experts kernel, and the page says which;
* every decoder family compares end to end; a missing chat template, a prompt past the model's positions and two
  kinds of model each give one message, not a traceback;
* the app answers the same through gradio_client, and the page shows both generations after a click.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import pytest
import torch
from browser import chromium_page, chromium_path, open_app, run_compare
from helpers import prune_flat
from test_causal_eval import decoder_folder
from test_families_decoder import FAMILIES, ZOO_TOKENIZER
from test_space import _free_port, _one_timing_run, _stable  # noqa: F401  (_one_timing_run: autouse fixture)
from transformers import AutoTokenizer

from uncurl_hf.errors import SpaceInputError
from uncurl_hf.evaluation import causal
from uncurl_hf.evaluation.prompts import continuation_ids, prompt_ids
from uncurl_hf.evaluation.tasks import Example, get_task
from uncurl_hf.modeling import experts_implementation
from uncurl_hf.space.app import build_demo, launch_demo
from uncurl_hf.space.comparison import compare, compare_batch, model_input
from uncurl_hf.space.models import get_model
from uncurl_hf.space.render import batch_html, expert_usage_figure, ratios_html, side_html

TASK = get_task("sentiment")
TEXT = "a charming and funny story , with a moving scene"
UNEQUAL = [6, 3, 5]  # per sparse layer of the tiny decoders (8 experts, top-2): needs the pruned class


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(ZOO_TOKENIZER)


@pytest.fixture(scope="module")
def decoders(tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Qwen3-MoE base, a frequency x2 copy (stock Qwen3MoeForCausalLM) and an unequal-count copy
    (PrunedQwen3MoeForCausalLM), both calibrated on the sentiment task."""
    root = tmp_path_factory.mktemp("space-decoder")
    base = decoder_folder(root / "qwen3", "qwen3_moe", tokenizer)
    common = dict(method="frequency", task="sentiment", num_calibration_examples=8, progress=False)
    prune_flat(str(base), output_dir=root / "stock", factor=2, **common)
    prune_flat(str(base), output_dir=root / "pruned-class", num_experts_per_layer=UNEQUAL, **common)
    return {"base": base, "stock": root / "stock", "pruned-class": root / "pruned-class"}


def _greedy(folder: Path, ids: list[int]) -> str:
    """The model's own greedy continuation of ``ids`` (8 new tokens), decoded as the page decodes it."""
    loaded = get_model(folder)
    prompt = torch.tensor([ids])
    with torch.no_grad():
        out = loaded.model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                    do_sample=False, num_beams=1)
    return loaded.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()


# ---------------------------------------------------------------------------------------------- pure functions


@pytest.mark.parametrize("output", ["stock", "pruned-class"])
def test_compare_on_a_decoder_pair(decoders: dict[str, Path], tokenizer: Any, output: str) -> None:
    base, pruned = decoders["base"], decoders[output]
    result = compare(TEXT, base, pruned)
    template = TASK.decoder_prompt()
    ids = prompt_ids(tokenizer, template, TEXT)
    assert result["kind"] == "causal" and result["model_input"] == template.render(TEXT)
    assert type(get_model(pruned).model).__name__ == ("Qwen3MoeForCausalLM" if output == "stock"
                                                       else "PrunedQwen3MoeForCausalLM")
    for side, folder in (("original", base), ("pruned", pruned)):
        out, loaded = result[side], get_model(folder)
        expected = causal.label_distribution(loaded.model, tokenizer, TASK, [Example(model_input(TASK, TEXT))])[0]
        assert sum(out["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert list(out["probabilities"].values()) == pytest.approx(expected.exp().tolist(), abs=1e-6)
        assert out["label"] == TASK.labels[int(expected.argmax())]
        assert out["prompt"] == template.render(TEXT) and out["input_tokens"] == len(ids)
        assert out["generated"] == _greedy(folder, ids) and 1 <= out["new_tokens"] <= 8
        assert out["experts_kernel"] == experts_implementation(loaded.model)
        routed = len(ids) + len(continuation_ids(tokenizer, template)[out["label"]])
        for layer, usage in out["expert_usage"].items():
            assert len(usage["counts"]) == out["experts"][layer] and usage["tokens"] == routed
            assert sum(usage["counts"]) == routed * min(usage["top_k"], out["experts"][layer])
    counts = list(result["pruned"]["experts"].values())
    assert counts == ([4, 4, 4] if output == "stock" else UNEQUAL)
    assert result["experts_kernel"]["same"] and 0 < result["ratios"]["params"] < 1
    assert "experts kernel on both models" in ratios_html(result)
    html = side_html(result["pruned"], "pruned")
    assert "Sentiment:" in html and "continues" in html
    assert len(expert_usage_figure(result).axes) == 3


def test_batch_of_a_model_against_itself_and_its_pruned_copy(decoders: dict[str, Path], tokenizer: Any) -> None:
    base, pruned = decoders["base"], decoders["pruned-class"]
    same = compare_batch(5, base, base)
    assert same["kind"] == "causal" and same["agreement"] == 1.0
    assert same["kl_labels"] == 0.0 and same["kl_tokens"] == 0.0
    assert same["scores"]["original"] == same["scores"]["pruned"]
    examples = TASK.load_split("test")[:5]
    model = get_model(base).model
    assert same["perplexity"]["original"] == same["perplexity"]["pruned"] == pytest.approx(
        causal.task_perplexity(model, tokenizer, TASK, examples), rel=1e-4)
    batch = compare_batch(5, base, pruned)
    assert batch["kl_tokens"] == pytest.approx(
        causal.task_kl(model, get_model(pruned).model, tokenizer, TASK, examples), rel=1e-4, abs=1e-6)
    rows = batch["rows"]
    assert batch["agreement"] == sum(r["original"] == r["pruned"] for r in rows) / 5
    for side in ("original", "pruned"):
        assert batch["scores"][side] == sum(r[side] == r["gold"] for r in rows) / 5
    assert batch["kl_labels"] >= 0 and batch["experts_kernel"]["same"]
    html = batch_html(batch)
    assert "kl-tokens" in html and "ppl-pruned" in html and "experts kernel on both models" in html
    assert "kl_tokens" not in compare_batch(2, base, pruned, token_metrics=False)


def test_both_models_run_one_experts_kernel(decoders: dict[str, Path]) -> None:
    """A pruned model left on another kernel is put on the original's before anything is timed."""
    base, pruned = decoders["base"], decoders["pruned-class"]
    wanted = experts_implementation(get_model(base).model)
    other = "eager" if wanted != "eager" else "batched_mm"
    get_model(pruned).model.set_experts_implementation(other)
    assert experts_implementation(get_model(pruned).model) == other
    result = compare(TEXT, base, pruned)
    assert result["experts_kernel"] == {"original": wanted, "pruned": wanted, "same": True}
    assert result["pruned"]["experts_kernel"] == wanted


def test_every_decoder_family_compares(tokenizer: Any, tmp_path: Path) -> None:
    for family in FAMILIES:
        folder = decoder_folder(tmp_path / family, family, tokenizer)
        result = compare(TEXT, folder, folder)
        assert result["agree"] and result["original"]["probabilities"] == result["pruned"]["probabilities"]
        assert result["original"]["generated"] == result["pruned"]["generated"], family
        assert len(result["original"]["expert_usage"]) == len(get_model(folder).experts), family


def test_decoder_inputs_get_one_clear_message(
    decoders: dict[str, Path], tokenizer: Any, switch_dir: Path, tmp_path: Path
) -> None:
    base = decoders["base"]
    with pytest.raises(SpaceInputError, match=r"has no chat template .* 'task' or 'plain'"):
        compare(TEXT, base, base, prompt_format="chat")
    with pytest.raises(SpaceInputError, match="Unknown prompt format"):
        compare(TEXT, base, base, prompt_format="poem")
    with pytest.raises(SpaceInputError, match=r"prompt is \d+ tokens; with 8 new tokens .*max_position_embeddings=128"):
        compare(" ".join(["fun"] * 125), base, base, prompt_format="plain")
    short = decoder_folder(tmp_path / "short", "qwen3_moe", tokenizer, positions=64)
    with pytest.raises(SpaceInputError, match=r"short cannot be compared on 'sentiment'.*max_position_embeddings=64"):
        compare(TEXT, short, short)
    with pytest.raises(SpaceInputError, match="causal LM and the pruned checkpoint an encoder-decoder"):
        compare_batch(2, base, switch_dir)
    # with a chat template, the chat prompt is the template's rendering of one user turn
    chat = decoder_folder(tmp_path / "chat", "qwen3_moe", tokenizer)
    (chat / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}answer :{% endif %}"
    )
    result = compare(TEXT, chat, chat, prompt_format="chat")
    assert result["original"]["prompt"] == f"user : {TEXT} answer :"
    assert result["original"]["generated"] == _greedy(chat, tokenizer(f"user : {TEXT} answer :",
                                                                      add_special_tokens=False).input_ids)


# ---------------------------------------------------------------------------------------------- running app


@pytest.fixture(scope="module")
def decoder_app(decoders: dict[str, Path]) -> Any:
    demo = build_demo(str(decoders["base"]), {"qwen3 · frequency ×2": str(decoders["stock"]),
                                              "qwen3 · unequal": str(decoders["pruned-class"])}, num_examples=2)
    url = launch_demo(demo, host="127.0.0.1", port=_free_port(), prevent_thread_lock=True, quiet=True)
    yield url
    demo.close()


def test_gradio_client_on_a_decoder_pair(decoder_app: str, decoders: dict[str, Path]) -> None:
    from gradio_client import Client

    base, pruned = str(decoders["base"]), str(decoders["pruned-class"])
    client = Client(decoder_app, verbose=False)
    remote = client.predict(TEXT, base, pruned, api_name="/compare_json")
    local = compare(TEXT, base, pruned)
    assert {s: _stable(remote[s]) for s in ("original", "pruned")} == {s: _stable(local[s]) for s in
                                                                        ("original", "pruned")}
    status, original_html, *_ = client.predict(TEXT, base, pruned, "plain", api_name="/compare")
    assert status.startswith("Compared in") and f">{html.escape(TEXT)}</code>" in original_html  # the prompt
    status, original_html, *_ = client.predict(TEXT, base, pruned, "chat", api_name="/compare")
    assert "no chat template" in status and status.startswith("⚠️") and original_html == ""
    batch = client.predict(3, base, base, api_name="/compare_batch_json")
    assert batch["kl_tokens"] == 0.0 and batch["agreement"] == 1.0 and batch["rows"] == compare_batch(
        3, base, base)["rows"]


def test_browser_shows_both_generations(decoder_app: str, decoders: dict[str, Path]) -> None:
    if chromium_path() is None:
        pytest.skip("chromium is not on PATH after scripts/install_browser.sh; browser test skipped")
    expected = compare(TEXT, decoders["base"], decoders["stock"])
    with chromium_page() as page:
        open_app(page, decoder_app)
        shown = run_compare(page, TEXT)
        assert shown["status"].startswith("Compared in"), shown["status"]
        for side in ("original", "pruned"):
            assert shown[side]["generated"] == (expected[side]["generated"] or "(empty)")
            assert shown[side]["label"] == expected[side]["label"]
        assert "Sentiment:" in page.locator("#original-output .prompt").inner_text()
        assert "experts kernel on both models" in page.locator("#ratios").inner_text()
