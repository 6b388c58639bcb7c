"""Pruned model classes: per-layer expert counts build, load, train, generate; upstream equivalence.

The forward of every pruned class has exactly the stock parameters: ``Trainer`` keeps only the dataset columns its
signature names, and the stock inputs (``inputs_embeds``, ``decoder_attention_mask``, ``cache``) must reach the
upstream code with unequal counts too.
"""

from __future__ import annotations

import contextlib
import inspect

import pytest
import torch
import transformers
from helpers import tiny_switch_config, tiny_switch_model
from huggingface_hub.errors import StrictDataclassClassValidationError
from test_modeling_kernels import FAMILIES, IDS, STOCK_CLASSES, pruned_decoder
from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM

from uncurl_hf.modeling.pruned_decoder_moe import PRUNED_CAUSAL_LMS
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


# ---- the stock forward signature -------------------------------------------------------------------------------

SIGNATURE_PAIRS = [
    (PrunedSwitchTransformersForConditionalGeneration, transformers.SwitchTransformersForConditionalGeneration),
    (PrunedSwitchTransformersModel, transformers.SwitchTransformersModel),
    *((PRUNED_CAUSAL_LMS[family], STOCK_CLASSES[family]) for family in FAMILIES),
]


def unequal_config() -> PrunedSwitchTransformersConfig:
    return pruned_config(num_experts_per_encoder_layer=[3, 8], num_experts_per_decoder_layer=[1, 5])


def parameters(cls) -> list[tuple]:
    """``forward``'s parameters as (name, kind, default): annotations are strings in one module, types in another."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(cls.forward).parameters.values()]


@pytest.mark.parametrize("pruned, stock", SIGNATURE_PAIRS, ids=lambda cls: cls.__name__)
def test_forward_has_exactly_the_stock_parameters(pruned, stock):
    assert parameters(pruned) == parameters(stock)


def test_switch_forward_names_the_seq2seq_inputs():
    names = set(inspect.signature(PrunedSwitchTransformersForConditionalGeneration.forward).parameters)
    assert {
        "decoder_attention_mask", "encoder_outputs", "inputs_embeds", "decoder_inputs_embeds", "cache", "labels",
        "output_router_logits",
    } <= names


def test_trainer_keeps_the_columns_the_stock_model_keeps(tmp_path):
    datasets = pytest.importorskip("datasets")
    from transformers import Trainer, TrainingArguments

    columns = {"input_ids": [[5, 6]], "attention_mask": [[1, 1]], "decoder_attention_mask": [[1, 0]],
               "labels": [[5, 6]], "text": ["a b"]}
    kept = {}
    for model in (tiny_switch_model(), PrunedSwitchTransformersForConditionalGeneration(unequal_config())):
        trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True))
        kept[type(model).__name__] = trainer._remove_unused_columns(datasets.Dataset.from_dict(columns)).column_names
    pruned_kept = kept["PrunedSwitchTransformersForConditionalGeneration"]
    assert pruned_kept == kept["SwitchTransformersForConditionalGeneration"] and "decoder_attention_mask" in pruned_kept


def test_unequal_switch_takes_inputs_embeds_decoder_mask_and_cache():
    torch.manual_seed(0)
    model = PrunedSwitchTransformersForConditionalGeneration(unequal_config()).eval()
    ids, dec = torch.randint(3, 100, (2, 7)), torch.randint(3, 100, (2, 5))
    embed = model.get_input_embeddings()
    with torch.no_grad():
        by_ids = model(input_ids=ids, decoder_input_ids=dec).logits
        by_embeds = model(inputs_embeds=embed(ids), decoder_inputs_embeds=embed(dec)).logits
        torch.testing.assert_close(by_embeds, by_ids)

        ones = model(input_ids=ids, decoder_input_ids=dec, decoder_attention_mask=torch.ones_like(dec)).logits
        masked = torch.ones_like(dec)
        masked[:, 1] = 0
        hidden = model(input_ids=ids, decoder_input_ids=dec, decoder_attention_mask=masked).logits
        torch.testing.assert_close(ones, by_ids)
        torch.testing.assert_close(hidden[:, :1], by_ids[:, :1])  # positions before the masked one: unchanged
        assert not torch.allclose(hidden[:, 2:], by_ids[:, 2:])  # after it: the mask reached the decoder

        encoded = model.get_encoder()(input_ids=ids)  # as generate does: the encoder once, then cached decoding
        for name in ("cache", "past_key_values"):  # the stock name and its deprecated alias
            prefix = model(encoder_outputs=encoded, decoder_input_ids=dec[:, :4], use_cache=True)
            with pytest.warns(FutureWarning) if name == "past_key_values" else contextlib.nullcontext():
                step = model(encoder_outputs=encoded, decoder_input_ids=dec[:, 4:], **{name: prefix.cache})
            torch.testing.assert_close(step.logits[:, -1], by_ids[:, -1], rtol=1e-4, atol=1e-5)


def test_unequal_switch_router_losses_from_embeddings_are_finite():
    torch.manual_seed(0)
    model = PrunedSwitchTransformersForConditionalGeneration(unequal_config()).train()
    ids = torch.randint(3, 100, (2, 7))
    out = model(inputs_embeds=model.get_input_embeddings()(ids), labels=ids, output_router_logits=True)
    assert [logits.shape[-1] for logits in out.encoder_router_logits] == [3, 8]  # unpadded, per layer
    for loss in (out.loss, out.encoder_aux_loss, out.decoder_aux_loss, out.encoder_z_loss, out.decoder_z_loss):
        assert torch.isfinite(loss) and loss > 0
    out.loss.backward()


@pytest.mark.parametrize("family", FAMILIES)
def test_unequal_decoder_takes_inputs_embeds_and_trains_with_router_logits(family):
    model = pruned_decoder(family)
    with torch.no_grad():
        by_ids = model(input_ids=IDS).logits
        by_embeds = model(inputs_embeds=model.get_input_embeddings()(IDS)).logits
    torch.testing.assert_close(by_embeds, by_ids)

    model.train()
    out = model(input_ids=IDS, labels=IDS, output_router_logits=True)
    width = max(model.config.experts_per_layer())
    assert all(logits.shape[-1] == width for logits in out.router_logits)  # smaller layers padded with -inf
    assert torch.isfinite(out.aux_loss) and out.aux_loss > 0 and torch.isfinite(out.loss)
    out.loss.backward()
