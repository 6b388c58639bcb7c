"""Model cards carry the base model's licence and cite the papers behind the method (uncurl_hf/cards/provenance.py);
``model-index`` lists only the pruned model's own results, for Switch and for a decoder family."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import prune_flat
from hub_server import validate_card_metadata
from huggingface_hub import ModelCard, ModelCardData
from test_cards import TASK  # the tiny registered sentiment task (twelve sentences), labels negative/positive
from test_causal_eval import decoder_folder
from test_families_decoder import ZOO_TOKENIZER
from transformers import AutoTokenizer

from uncurl_hf.cards.model_card import ORIGINAL_SUFFIX, CardFacts, build_card
from uncurl_hf.cards.provenance import (
    SourceLicense,
    bibtex_fields,
    carry_license,
    format_bibtex,
    license_from_card_text,
    provenance_sections,
    read_source_license,
)
from uncurl_hf.io.verify import verify_checkpoint
from uncurl_hf.methods import available_methods, get_method
from uncurl_hf.methods.super_experts import CITATION as SUPER_EXPERTS_CITATION

BASE = "google/switch-base-8"
BASE_LINK = f"[`{BASE}`](https://huggingface.co/{BASE})"
UNCURL_ARXIV = "2409.01483"
METHOD_ARXIV = {  # every registered method must be listed: its paper's arXiv id, or None for a baseline
    "uncurl": UNCURL_ARXIV,
    "reap": "2510.13999",
    "msmoe": "2310.01334",
    "hcsmoe": "2410.08589",
    "ean": "2504.05586",
    "naee": "2402.14800",
    "frequency": None,
    "random": None,
}
SUPER_EXPERTS_ARXIV = "2507.23279"
LICENSE_TEXT = "Tiny licence text, for the tests only.\n"


def source_with(switch_dir: Path, tmp_path: Path, readme: str | bytes | None = None, **files: str) -> Path:
    """A copy of the tiny Switch checkpoint with ``README.md`` (text or raw bytes) and other files added."""
    folder = tmp_path / "source"
    shutil.copytree(switch_dir, folder)
    if isinstance(readme, bytes):
        (folder / "README.md").write_bytes(readme)
    elif readme is not None:
        (folder / "README.md").write_text(readme, encoding="utf-8")
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def prune_card(source: Path, out: Path, calibration_jsonl: Path, **settings) -> tuple[ModelCard, str]:
    settings = {"factor": 4, "calibration_file": calibration_jsonl, "progress": False, **settings}
    result = prune_flat(source, output_dir=out, **settings)
    text = (result.output_dir / "README.md").read_text(encoding="utf-8")
    assert validate_card_metadata(text) == []  # what the Hub checks on push
    assert str(source.parent) not in text  # no local paths in a public card
    return ModelCard(text), text


def section(text: str, heading: str) -> str:
    return text.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0].strip("\n")


# -- licence -------------------------------------------------------------------------------------------------------


def test_an_apache_source_gives_an_apache_card_and_its_licence_file(switch_dir, calibration_jsonl, tmp_path):
    readme = "---\nlicense: apache-2.0\nlanguage: en\n---\n\n# Switch\n"
    source = source_with(switch_dir, tmp_path, readme, LICENSE=LICENSE_TEXT)
    card, text = prune_card(source, tmp_path / "out", calibration_jsonl, base_model_id=BASE)
    data = card.data.to_dict()
    assert data["license"] == "apache-2.0"
    assert "license_name" not in data and "license_link" not in data
    assert f"Licence: inherited from {BASE_LINK} (apache-2.0)." in card.text
    assert (tmp_path / "out" / "LICENSE").read_text(encoding="utf-8") == LICENSE_TEXT  # the licence text travels
    assert verify_checkpoint(tmp_path / "out", forward=False).ok  # ... inside the manifest


def test_an_other_licence_keeps_its_name_and_link(switch_dir, calibration_jsonl, tmp_path):
    readme = "---\nlicense: other\nlicense_name: tiny-community-licence\nlicense_link: LICENSE.md\n---\n# Switch\n"
    source = source_with(switch_dir, tmp_path, readme, **{"LICENSE.md": LICENSE_TEXT})
    card, _ = prune_card(source, tmp_path / "out", calibration_jsonl)
    data = card.data.to_dict()
    assert (data["license"], data["license_name"], data["license_link"]) == (
        "other", "tiny-community-licence", "LICENSE.md")
    assert ModelCardData(**data).to_dict() == data
    assert ("Licence: inherited from `source` (a local checkpoint) (other: `tiny-community-licence`, "
            "[`LICENSE.md`](LICENSE.md)).") in card.text
    assert (tmp_path / "out" / "LICENSE.md").read_text(encoding="utf-8") == LICENSE_TEXT  # the relative link works


def test_a_relative_licence_link_the_source_lacks_points_at_the_base_repo(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: other\nlicense_name: x\nlicense_link: ./LICENSE\n---\n")
    assert read_source_license(tmp_path, BASE) == SourceLicense(
        "other", "x", f"https://huggingface.co/{BASE}/blob/main/LICENSE", "README.md")
    assert read_source_license(tmp_path).link == "./LICENSE"  # no Hub id: kept as written


def test_no_licence_is_unknown_and_the_card_says_to_check_the_base_terms(switch_dir, calibration_jsonl, tmp_path):
    source = source_with(switch_dir, tmp_path, "---\nlanguage: en\n---\n# Switch\n")
    card, _ = prune_card(source, tmp_path / "out", calibration_jsonl, base_model_id=BASE)
    assert card.data.to_dict()["license"] == "unknown"  # the Hub's identifier for an unknown licence
    licence = section(card.text, "## Licence")
    assert licence.startswith("Licence: **unknown**")
    assert "check the base model's terms before publishing" in licence and BASE_LINK in licence
    assert not (tmp_path / "out" / "LICENSE").exists()


@pytest.mark.parametrize("readme", [
    "# A card without front matter\n\nlicense: apache-2.0\n",
    "---\nlicense: [apache-2.0\n---\n# malformed YAML\n",
    "---\nlicense: apache-2.0\n",  # front matter never closed
    "---\n- a list, not a mapping\n---\n",
    "---\nlicense:\n  - apache-2.0\n---\n",  # not a string: the Hub rejects it
    "---\nlicense: unknown\n---\n",
    "",
    b"---\nlicense: apache-2.0\xff\xfe\n---\n",  # not UTF-8
], ids=["no-front-matter", "malformed-yaml", "unclosed", "not-a-mapping", "list", "unknown", "empty", "not-utf8"])
def test_a_source_readme_in_an_odd_state_means_unknown(readme, tmp_path):
    if isinstance(readme, bytes):
        (tmp_path / "README.md").write_bytes(readme)
    else:
        (tmp_path / "README.md").write_text(readme, encoding="utf-8")
    found = read_source_license(tmp_path, BASE)
    assert not found.known and found.metadata() == {"license": "unknown"}


def test_a_readme_folder_or_no_source_folder_means_unknown(tmp_path):
    (tmp_path / "README.md").mkdir()
    assert not read_source_license(tmp_path).known
    assert not read_source_license(tmp_path / "missing").known and not read_source_license(None).known


def test_a_malformed_source_readme_does_not_stop_the_run(switch_dir, calibration_jsonl, tmp_path):
    source = source_with(switch_dir, tmp_path, "---\nlicense: [apache\n  - : :\n---\n# broken\n")
    card, _ = prune_card(source, tmp_path / "out", calibration_jsonl)
    assert card.data.license == "unknown"
    assert "front matter of the source checkpoint's README.md is not valid YAML" in section(card.text, "## Licence")


def test_the_config_licence_is_used_when_the_readme_has_none(tmp_path):
    config = {"model_type": "switch_transformers", "license": "Apache-2.0"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert read_source_license(tmp_path) == SourceLicense("apache-2.0", found_in="config.json")
    (tmp_path / "config.json").write_text(json.dumps({**config, "license": "Tiny Research Licence"}))
    assert read_source_license(tmp_path) == SourceLicense("other", "Tiny Research Licence", found_in="config.json")
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n")
    assert read_source_license(tmp_path).metadata() == {"license": "mit"}  # the card comes first


def test_the_zoo_checkpoints_state_no_licence_so_their_pruned_cards_say_unknown():
    """The embedded models ship no README.md and no licence in their config.json (as of writing)."""
    zoo = ZOO_TOKENIZER.parent
    for folder in sorted(p for p in zoo.iterdir() if p.is_dir()):
        assert not read_source_license(folder).known, folder.name


# -- citations -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain_facts(switch_dir, tmp_path_factory, calibration_jsonl) -> CardFacts:
    """The facts of one real run (frequency x4), for rendering cards of other plans without pruning again."""
    out = tmp_path_factory.mktemp("provenance") / "plain"
    result = prune_flat(switch_dir, output_dir=out, factor=4, calibration_file=calibration_jsonl, progress=False)
    return CardFacts(
        plan=result.plan, experts_before=result.experts_before, experts_after=result.experts_after,
        params_before=result.params_before, params_after=result.params_after,
        disk_bytes_before=result.disk_bytes_before, disk_bytes_after=result.disk_bytes_after,
        command="uncurl prune switch", source_name="switch",
    )


def test_every_method_declares_a_well_formed_citation_or_none():
    assert sorted(METHOD_ARXIV) == available_methods()  # a new method must say which paper it follows
    for name in available_methods():
        citation = get_method(name).citation
        if METHOD_ARXIV[name] is None:
            assert citation is None, name
            continue
        fields = bibtex_fields(citation)
        assert {"title", "author", "year", "journal"} <= set(fields), name
        assert fields["journal"] == f"arXiv preprint arXiv:{METHOD_ARXIV[name]}", name
        assert fields["year"] == f"20{METHOD_ARXIV[name][:2]}", name  # arXiv ids start with the year
        laid_out = format_bibtex(citation)
        assert laid_out.count("{") == laid_out.count("}") and laid_out.endswith("\n}")
    assert bibtex_fields(get_method("uncurl").citation)["title"] == (
        "Revisiting {SMoE} Language Models by Evaluating Inefficiencies with Task Specific Expert Pruning")


@pytest.mark.parametrize("method", sorted(METHOD_ARXIV))
def test_the_card_cites_uncurl_and_the_methods_paper(method, plain_facts):
    facts = replace(plain_facts, plan=replace(plain_facts.plan, method=method, metadata={}))
    citation = section(str(build_card(facts)), "## Citation")
    block = citation.split("```bibtex\n", 1)[1].split("\n```", 1)[0]
    own = get_method(method).citation
    assert format_bibtex(get_method("uncurl").citation) in block and f"arXiv:{UNCURL_ARXIV}" in block
    entries = block.count("\n@") + 1
    if METHOD_ARXIV[method] is None:
        assert entries == 1 and f"The `{method}` method is a baseline with no paper of its own." in citation
    elif method == "uncurl":
        assert entries == 1 and "The `uncurl` method is UNCURL" in citation  # cited once
    else:
        assert entries == 2 and format_bibtex(own) in block and f"arXiv:{METHOD_ARXIV[method]}" in block
    assert SUPER_EXPERTS_ARXIV not in citation


def test_super_expert_protection_cites_su_et_al(switch_dir, calibration_jsonl, tmp_path):
    card, _ = prune_card(switch_dir, tmp_path / "on", calibration_jsonl, factor=2, method="ean",
                         method_kwargs={"protect_super_experts": True})
    citation = section(card.text, "## Citation")
    assert format_bibtex(SUPER_EXPERTS_CITATION) in citation and f"arXiv:{SUPER_EXPERTS_ARXIV}" in citation
    assert "arXiv:2504.05586" in citation and "Super-expert protection (`protect_super_experts=true`)" in citation
    off, _ = prune_card(switch_dir, tmp_path / "off", calibration_jsonl, factor=2, method="ean",
                        method_kwargs={"protect_super_experts": False})
    assert SUPER_EXPERTS_ARXIV not in off.text


def test_an_unregistered_method_still_gets_a_card_citing_uncurl(plain_facts):
    facts = replace(plain_facts, plan=replace(plain_facts.plan, method="not-installed-here"))
    citation = section(str(build_card(facts)), "## Citation")
    assert "`not-installed-here` is not registered in this installation" in citation and UNCURL_ARXIV in citation


# -- the recovery card's helpers -----------------------------------------------------------------------------------


def test_the_recovery_helpers_carry_the_pruned_cards_licence_and_sections(plain_facts):
    known = SourceLicense("other", "tiny", "https://example.com/licence", "README.md")
    card_text = str(build_card(replace(plain_facts, source_license=known)))
    data = ModelCardData(library_name="peft")
    carry_license(card_text, data)
    assert (data.license, data.license_name, data.license_link) == ("other", "tiny", "https://example.com/licence")
    sections = provenance_sections(card_text)
    assert sections.startswith("## Licence\n\nLicence: inherited from `switch` (a local checkpoint) (other: ")
    assert "\n## Citation\n" in sections and sections.endswith("```\n") and "## How it was made" not in sections
    assert license_from_card_text(card_text) == known

    data = ModelCardData()
    carry_license(None, data)  # no pruned card: unknown, and UNCURL is still cited
    assert data.to_dict() == {"license": "unknown"}
    assert "Licence: **unknown**" in provenance_sections(None) and UNCURL_ARXIV in provenance_sections(None)


# -- model-index: this model's own results only ----------------------------------------------------------------------


@pytest.mark.parametrize("family", ["switch_transformers", "qwen3_moe"])
def test_model_index_lists_only_the_pruned_models_results(family, switch_dir, tmp_path):
    if family == "switch_transformers":
        source, task = switch_dir, TASK
    else:
        source, task = decoder_folder(tmp_path / family, family, AutoTokenizer.from_pretrained(ZOO_TOKENIZER)), \
            "sentiment"
    result = prune_flat(source, output_dir=tmp_path / "out", factor=2, task=task, num_calibration_examples=8,
                        evaluate=True, eval_limit=6, progress=False, base_model_id=BASE)
    card = ModelCard.load(result.output_dir / "README.md")
    [entry] = card.data.to_dict()["model-index"]
    assert entry["name"] == card.data.model_name and len(entry["results"]) == 1
    [metric] = entry["results"][0]["metrics"]
    assert metric["value"] == result.eval_pruned.score and metric["name"] == result.eval_pruned.metric
    assert not any(r.metric_name.endswith(ORIGINAL_SUFFIX) for r in card.data.eval_results)
    original, pruned = result.eval_original.score, result.eval_pruned.score
    assert f"| {result.eval_pruned.metric} | {original:.4f} | {pruned:.4f} |" in card.text  # the original: body only
    assert card.data.pipeline_tag == ("text2text-generation" if family == "switch_transformers" else "text-generation")
