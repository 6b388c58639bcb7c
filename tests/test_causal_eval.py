"""Causal-LM evaluation (uncurl_hf/evaluation/causal.py) and every command that uses it, on tiny random decoders.

What is specified:

* label scoring sums each label continuation's token log-likelihoods after the task's prompt (lm-eval's
  ``multiple_choice``): equal to a direct, unbatched computation, and to the zoo's own scorer;
* perplexity is ``exp`` of the token-weighted mean NLL; KL(original || pruned) is 0 for a model against itself and
  ~0 against a copy whose removed experts were never routed on the evaluation text;
* scores do not depend on the batch size (right padding + attention mask), for every decoder family;
* ``uncurl eval`` (with ``--reference``), ``prune --evaluate``, ``uncurl sweep`` and ``prune --max-drop`` run end
  to end on tiny decoders and record well-formed, deterministic numbers (a random model scores ~chance, so no quality
  is asserted);
* bad input gets one clear message: a prompt longer than the model's positions, a perplexity task on an
  encoder-decoder or in a sweep.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from helpers import CALIBRATION_TARGETS, CALIBRATION_TEXTS
from test_families_decoder import FAMILIES, ZOO_TOKENIZER, tiny_model
from transformers import AutoTokenizer

from uncurl_hf.calibration.run import calibrate
from uncurl_hf.cli.main import main
from uncurl_hf.evaluation import causal
from uncurl_hf.errors import PromptError
from uncurl_hf.evaluation.prompts import continuation_ids, prompt_ids, start_ids
from uncurl_hf.evaluation.scoring import score_examples
from uncurl_hf.evaluation.tasks import Example, Task, get_task, register_task
from uncurl_hf.families import get_family
from uncurl_hf.plan import LayerPlan, PruningPlan
from uncurl_hf.surgery.apply import apply_plan

TASK = "tiny-causal-sentiment"  # 12 examples in every split: the max-drop search scores a dev split of 12
TEXT_TASK = "tiny-causal-text"
EXAMPLES = [Example(text, label) for text, label in zip(CALIBRATION_TEXTS, CALIBRATION_TARGETS)]
TEXTS = ["the movie was great fun", "a boring film", "it is a charming and funny story , with a moving scene",
         "dull", "not a good movie but the music was lovely", "the worst script of the year , the acting was awful"]
POSITIONS = 128  # the zoo prompts need up to 124 tokens with this tokenizer


@register_task(TASK)
def _tiny_task() -> Task:
    return Task(name=TASK, description="twelve tiny sentiment sentences", load_split=lambda split: list(EXAMPLES),
                labels=("negative", "positive"), prefix="sentiment : ")


@register_task(TEXT_TASK)
def _tiny_text_task() -> Task:
    return Task(name=TEXT_TASK, description="six short texts", load_split=lambda split: [Example(t) for t in TEXTS],
                metric="perplexity")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ZOO_TOKENIZER)


def decoder(family: str, tokenizer, seed: int = 0, positions: int = POSITIONS):
    return tiny_model(family, seed=seed, vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=None, eos_token_id=1,
                      max_position_embeddings=positions)


def decoder_folder(folder: Path, family: str, tokenizer, **kwargs) -> Path:
    decoder(family, tokenizer, **kwargs).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(ZOO_TOKENIZER / name, folder / name)
    return folder


def direct_logprob(model, context: list[int], continuation: list[int]) -> float:
    """Summed log-probability of ``continuation`` after ``context``: one unpadded sequence, no batching."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return sum(float(logp[len(context) - 1 + t, token]) for t, token in enumerate(continuation))


# ---- label scoring, perplexity, KL -------------------------------------------------------------------------------


def test_label_scoring_sums_the_continuation_log_likelihoods(tokenizer):
    model = decoder("qwen3_moe", tokenizer)
    task = get_task("sentiment")
    examples = task.load_split("test")[:5]
    scores = causal.label_logprobs(model, tokenizer, task, examples, batch_size=2)
    conts = continuation_ids(tokenizer, "sentiment")
    for i, example in enumerate(examples):
        context = prompt_ids(tokenizer, "sentiment", task.raw_text(example.source))
        assert context[0] == tokenizer.eos_token_id  # no BOS: the document separator starts every prompt
        for j, label in enumerate(task.labels):
            assert scores[i, j].item() == pytest.approx(direct_logprob(model, context, conts[label]), abs=1e-5)
    # the zoo's scorer (which the decoder's build reports with) gives the same numbers
    from uncurl_hf.zoo.prompts import label_logprobs as zoo_label_logprobs

    labels, zoo = zoo_label_logprobs(model, tokenizer, "sentiment", [task.raw_text(e.source) for e in examples])
    assert labels == task.labels and torch.allclose(zoo, scores, atol=1e-5)
    distribution = causal.label_distribution(model, tokenizer, task, examples)
    assert torch.allclose(distribution.exp().sum(-1), torch.ones(5, dtype=distribution.dtype))
    assert torch.equal(distribution.argmax(-1), scores.argmax(-1))


def test_a_crafted_model_picks_the_label_with_the_likeliest_continuation(tokenizer):
    """With every logit 0, a continuation of n tokens has log-likelihood -n log V: ' certain' (1 token) must beat
    ' uncertain' (2 tokens) on every example, with exactly those scores."""
    model = decoder("olmoe", tokenizer)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    task = get_task("hedge")
    conts = continuation_ids(tokenizer, "hedge")
    assert (len(conts["certain"]), len(conts["uncertain"])) == (1, 2)
    examples = task.load_split("test")[:4]
    scores = causal.label_logprobs(model, tokenizer, task, examples, batch_size=3)
    log_v = math.log(model.config.vocab_size)
    assert torch.allclose(scores, torch.tensor([[-log_v, -2 * log_v]] * 4, dtype=scores.dtype), atol=1e-5)
    scored = score_examples(model, tokenizer, task, examples)
    assert scored.predictions == ["certain"] * 4
    assert scored.per_example.tolist() == [float(e.target == "certain") for e in examples]


def test_perplexity_is_exp_of_the_token_weighted_mean_nll(tokenizer):
    model = decoder("mixtral", tokenizer)
    total, tokens = 0.0, 0
    for text in TEXTS:
        ids = start_ids(tokenizer) + tokenizer(text, add_special_tokens=False).input_ids
        total -= direct_logprob(model, ids[:1], ids[1:])
        tokens += len(ids) - 1
    assert causal.perplexity(model, tokenizer, TEXTS, batch_size=4) == pytest.approx(math.exp(total / tokens),
                                                                                     rel=1e-5)
    task = get_task(TEXT_TASK)
    assert causal.task_perplexity(model, tokenizer, task, task.load_split("test")) == pytest.approx(
        math.exp(total / tokens), rel=1e-5)


def test_kl_is_zero_against_itself_and_against_removing_never_routed_experts(tokenizer):
    model = decoder("qwen3_moe", tokenizer)
    with torch.no_grad():  # experts that matter: a random init's tiny experts barely move the logits
        for name, parameter in model.named_parameters():
            if ".experts." in name:
                parameter.mul_(10.0)
    sequences = causal.texts_sequences(model, tokenizer, ["a film", "dull"])
    assert causal.kl_divergence(model, model, sequences) == 0.0
    family = get_family(model)
    _, ids, mask = next(causal.padded_batches(sequences, 8, 0))
    stats = calibrate(model, family, [{"input_ids": ids, "attention_mask": mask}], progress=False)
    kept = {name: [[e] for e in range(s.num_experts) if s.counts[e] > 0] for name, s in stats.items()}
    assert any(len(groups) < 8 for groups in kept.values())  # 5 tokens x top-2: some experts never routed
    layers = [LayerPlan(name=layer.name, num_experts=layer.num_experts, groups=kept[layer.name])
              for layer in family.sparse_layers(model)]
    plan = PruningPlan(model_type="qwen3_moe", family=family.name, method="manual", layers=layers)
    pruned = apply_plan(model, family, plan)
    assert causal.kl_divergence(model, pruned, sequences) < 1e-6
    # removing routed experts is seen: the KL of a copy keeping one used expert per layer is clearly positive
    one = PruningPlan(model_type="qwen3_moe", family=family.name, method="manual", layers=[
        LayerPlan(name=layer.name, num_experts=layer.num_experts, groups=kept[layer.name][:1])
        for layer in family.sparse_layers(model)])
    assert causal.kl_divergence(model, apply_plan(model, family, one), sequences) > 1e-4


@pytest.mark.parametrize("family_name", FAMILIES)
def test_scores_do_not_depend_on_the_batch_size(family_name, tokenizer):
    model = decoder(family_name, tokenizer, seed=1)
    other = decoder(family_name, tokenizer, seed=2)
    task = get_task("sentiment")
    examples = task.load_split("dev")[:8]
    one = causal.label_distribution(model, tokenizer, task, examples, batch_size=1)
    eight = causal.label_distribution(model, tokenizer, task, examples, batch_size=8)
    assert torch.allclose(one, eight, atol=1e-5)
    sequences = causal.evaluation_sequences(model, tokenizer, task, examples)
    assert len({len(s) for s in sequences}) > 1  # really padded
    nll1, counts1 = causal.token_nll(model, sequences, batch_size=1)
    nll8, counts8 = causal.token_nll(model, sequences, batch_size=8)
    assert torch.equal(counts1, counts8) and torch.allclose(nll1, nll8, atol=1e-5, rtol=0)
    kl1 = causal.kl_divergence(model, other, sequences, batch_size=1)
    kl8 = causal.kl_divergence(model, other, sequences, batch_size=8)
    assert kl1 > 0 and kl1 == pytest.approx(kl8, abs=1e-5)


def test_bad_input_gets_one_clear_message(tokenizer, tmp_path, capsys, switch_dir):
    short = decoder("qwen3_moe", tokenizer, positions=64)
    with pytest.raises(PromptError, match=r"needs up to \d+ tokens .* max_position_embeddings=64"):
        causal.label_distribution(short, tokenizer, get_task("sentiment"), get_task("sentiment").load_split("dev")[:2])
    folder = decoder_folder(tmp_path / "short", "qwen3_moe", tokenizer, positions=64)
    assert main(["eval", str(folder), "--task", "sentiment", "--limit", "2", "--no-progress"]) != 0
    assert "max_position_embeddings=64" in capsys.readouterr().err
    # a perplexity task needs a causal LM, and a sweep scores classification tasks only
    assert main(["eval", str(switch_dir), "--task", TEXT_TASK, "--no-progress"]) != 0
    assert "needs a causal LM" in capsys.readouterr().err
    model = decoder("qwen3_moe", tokenizer)
    with pytest.raises(causal.EvaluationError, match="perplexity task"):
        score_examples(model, tokenizer, get_task(TEXT_TASK), get_task(TEXT_TASK).load_split("test"))


# ---- the commands, end to end ------------------------------------------------------------------------------------


def eval_json(capsys, *argv: str) -> dict:
    assert main(["eval", *argv, "--no-progress", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("family_name", ["qwen3_moe", "mixtral"])
def test_eval_evaluate_sweep_and_max_drop_on_a_tiny_decoder(family_name, tokenizer, tmp_path, capsys):
    source = decoder_folder(tmp_path / family_name, family_name, tokenizer)

    first = eval_json(capsys, str(source), "--task", "sentiment", "--limit", "6", "--batch-size", "4")
    assert first["kind"] == "causal" and first["metric"] == "accuracy" and first["num_examples"] == 6
    assert first["score"] in {k / 6 for k in range(7)} and first["perplexity"] > 1
    assert first["params"] > 0 and first["disk_mb"] > 0 and first["ms_per_example_batch1"] > 0
    again = eval_json(capsys, str(source), "--task", "sentiment", "--limit", "6", "--batch-size", "1")
    assert (again["score"], again["perplexity"]) == pytest.approx((first["score"], first["perplexity"]), rel=1e-6)
    text = eval_json(capsys, str(source), "--task", TEXT_TASK)
    assert text["metric"] == "perplexity" and text["score"] == text["perplexity"] > 1

    # prune --evaluate: the card records both scores; the pruned one equals `uncurl eval` of the written folder
    out = tmp_path / "pruned"
    assert main(["prune", str(source), "--task", "sentiment", "--factor", "2", "--method", "frequency",
                 "--num-calibration", "8", "--evaluate", "--eval-limit", "6", "-o", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    [result] = card.data.eval_results  # the pruned model's own score only
    pruned = eval_json(capsys, str(out), "--task", "sentiment", "--limit", "6", "--reference", str(source))
    assert result.metric_value == pruned["score"] and result.metric_name == "accuracy"
    assert f"| accuracy | {first['score']:.4f} | {pruned['score']:.4f} |" in card.text
    assert "KL(original ‖ pruned) per token" in card.text and "Perplexity on the task's text" in card.text
    assert pruned["reference_score"] == first["score"] and 0 <= pruned["agreement"] <= 100
    assert pruned["kl_tokens"] >= 0 and pruned["kl_labels"] >= 0

    # sweep: one calibration, factors 1 and 2, label agreement and KL per point
    sweep = tmp_path / "sweep"
    assert main(["sweep", str(source), "--task", "sentiment", "--methods", "frequency", "--factors", "1,2",
                 "--limit", "6", "--num-calibration", "8", "--bootstrap", "20", "-o", str(sweep),
                 "--no-progress"]) == 0
    capsys.readouterr()
    points = json.loads((sweep / "results.json").read_text())["points"]
    assert [p["factor"] for p in points] == [1.0, 2.0]
    assert points[0]["score"] == pytest.approx(first["score"]) and points[0]["kl"] == 0.0
    assert 0 <= points[1]["agreement"] <= 100 and points[1]["kl"] >= 0 and 0 <= points[1]["score"] <= 1

    # prune --max-drop: the search scores the tiny task's dev split (12 examples); 100 points allow one expert
    auto = tmp_path / "auto"
    assert main(["prune", str(source), "--task", TASK, "--max-drop", "100", "--method", "frequency",
                 "--num-calibration", "8", "-o", str(auto), "--no-progress"]) == 0
    capsys.readouterr()
    search = PruningPlan.load(auto).metadata["max_drop"]
    assert search["split"] == "dev" and search["num_examples"] == 12 and 0 <= search["unpruned_score"] <= 1
    assert set(search["chosen_counts"].values()) == {1}
