"""Shared fixtures: tiny Switch checkpoints (plain and with unreachable experts), a dense T5, calibration files.

Torch is pinned to one thread: on a 2-core machine shared with other jobs, OpenMP spin-waiting makes tiny
matmuls ~100x slower with 2 threads.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from huggingface_hub import constants  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

import uncurl_hf  # noqa: E402,F401  (registers the pruned model types)
from helpers import (  # noqa: E402
    BANNED_HALF,
    BANNED_UNEQUAL,
    CALIBRATION_TARGETS,
    CALIBRATION_TEXTS,
    make_tiny_switch,
    make_tiny_t5,
    write_calibration_file,
)

@pytest.fixture(scope="session")
def switch_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-init Switch checkpoint (8 experts, 2+2 sparse layers) with tokenizer. Do not modify."""
    return make_tiny_switch(tmp_path_factory.mktemp("models"), name="switch")


@pytest.fixture(scope="session")
def half_banned_switch_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Like ``switch_dir`` but experts ``BANNED_HALF`` can never be selected."""
    return make_tiny_switch(tmp_path_factory.mktemp("models"), name="switch-half", banned=BANNED_HALF)


@pytest.fixture(scope="session")
def unequal_banned_switch_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Like ``switch_dir`` but experts ``BANNED_UNEQUAL`` can never be selected."""
    return make_tiny_switch(tmp_path_factory.mktemp("models"), name="switch-unequal", banned=BANNED_UNEQUAL)


@pytest.fixture(scope="session")
def t5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny dense T5 checkpoint: a valid model that is not an MoE."""
    return make_tiny_t5(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def calibration_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 sentiment examples with targets (``text`` + ``target``)."""
    return write_calibration_file(
        tmp_path_factory.mktemp("data") / "calibration.jsonl", CALIBRATION_TEXTS, CALIBRATION_TARGETS
    )


@pytest.fixture(scope="session")
def calibration_txt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same 12 inputs as plain text, one per line (no targets)."""
    return write_calibration_file(tmp_path_factory.mktemp("data") / "calibration.txt", CALIBRATION_TEXTS)


@pytest.fixture(scope="session")
def hub_server(tmp_path_factory: pytest.TempPathFactory):
    """A Hub-compatible HTTP server on 127.0.0.1 and a free port (``tests/hub_server.py``), repos kept on disk.

    Tokens: ``hf_test_token`` is user ``tester``, ``hf_other_token`` is user ``other``. Clients reach it through
    ``HF_ENDPOINT=hub_server.url`` (subprocesses) or ``endpoint=`` / the ``hub_env`` fixture of ``test_hub.py``.
    """
    from hub_server import HubServer

    with HubServer(tmp_path_factory.mktemp("hub"), tokens={"hf_test_token": "tester", "hf_other_token": "other"}) as hub:
        yield hub


@pytest.fixture
def hub(hub_server, monkeypatch, tmp_path):
    """The test Hub server as this process's Hub (online), with an empty cache and no saved token.

    huggingface_hub read ``HF_ENDPOINT``/``HF_HUB_OFFLINE`` at import; the resolver reads them at call time, so this
    sets the environment and turns off only the import-time offline flag, Xet and the agent registry."""
    from huggingface_hub.utils import _detect_agent

    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(_detect_agent, "_registry", _detect_agent._EMPTY_REGISTRY)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return hub_server
