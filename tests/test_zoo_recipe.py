"""The zoo recipe end to end at micro scale: tokenizer -> span-corruption pretraining (resumable) ->
fine-tuning -> a loadable checkpoint with its manifest. The real tiny-switch-8 is the same code, longer."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from uncurl_hf.zoo.recipe import FinetuneSpec, IntermediateSpec, ModelSpec, PretrainSpec, ZooRecipe, lr_at, pretrain
from uncurl_hf.zoo.registry import build

MICRO = ZooRecipe(
    name="micro-switch-4",
    model=ModelSpec(vocab_size=384, d_model=16, d_kv=8, num_heads=2, d_ff=16, num_layers=2,
                    num_sparse_encoder_layers=1, num_decoder_layers=2, num_sparse_decoder_layers=1, num_experts=4),
    pretrain=PretrainSpec(steps=6, batch_size=6, chunk_tokens=24, warmup=2, checkpoint_every=3, polarity_rows=2),
    intermediate=IntermediateSpec(steps=3, batch_size=4, chunk_tokens=24, warmup=1),
    finetune=FinetuneSpec(epochs=1, batch_size=16, warmup=2, train_limit=64),
)


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    assert lr_at(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(100, 100, 10, 1.0) == pytest.approx(0.1)


def test_micro_recipe_builds_a_loadable_model_with_manifest(tmp_path):
    out = build(MICRO, tmp_path / "model", workdir=tmp_path / "work", progress=False)
    model = AutoModelForSeq2SeqLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.num_experts == 4 and model.config.router_jitter_noise == 0.0
    assert len(tok) == 384
    manifest = json.loads((out / "zoo_manifest.json").read_text())
    assert manifest["recipe"]["pretrain"]["steps"] == 6
    assert 0.0 <= manifest["test"]["score"] <= 1.0 and manifest["test"]["num_examples"] == 800
    assert set(manifest["routing"]["layers"]) == {"encoder.block.1", "decoder.block.1"}
    log = [json.loads(line) for line in (tmp_path / "work" / "pretrain_log.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 0 and all(r["loss"] > 0 for r in log)


def test_pretraining_resumes_from_its_checkpoint(tmp_path):
    """Stop after the step-3 checkpoint, resume, and land on the same weights as an uninterrupted run."""
    whole = pretrain(MICRO, tmp_path / "whole", progress=False)
    part = tmp_path / "part"
    # simulate an interruption after the step-3 checkpoint: drop the final model, keep the checkpoint
    pretrain(MICRO, part, progress=False)
    shutil.rmtree(part / "pretrained")
    assert (part / "pretrain-ckpt" / "trainer_state.pt").exists()
    resumed = pretrain(MICRO, part, progress=False)
    a = AutoModelForSeq2SeqLM.from_pretrained(whole).state_dict()
    b = AutoModelForSeq2SeqLM.from_pretrained(resumed).state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
