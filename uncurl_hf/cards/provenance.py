"""Where a pruned checkpoint comes from, as its card states it: the base model's Hub id, its licence, and the papers
to cite (UNCURL, the method's own, super-expert protection when it was on).

Licence. A pruned checkpoint is a derivative of the base model's weights, so it carries the base model's licence.
:func:`read_source_license` reads it from the source folder: the front matter of its ``README.md`` (a Hub model
card: ``license``, and ``license_name`` / ``license_link`` for ``license: other``), else a ``license`` string in its
``config.json``. A README without front matter, with malformed YAML, unreadable or not UTF-8 never fails a run: the
licence is then unknown. An unknown licence is written as ``license: unknown``, the identifier the Hub lists for it
(``docs/hub/repositories-licenses.md``; ``ModelCardData`` itself omits ``license`` when it is ``None``, which says
nothing), and the card body tells the user to check the base model's terms before publishing. The licence files of
the source (``LICENSE``, ``LICENSE.md``, ... and a relative ``license_link``) are copied beside the weights
(:func:`copy_license_files`), as licences such as Apache-2.0 require of a redistributed derivative; a relative link
whose file the source folder lacks points at the base repository on the Hub when its id is known.

Citations. Each method declares its paper once, as BibTeX in its ``citation`` class attribute
(:mod:`uncurl_hf.methods`); UNCURL's is the ``uncurl`` method's, cited by every card since uncurl-hf implements it;
super-expert protection cites ``uncurl_hf.methods.super_experts.CITATION`` when the plan's method options turned it
on. :func:`format_bibtex` lays a one-line entry out one field a line.

The recovery card (:mod:`uncurl_hf.cards.recovery_card`) carries the pruned card's licence and sections with
:func:`carry_license` and :func:`provenance_sections`.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

UNKNOWN_LICENSE = "unknown"  # the Hub's licence identifier for "unknown"
OTHER_LICENSE = "other"
LICENSE_HEADING = "## Licence"
CITATION_HEADING = "## Citation"
_FRONT_MATTER = re.compile(r"^(\s*---(?:\r\n|\r|\n))([\S\s]*?)((?:\r\n|\r|\n)---[ \t]*(\r\n|\n|$))")  # the Hub's
_LICENSE_FILE = re.compile(r"^licen[cs]e(\.(md|txt|rst))?$", re.IGNORECASE)
_HUB_CACHE_DIR = re.compile(r"^models--([\w.-]+)--([\w.-]+)$")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_LICENSE_ID = re.compile(r"^[a-z0-9][a-z0-9.+-]*$")
_BIBTEX = re.compile(r"^@(\w+)\s*\{\s*([^,\s]+)\s*,(.*)\}\s*$", re.DOTALL)


def hub_model_id(path: str | Path) -> str | None:
    """The Hub id of a model folder when it can be known: ``org/name`` for a folder in the HF cache, else ``None``.

    ``hf download org/name`` stores ``.../models--org--name/snapshots/<sha>``; a ``--local-dir`` copy loses the id,
    so pass ``base_model_id`` explicitly for those.
    """
    parts = Path(path).expanduser().resolve().parts
    for i, part in enumerate(parts):
        match = _HUB_CACHE_DIR.match(part)
        if match and i + 1 < len(parts) and parts[i + 1] == "snapshots":
            return f"{match.group(1)}/{match.group(2)}"
    return None


def is_hub_id(value: str | None) -> bool:
    """Whether ``value`` looks like ``namespace/name`` (and is not an existing local path)."""
    return bool(value) and bool(_HUB_ID.match(value)) and not Path(value).exists()


# -- licence -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceLicense:
    """The base model's licence as found in the source folder; ``license=None``: unknown (``reason`` says why)."""

    license: str | None = None  # a Hub identifier: "apache-2.0", "other", ...
    name: str | None = None  # license_name (for "other")
    link: str | None = None  # license_link (for "other")
    found_in: str | None = None  # "README.md" or "config.json"
    reason: str = "no licence was found in the source checkpoint's README.md front matter or config.json"

    @property
    def known(self) -> bool:
        return self.license is not None

    def metadata(self) -> dict[str, str]:
        """The card metadata fields: ``license`` (``unknown`` when unknown), ``license_name``, ``license_link``."""
        if not self.known:
            return {"license": UNKNOWN_LICENSE}
        fields = {"license": self.license, "license_name": self.name, "license_link": self.link}
        return {key: value for key, value in fields.items() if value}

    def display(self) -> str:
        """``apache-2.0``, or ``other: NAME, LINK`` for a named licence."""
        extra = ", ".join(part for part in (self.name and f"`{self.name}`", self.link and _link(self.link)) if part)
        return f"{self.license}: {extra}" if self.known and extra else str(self.license or UNKNOWN_LICENSE)


def license_from_card_text(text: str | None, where: str = "README.md") -> SourceLicense | None:
    """The licence in a model card's front matter; ``None`` when it names none. Never raises."""
    import yaml

    if not text:
        return None
    match = _FRONT_MATTER.match(text)
    if match is None:
        return None
    try:
        data = yaml.safe_load(match.group(2))
    except yaml.YAMLError:
        logger.warning("the front matter of the source's %s is not valid YAML; its licence is unknown", where)
        return SourceLicense(reason=f"the front matter of the source checkpoint's {where} is not valid YAML")
    if not isinstance(data, dict):
        return None
    value = data.get("license")
    if not isinstance(value, str) or not value.strip() or value.strip().lower() == UNKNOWN_LICENSE:
        return None
    return SourceLicense(license=value.strip(), name=_text(data.get("license_name")),
                         link=_text(data.get("license_link")), found_in=where)


def read_source_license(source: str | Path | None, base_model_id: str | None = None) -> SourceLicense:
    """The licence of the checkpoint in the folder ``source`` (README.md front matter, then config.json)."""
    folder = Path(source).expanduser() if source is not None else None
    if folder is None or not folder.is_dir():
        return SourceLicense()
    found = license_from_card_text(_read_text(folder / "README.md"))
    if found is None or not found.known:
        from_config = _license_from_config(folder / "config.json")
        found = from_config or found or SourceLicense()
    if found.link and not _is_url(found.link) and not _local_file(folder, found.link) and base_model_id:
        link = f"https://huggingface.co/{base_model_id}/blob/main/{found.link.removeprefix('./')}"
        found = SourceLicense(found.license, found.name, link, found.found_in)
    return found


def copy_license_files(source: str | Path | None, target: str | Path, found: SourceLicense | None = None) -> list[str]:
    """Copy the source's licence files (``LICENSE``, ``LICENCE.md``, ..., a relative ``license_link``) into
    ``target``; never overwrites a file already there. Returns the names copied."""
    if source is None or not Path(source).is_dir():
        return []
    source, target = Path(source), Path(target)
    names = {p.name for p in source.iterdir() if _LICENSE_FILE.match(p.name) and p.is_file()}
    if found is not None and found.link and _local_file(source, found.link):
        names.add(Path(found.link).name)
    copied = []
    for name in sorted(names):
        if not (target / name).exists():
            shutil.copyfile(source / name, target / name)
            copied.append(name)
    return copied


def license_section(found: SourceLicense | None, base_display: str) -> str:
    """The card's ``## Licence`` section (``base_display``: how the card names the base model)."""
    found = found or SourceLicense()
    if found.known:
        where = f", as stated in the source checkpoint's `{found.found_in}`" if found.found_in else ""
        text = (f"Licence: inherited from {base_display} ({found.display()}). A pruned checkpoint is derived from the "
                f"base model's weights, so the base model's licence{where}, applies to it.")
    else:
        text = (f"Licence: **unknown** — {found.reason}, so the metadata says `license: {UNKNOWN_LICENSE}`. This "
                f"checkpoint is derived from the weights of {base_display}: check the base model's terms before "
                "publishing or redistributing it, and set `license` in this card to match them.")
    return f"{LICENSE_HEADING}\n\n{text}\n"


# -- citations -----------------------------------------------------------------------------------------------------


def uncurl_citation() -> str:
    """UNCURL's BibTeX, declared on the ``uncurl`` method."""
    from uncurl_hf.methods import get_method

    citation = get_method("uncurl").citation
    assert citation, "the uncurl method declares UNCURL's citation"
    return citation


def citations(method: str, method_options: Mapping[str, Any] | None = None) -> tuple[list[str], str]:
    """``(BibTeX entries, sentence)`` a card cites for a plan made by ``method`` with ``method_options``: UNCURL,
    the method's paper, Su et al. when super-expert protection was on; the sentence says which is which."""
    from uncurl_hf.methods import get_method
    from uncurl_hf.methods.super_experts import CITATION as SUPER_EXPERTS

    entries = [uncurl_citation()]
    try:
        own = get_method(method).citation
    except Exception:  # noqa: BLE001 - a plan from a method that is not installed here
        sentence = f"The method `{method}` is not registered in this installation, so its paper is not cited here."
    else:
        if own is None:
            sentence = f"The `{method}` method is a baseline with no paper of its own."
        elif own == entries[0]:
            sentence = f"The `{method}` method is UNCURL ({short_reference(own)})."
        else:
            sentence = f"The `{method}` method follows {short_reference(own)}."
            entries.append(own)
    if _truthy((method_options or {}).get("protect_super_experts")):
        sentence += f" Super-expert protection (`protect_super_experts=true`) follows {short_reference(SUPER_EXPERTS)}."
        entries.append(SUPER_EXPERTS)
    return entries, sentence


def citation_section(method: str, method_options: Mapping[str, Any] | None = None) -> str:
    """The card's ``## Citation`` section: who to cite, then the BibTeX entries in one ``bibtex`` block."""
    entries, sentence = citations(method, method_options)
    bibtex = "\n\n".join(format_bibtex(entry) for entry in entries)
    return (f"{CITATION_HEADING}\n\nuncurl-hf implements UNCURL ({short_reference(entries[0])}); cite it when you use "
            f"this checkpoint. {sentence}\n\n```bibtex\n{bibtex}\n```\n")


def provenance_markdown(found: SourceLicense | None, base_display: str, method: str,
                        method_options: Mapping[str, Any] | None = None) -> str:
    """The ``## Licence`` and ``## Citation`` sections that close a pruned model's card."""
    return f"{license_section(found, base_display)}\n{citation_section(method, method_options)}"


def format_bibtex(entry: str) -> str:
    """A BibTeX entry laid out one field a line (``@type{key,`` / ``  field = {value},`` / ``}``); an entry it
    cannot parse is returned unchanged."""
    match = _BIBTEX.match(entry.strip())
    if match is None:
        return entry.strip()
    kind, key, body = match.groups()
    fields = [field.strip() for field in _split_top_level(body) if field.strip()]
    lines = [f"@{kind}{{{key},"]
    for i, field in enumerate(fields):
        name, _, value = field.partition("=")
        lines.append(f"  {name.strip()} = {value.strip()}" + ("," if i < len(fields) - 1 else ""))
    return "\n".join([*lines, "}"])


def bibtex_fields(entry: str) -> dict[str, str]:
    """``{field: value}`` of a BibTeX entry (outer braces of a value removed), plus ``ENTRYTYPE`` and ``ID``."""
    match = _BIBTEX.match(entry.strip())
    if match is None:
        return {}
    kind, key, body = match.groups()
    fields = {"ENTRYTYPE": kind, "ID": key}
    for field in _split_top_level(body):
        name, sep, value = field.partition("=")
        if sep:
            value = value.strip()
            fields[name.strip().lower()] = value[1:-1] if value.startswith("{") and value.endswith("}") else value
    return fields


def short_reference(entry: str) -> str:
    """``Lasby et al. 2025, arXiv 2510.13999`` from a BibTeX entry."""
    fields = bibtex_fields(entry)
    authors = [a.strip() for a in fields.get("author", "").split(" and ") if a.strip()]
    first = authors[0].split(",")[0].strip() if authors else fields.get("ID", "?")
    who = first if len(authors) == 1 else f"{first} et al."
    arxiv = re.search(r"arXiv:\s*(\d{4}\.\d{4,5})", entry)
    return f"{who} {fields.get('year', '')}".strip() + (f", arXiv {arxiv.group(1)}" if arxiv else "")


# -- the recovery card ---------------------------------------------------------------------------------------------


def carry_license(source_card: str | None, data: Any) -> None:
    """Set ``data``'s (a ``ModelCardData``) ``license`` / ``license_name`` / ``license_link`` to those of the
    pruned model's card text ``source_card`` (``unknown`` when it has none)."""
    found = license_from_card_text(source_card) or SourceLicense()
    fields = found.metadata()
    data.license = fields["license"]
    data.license_name = fields.get("license_name")
    data.license_link = fields.get("license_link")


def provenance_sections(source_card: str | None) -> str:
    """The ``## Licence`` and ``## Citation`` sections of the pruned model's card text, verbatim; for a card
    without them (none, or written before uncurl-hf wrote them), an unknown-licence section and UNCURL's citation."""
    body = _FRONT_MATTER.sub("", source_card or "", count=1)
    sections = [_section(body, LICENSE_HEADING), _section(body, CITATION_HEADING)]
    if all(sections):
        return "\n".join(sections)
    found = license_from_card_text(source_card) or SourceLicense(
        reason="the pruned model's card states no licence")
    cite = (f"{CITATION_HEADING}\n\nuncurl-hf implements UNCURL ({short_reference(uncurl_citation())}); cite it "
            f"when you use this checkpoint.\n\n```bibtex\n{format_bibtex(uncurl_citation())}\n```\n")
    return "\n".join([sections[0] or license_section(found, "the base model"), sections[1] or cite])


# -- helpers -------------------------------------------------------------------------------------------------------


def _section(body: str, heading: str) -> str:
    """From the line ``heading`` to the next ``## `` heading (or the end), ending with one newline; '' if absent."""
    match = re.search(rf"^{re.escape(heading)}[ \t]*$", body, flags=re.MULTILINE)
    if match is None:
        return ""
    rest = body[match.start():]
    following = re.search(r"^## ", rest[len(heading):], flags=re.MULTILINE)
    text = rest[: len(heading) + following.start()] if following else rest
    return text.rstrip("\n") + "\n"


def _split_top_level(body: str) -> list[str]:
    parts, depth, start, quoted = [], 0, 0, False
    for i, char in enumerate(body):
        if char == '"' and depth == 0:
            quoted = not quoted
        elif char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        elif char == "," and depth == 0 and not quoted:
            parts.append(body[start:i])
            start = i + 1
    parts.append(body[start:])
    return parts


def _license_from_config(path: Path) -> SourceLicense | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("license")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(value, str) or not value.strip() or value.strip().lower() == UNKNOWN_LICENSE:
        return None
    value = value.strip()
    if _LICENSE_ID.match(value.lower()):
        return SourceLicense(license=value.lower(), found_in="config.json")
    return SourceLicense(license=OTHER_LICENSE, name=value, found_in="config.json")  # free text: a named licence


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _text(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def _truthy(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() in ("true", "1", "yes"))


def _is_url(link: str) -> bool:
    return bool(re.match(r"^[a-z][a-z0-9+.-]*://", link, flags=re.IGNORECASE))


def _local_file(folder: Path, link: str) -> bool:
    """Whether ``link`` is a file name (no directories) of a file in ``folder``."""
    name = link.removeprefix("./")
    return "/" not in name and "\\" not in name and name not in ("", ".", "..") and (folder / name).is_file()


def _link(link: str) -> str:
    return f"[{link}]({link})" if _is_url(link) else f"[`{link}`]({link})"


__all__ = [
    "SourceLicense",
    "UNKNOWN_LICENSE",
    "carry_license",
    "citation_section",
    "citations",
    "copy_license_files",
    "format_bibtex",
    "hub_model_id",
    "is_hub_id",
    "license_from_card_text",
    "license_section",
    "provenance_markdown",
    "provenance_sections",
    "read_source_license",
    "short_reference",
]
