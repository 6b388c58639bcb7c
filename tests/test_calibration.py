"""Calibration statistics: padding never counts, token totals, decoder-side counting, bounded seeded samples."""

from __future__ import annotations

import pytest
import torch
from helpers import CALIBRATION_TARGETS, CALIBRATION_TEXTS
from transformers import AutoTokenizer

from uncurl_hf import build_batches, calibrate, load_calibration_file, load_model
from uncurl_hf.errors import CalibrationDataError
from uncurl_hf.families import get_family
from uncurl_hf.evaluation.tasks import Example

EXAMPLES = [Example(s, t) for s, t in zip(CALIBRATION_TEXTS, CALIBRATION_TARGETS)]


@pytest.fixture(scope="module")
def model_and_tokenizer(switch_dir):
    return load_model(switch_dir), AutoTokenizer.from_pretrained(switch_dir)


def pad_more(batch: dict, extra: int) -> dict:
    """Append ``extra`` padding positions to every sequence (encoder and decoder side)."""
    def grow(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.cat([t, torch.full((t.shape[0], extra), value, dtype=t.dtype)], dim=1)

    return {
        "input_ids": grow(batch["input_ids"], 0),
        "attention_mask": grow(batch["attention_mask"], 0),
        "labels": grow(batch["labels"], -100),
        "decoder_attention_mask": grow(batch["decoder_attention_mask"], 0),
    }


def test_counts_sum_to_real_tokens_on_both_sides(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    batches = build_batches(EXAMPLES, tokenizer, batch_size=5, max_length=32)
    stats = calibrate(model, get_family(model), batches, progress=False)
    encoder_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    decoder_tokens = sum(int(b["decoder_attention_mask"].sum()) for b in batches)
    assert decoder_tokens == 2 * len(EXAMPLES)  # one label word + </s> per example
    assert stats.num_sequences == len(EXAMPLES)
    for name, layer in stats.items():
        expected = decoder_tokens if name.startswith("decoder") else encoder_tokens
        assert layer.num_tokens == expected
        assert int(layer.counts.sum()) == expected
        torch.testing.assert_close(layer.gate_mass.sum().item(), float(expected), rtol=1e-6, atol=1e-6)
        assert layer.logit_sample.shape == (expected, 8)
        assert layer.hidden_sample.shape == (expected, model.config.d_model)
        used = layer.counts > 0
        assert (layer.output_norm_sum[used] > 0).all() and (layer.output_norm_sum[~used] == 0).all()
        assert (layer.weighted_output_norm_sum <= layer.output_norm_sum + 1e-9).all()


def test_padding_never_counts(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    family = get_family(model)
    unpadded = calibrate(model, family, build_batches(EXAMPLES, tokenizer, batch_size=1), progress=False)
    padded_batches = [pad_more(b, 7) for b in build_batches(EXAMPLES, tokenizer, batch_size=6)]
    padded = calibrate(model, family, padded_batches, progress=False)
    for name in unpadded:
        assert torch.equal(unpadded[name].counts, padded[name].counts), name
        assert unpadded[name].num_tokens == padded[name].num_tokens
        torch.testing.assert_close(unpadded[name].gate_mass, padded[name].gate_mass, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(unpadded[name].output_norm_sum, padded[name].output_norm_sum, rtol=1e-4, atol=1e-4)


def test_sample_is_bounded_and_seeded(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    family = get_family(model)
    batches = build_batches(EXAMPLES, tokenizer, batch_size=4)
    a = calibrate(model, family, batches, max_logit_samples=10, seed=3, progress=False)
    b = calibrate(model, family, batches, max_logit_samples=10, seed=3, progress=False)
    c = calibrate(model, family, batches, max_logit_samples=10, seed=4, progress=False)
    layer = "encoder.block.1"
    assert a[layer].logit_sample.shape == (10, 8) and a[layer].hidden_sample.shape == (10, 32)
    assert torch.equal(a[layer].logit_sample, b[layer].logit_sample)
    assert not torch.equal(a[layer].logit_sample, c[layer].logit_sample)
    # the sampled logits belong to the sampled hidden states
    recomputed = family.router_logits(family.sparse_layers(model)[0], a[layer].hidden_sample)
    torch.testing.assert_close(recomputed, a[layer].logit_sample)


def test_sources_without_targets_feed_only_the_start_token(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    batches = build_batches([Example(e.source) for e in EXAMPLES], tokenizer, batch_size=4)
    assert "labels" not in batches[0]
    stats = calibrate(model, get_family(model), batches, progress=False)
    assert stats["decoder.block.1"].num_tokens == len(EXAMPLES)


def test_calibration_file_formats(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first line\n\n   \nsecond line\n", encoding="utf-8")
    assert load_calibration_file(txt) == [Example("first line"), Example("second line")]
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"text": "x y", "target": "positive"}\n\n{"text": "z"}\n', encoding="utf-8")
    assert load_calibration_file(jsonl) == [Example("x y", "positive"), Example("z")]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.txt", None, "does not exist"),
        ("empty.txt", "\n  \n", "no examples"),
        ("bad.jsonl", '{"text": "ok"}\nnot json\n', "line 2: not valid JSON"),
        ("notext.jsonl", '{"target": "x"}\n', "field 'text'"),
        ("data.csv", "a,b\n", "use .txt"),
        ("latin1.txt", b"caf\xe9\n", "not UTF-8"),
    ],
)
def test_calibration_file_errors(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(CalibrationDataError, match=message):
        load_calibration_file(path)


def test_directory_as_calibration_file(tmp_path):
    (tmp_path / "d.txt").mkdir()
    with pytest.raises(CalibrationDataError, match="not a regular file"):
        load_calibration_file(tmp_path / "d.txt")
