"""``export="stock"``: a plain switch_transformers checkpoint equal to the pruned model, or a clear refusal."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, SwitchTransformersForConditionalGeneration

import uncurl_hf
from uncurl_hf.errors import ExportError
from helpers import prune_flat
from uncurl_hf import PruneRecipe
from uncurl_hf.errors import UncurlError

INPUTS = {"input_ids": torch.tensor([[4, 5, 6, 7, 1], [8, 9, 10, 1, 0]]),
          "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]),
          "decoder_input_ids": torch.tensor([[0, 4, 5], [0, 8, 9]])}


def test_stock_export_loads_without_custom_code_and_matches_pruned(switch_dir, calibration_jsonl, tmp_path):
    kwargs = dict(factor=2, method="frequency", calibration_file=calibration_jsonl, seed=2, progress=False)
    pruned = prune_flat(switch_dir, output_dir=tmp_path / "pruned", **kwargs)
    stock = prune_flat(switch_dir, output_dir=tmp_path / "stock", export="stock", **kwargs)

    config = json.loads((stock.output_dir / "config.json").read_text())
    assert config["model_type"] == "switch_transformers" and config["num_experts"] == 4
    assert "auto_map" not in config and not any(k.startswith("num_experts_per") for k in config)
    pruned_config = json.loads((pruned.output_dir / "config.json").read_text())
    assert config["expert_capacity"] == max(pruned_config["expert_capacity_per_encoder_layer"])
    assert not list(stock.output_dir.glob("*.py"))  # no remote code to trust
    assert stock.plan.counts == pruned.plan.counts and stock.params_after == pruned.params_after

    stock_model = AutoModelForSeq2SeqLM.from_pretrained(stock.output_dir, trust_remote_code=False)
    assert type(stock_model) is SwitchTransformersForConditionalGeneration
    pruned_model = AutoModelForSeq2SeqLM.from_pretrained(pruned.output_dir)
    with torch.no_grad():
        torch.testing.assert_close(stock_model(**INPUTS).logits, pruned_model(**INPUTS).logits, rtol=0, atol=0)
    card = (stock.output_dir / "README.md").read_text()
    assert "export: stock\n" in card and "trust_remote_code" not in card


def test_stock_export_refuses_unequal_counts_before_calibrating(switch_dir, calibration_jsonl, tmp_path):
    counts = {"encoder.block.1": 2, "encoder.block.3": 4, "decoder.block.1": 4, "decoder.block.3": 4}
    with pytest.raises(ExportError) as info:
        prune_flat(
            switch_dir, output_dir=tmp_path / "x", num_experts_per_layer=counts, calibration_file=calibration_jsonl,
            export="stock", progress=False,
        )
    message = str(info.value)
    assert "encoder.block.1: 2" in message and "--uniform" in message and "--export pruned" in message
    assert not (tmp_path / "x").exists()
    with pytest.raises(UncurlError, match="export must be one of 'pruned', 'stock', got 'onnx'"):
        PruneRecipe.from_dict({"factor": 2, "export": "onnx"})
