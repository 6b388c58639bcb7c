"""PrunedSwitchTransformers: per-layer expert counts build, load, train, generate; upstream equivalence."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_switch_config, tiny_switch_model
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM

from uncurl_hf.modeling.pruned_switch_transformers import (
    PrunedSwitchTransformersConfig,
    PrunedSwitchTransformersForConditionalGeneration,
    PrunedSwitchTransformersModel,
)


def pruned_config(**overrides) -> PrunedSwitchTransformersConfig:
    derived = {"model_type", "transformers_version", "encoder_sparse_step", "decoder_sparse_step"}
    values = {k: v for k, v in tiny_switch_config().to_dict().items() if k not in derived}
    values.update(overrides)
    return PrunedSwitchTransformersConfig(**values)


def expert_counts(model) -> list[int]:
    blocks = [block for stack in (model.encoder, model.decoder) for block in stack.block]
    return [len(block.layer[-1].mlp.experts) for block in blocks if block.layer[-1].is_sparse]


def test_unequal_counts_build_train_generate_and_reload(tmp_path):
    config = pruned_config(num_experts_per_encoder_layer=[3, 5], num_experts_per_decoder_layer=[1, 8])
    torch.manual_seed(0)
    model = PrunedSwitchTransformersForConditionalGeneration(config)
    assert expert_counts(model) == [3, 5, 1, 8]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    routers = [block.layer[-1].mlp.router for block in model.encoder.block if block.layer[-1].is_sparse]
    assert [r.classifier.out_features for r in routers] == [3, 5]

    ids = torch.randint(3, 100, (2, 7))
    model.train()
    out = model(input_ids=ids, labels=ids, output_router_logits=True)
    assert torch.isfinite(out.loss) and out.encoder_aux_loss > 0 and out.decoder_z_loss > 0
    out.loss.backward()
    assert model.encoder.block[1].layer[1].mlp.router.classifier.weight.grad is not None
    model.eval()
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[0] == 2

    model.save_pretrained(tmp_path)
    reloaded, info = AutoModelForSeq2SeqLM.from_pretrained(tmp_path, output_loading_info=True)
    assert type(reloaded) is PrunedSwitchTransformersForConditionalGeneration
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert reloaded.config.num_experts_per_encoder_layer == [3, 5]
    torch.testing.assert_close(reloaded(input_ids=ids, labels=ids).logits, model(input_ids=ids, labels=ids).logits)
    bare = AutoModel.from_pretrained(tmp_path)
    assert type(bare) is PrunedSwitchTransformersModel and expert_counts(bare) == [3, 5, 1, 8]


def test_equal_counts_match_upstream_switch():
    """With no per-layer lists the pruned class is an upstream Switch model: same weights, same outputs."""
    upstream = tiny_switch_model(seed=1)
    pruned = PrunedSwitchTransformersForConditionalGeneration(pruned_config()).eval()
    assert pruned.load_state_dict(upstream.state_dict()) is not None
    ids = torch.randint(3, 100, (2, 6))
    a = upstream(input_ids=ids, labels=ids, output_router_logits=True)
    b = pruned(input_ids=ids, labels=ids, output_router_logits=True)
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(a.encoder_z_loss, b.encoder_z_loss)  # z-loss: same value per-layer or concatenated
    torch.testing.assert_close(a.decoder_z_loss, b.decoder_z_loss)


def test_config_round_trip_and_validation(tmp_path):
    config = pruned_config(
        num_experts_per_encoder_layer=[2, 4], expert_capacity_per_encoder_layer=[9, 9], num_experts=4
    )
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, PrunedSwitchTransformersConfig)
    assert loaded.experts_per_layer(is_decoder=False) == [2, 4]
    assert loaded.experts_per_layer(is_decoder=True) == [4, 4]
    assert loaded.capacity_per_layer(is_decoder=False) == [9, 9]
    # get_text_config (used by generate) must not rewrite the per-layer fields into num_experts
    assert loaded.get_text_config(decoder=True).num_experts == 4
    with pytest.raises(StrictDataclassClassValidationError, match="2 sparse layers"):
        pruned_config(num_experts_per_encoder_layer=[2, 4, 4])
    with pytest.raises(StrictDataclassClassValidationError, match="largest per-layer count"):
        pruned_config(num_experts_per_decoder_layer=[2, 9])
