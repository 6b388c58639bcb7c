"""Hub-native outputs over real HTTP, offline: push to the test Hub server, read back in a clean interpreter.

The round trip (one module fixture): prune -> ``uncurl push`` (the CLI, given the Hub only through ``HF_ENDPOINT``
and ``HF_TOKEN``) -> a stock export pushed by ``prune(push_to_hub=True)`` -> a *clean* interpreter (``python -I -S``
with only site-packages on ``sys.path``, so ``import uncurl_hf`` fails) whose huggingface_hub reads ``HF_ENDPOINT``
at import, with a fresh ``HF_HOME``, loads the local folder and both repos with
``AutoModelForSeq2SeqLM.from_pretrained`` -> identical logits and card metadata.
Pushing runs in this process (a subprocess would pay ~5-10 s of imports on a shared 2-core machine): huggingface_hub
read ``HF_ENDPOINT``/``HF_HUB_OFFLINE`` at import, so ``hub_env`` re-points its constants at the server, while
uncurl-hf's own endpoint/token lookup is exercised through the environment variables.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import site
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import hash_tree
from huggingface_hub import HfApi, ModelCard, constants
from huggingface_hub.errors import RepositoryNotFoundError
from safetensors.torch import load_file
from transformers import AutoModelForSeq2SeqLM

import uncurl_hf
from uncurl_hf.cli.main import main
from uncurl_hf.errors import HubAuthError, HubConnectionError, HubError, RepoExistsError
from uncurl_hf.io.hub import commit_message, push_folder, resolve_endpoint
from helpers import prune_flat

TOKEN = "hf_test_token"
REPO = Path(__file__).resolve().parents[1]
INPUT_IDS = [[4, 5, 6, 7, 1], [8, 9, 10, 1, 0]]
DECODER_IDS = [[0, 4, 5], [0, 8, 9]]

# Runs in `python -I -S`: no site processing (so no editable-install finder), no cwd/script dir on sys.path.
CLEAN_LOADER = textwrap.dedent(
    """
    import json, sys
    site_packages, local_dir, pruned_repo, stock_repo, out = sys.argv[1:6]
    sys.path.append(site_packages)
    try:
        import uncurl_hf  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("uncurl_hf is importable in the clean interpreter")
    import torch
    from huggingface_hub import ModelCard
    from safetensors.torch import save_file
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    inputs = {"input_ids": torch.tensor(%s), "decoder_input_ids": torch.tensor(%s)}
    inputs["attention_mask"] = (inputs["input_ids"] != 0).long()
    logits, report = {}, {}
    for name, source, remote_code in (
        ("local", local_dir, True), ("pruned_repo", pruned_repo, True), ("stock_repo", stock_repo, False)
    ):
        model = AutoModelForSeq2SeqLM.from_pretrained(source, trust_remote_code=remote_code).eval()
        with torch.no_grad():
            logits[name] = model(**inputs).logits.contiguous()
        report[name] = {"class": type(model).__module__ + "." + type(model).__name__,
                        "model_type": model.config.model_type}
    tokenizer = AutoTokenizer.from_pretrained(pruned_repo)
    report["tokens"] = tokenizer("the movie was good").input_ids
    report["card"] = ModelCard.load(pruned_repo).data.to_dict()
    report["uncurl_modules"] = sorted(m for m in sys.modules if m.startswith("uncurl_hf"))
    save_file(logits, out + "/logits.safetensors")
    with open(out + "/report.json", "w") as f:
        json.dump(report, f)
    """
    % (INPUT_IDS, DECODER_IDS)
)


def _client_env(hub_url: str, hf_home: Path, token: str | None = TOKEN) -> dict[str, str]:
    """Environment of a fresh client process: only HF_ENDPOINT (and HF_TOKEN) point it at the test Hub."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_"))}
    env.update(
        HF_ENDPOINT=hub_url,
        HF_HOME=str(hf_home),
        HF_HUB_OFFLINE="0",
        TRANSFORMERS_OFFLINE="0",
        HF_HUB_DISABLE_XET="1",  # the test server speaks LFS, not Xet
        HF_HUB_DISABLE_TELEMETRY="1",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(REPO),
    )
    if token:
        env["HF_TOKEN"] = token
    return env


def _point_at(mp: pytest.MonkeyPatch, hub, token_path: Path) -> None:
    """Point this process's huggingface_hub at the test server (it read HF_ENDPOINT and HF_HUB_OFFLINE at import).

    The agent-harness registry is pinned to empty so that nothing is fetched from (or cached for) the default
    endpoint; no token file is visible, and Xet is off because the server speaks LFS.
    """
    from huggingface_hub.utils import _detect_agent

    mp.setenv("HF_ENDPOINT", hub.url)
    mp.setattr(constants, "ENDPOINT", hub.url)
    mp.setattr(constants, "HF_HUB_OFFLINE", False)
    mp.setattr(constants, "HF_HUB_DISABLE_XET", True)
    mp.setattr(constants, "HF_TOKEN_PATH", str(token_path))
    mp.setattr(_detect_agent, "_registry", _detect_agent._EMPTY_REGISTRY)
    mp.delenv("HF_TOKEN", raising=False)
    mp.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)


@pytest.fixture
def hub_env(hub_server, monkeypatch, tmp_path):
    """The test server as this process's Hub, with no token configured."""
    _point_at(monkeypatch, hub_server, tmp_path / "no-token")
    return hub_server


@pytest.fixture
def small_output(switch_dir, tmp_path):
    """A folder that looks like an output (config, weights, a plan) without running a pruning."""
    folder = tmp_path / "out"
    shutil.copytree(switch_dir, folder)
    (folder / "uncurl_plan.json").write_text(json.dumps({"method": "random", "factor": 4.0, "layers": []}))
    return folder


@pytest.fixture(scope="module")
def round_trip(hub_server, switch_dir, calibration_jsonl, tmp_path_factory):
    root = tmp_path_factory.mktemp("roundtrip")
    common = dict(factor=2, method="frequency", calibration_file=calibration_jsonl, seed=4, progress=False)
    pruned = prune_flat(switch_dir, output_dir=root / "pruned", base_model_id="google/switch-base-8", **common)
    before = hash_tree(pruned.output_dir)

    with pytest.MonkeyPatch.context() as mp:
        _point_at(mp, hub_server, root / "no-token")
        # 1. `uncurl push`, told about the Hub only by HF_ENDPOINT / HF_TOKEN.
        mp.setenv("HF_TOKEN", TOKEN)
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            assert main(["push", str(pruned.output_dir), "--repo-id", "tester/tiny-pruned"]) == 0
        mp.delenv("HF_TOKEN")
        # 2. prune(..., export="stock", push_to_hub=True) with an explicit token.
        stock = prune_flat(
            switch_dir, output_dir=root / "stock", export="stock", push_to_hub=True, repo_id="tester/tiny-stock",
            hub_token=TOKEN, **common,
        )

    # 3. A clean interpreter without uncurl-hf and with an empty cache reads everything back.
    clean = subprocess.run(
        [sys.executable, "-I", "-S", "-c", CLEAN_LOADER, site.getsitepackages()[0], str(pruned.output_dir),
         "tester/tiny-pruned", "tester/tiny-stock", str(root)],
        env=_client_env(hub_server.url, root / "clean-home", token=None), cwd=root,
        capture_output=True, text=True, timeout=180,
    )
    assert clean.returncode == 0, clean.stderr[-3000:]
    return {
        "pruned": pruned, "stock": stock, "push_stdout": stdout.getvalue(), "hash_before": before,
        "logits": load_file(str(root / "logits.safetensors")),
        "report": json.loads((root / "report.json").read_text()),
    }


def _expected_logits(folder: Path) -> torch.Tensor:
    model = AutoModelForSeq2SeqLM.from_pretrained(folder).eval()
    inputs = {"input_ids": torch.tensor(INPUT_IDS), "decoder_input_ids": torch.tensor(DECODER_IDS)}
    inputs["attention_mask"] = (inputs["input_ids"] != 0).long()
    with torch.no_grad():
        return model(**inputs).logits


def test_push_uploads_every_file_with_a_commit_naming_method_and_factor(round_trip, hub_server):
    out = round_trip["pruned"].output_dir
    assert hash_tree(out) == round_trip["hash_before"]  # pushing only reads the folder
    local = hash_tree(out)
    head = hub_server.head("tester/tiny-pruned")
    assert set(head.files) == set(local) | {".gitattributes"}
    for name in local:
        assert hub_server.read_file("tester/tiny-pruned", name) == (out / name).read_bytes()
    assert head.files["model.safetensors"].lfs and not head.files["config.json"].lfs  # both upload paths used
    assert head.title == commit_message(out) == "uncurl-hf: prune experts with frequency, factor 2 (32 -> 16 experts)"
    assert head.oid in round_trip["push_stdout"]
    stock_head = hub_server.head("tester/tiny-stock")
    assert round_trip["stock"].push.commit_oid == stock_head.oid and "factor 2" in stock_head.title
    # prune(push_to_hub=True) knows the repo id when it writes the card, so the usage snippet names it
    assert 'from_pretrained("tester/tiny-stock")' in hub_server.read_file("tester/tiny-stock", "README.md").decode()
    assert hub_server.unhandled == []  # the whole round trip stayed inside the implemented Hub API


def test_from_pretrained_repo_id_gives_identical_logits(round_trip):
    expected = _expected_logits(round_trip["pruned"].output_dir)
    logits = round_trip["logits"]
    torch.testing.assert_close(logits["pruned_repo"], expected, rtol=0, atol=0)
    torch.testing.assert_close(logits["local"], expected, rtol=0, atol=0)
    torch.testing.assert_close(logits["stock_repo"], _expected_logits(round_trip["stock"].output_dir), rtol=0, atol=0)
    # pruned and stock exports of the same plan compute the same function
    torch.testing.assert_close(logits["stock_repo"], logits["pruned_repo"], rtol=0, atol=0)


def test_loading_anywhere_needs_no_uncurl_hf(round_trip):
    report = round_trip["report"]
    assert report["uncurl_modules"] == []
    for name in ("local", "pruned_repo"):  # remote code shipped in the folder / repo (auto_map)
        assert report[name]["model_type"] == "pruned_switch_transformers"
        assert report[name]["class"].startswith("transformers_modules.")
    assert report["stock_repo"] == {
        "class": "transformers.models.switch_transformers.modeling_switch_transformers."
        "SwitchTransformersForConditionalGeneration",
        "model_type": "switch_transformers",
    }
    config = json.loads((round_trip["pruned"].output_dir / "config.json").read_text())
    for target in config["auto_map"].values():
        module_file = round_trip["pruned"].output_dir / (target.split(".")[0] + ".py")
        assert module_file.is_file() and "uncurl_hf" not in module_file.read_text()


def test_card_metadata_survives_the_round_trip(round_trip):
    local = ModelCard.load(round_trip["pruned"].output_dir / "README.md").data.to_dict()
    remote = round_trip["report"]["card"]
    assert remote == json.loads(json.dumps(local))
    assert remote["base_model"] == "google/switch-base-8" and remote["base_model_relation"] == "finetune"
    assert round_trip["report"]["tokens"][-1] == 1  # the tokenizer came along (eos appended)


def test_endpoint_is_read_from_the_environment_at_call_time(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://hub.example.invalid:8080/")
    assert resolve_endpoint() == "http://hub.example.invalid:8080"
    assert resolve_endpoint("http://explicit") == "http://explicit"


def test_no_token_is_a_clear_error(hub_env, small_output):
    before = hash_tree(small_output)
    with pytest.raises(HubAuthError, match="HF_TOKEN.*hf auth login"):
        push_folder(small_output, "tester/no-token")
    with pytest.raises(HubAuthError, match="rejected the token"):
        push_folder(small_output, "tester/bad-token", token="hf_wrong")
    assert hash_tree(small_output) == before


def test_env_token_and_existing_repo_rules(hub_env, small_output, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # honoured without --token
    first = push_folder(small_output, "tester/exists")
    assert first.created and hub_env.head("tester/exists").title == "uncurl-hf: prune experts with random, factor 4 (0 -> 0 experts)"
    with pytest.raises(RepoExistsError, match="--exist-ok.*--overwrite"):
        push_folder(small_output, "tester/exists")

    HfApi(endpoint=hub_env.url, token=TOKEN).upload_file(
        path_or_fileobj=b"stale", path_in_repo="stale.txt", repo_id="tester/exists", commit_message="stale"
    )
    (small_output / "extra.json").write_text("{}")
    kept = push_folder(small_output, "tester/exists", exist_ok=True)
    assert not kept.created and {"stale.txt", "extra.json"} <= set(hub_env.head("tester/exists").files)
    push_folder(small_output, "tester/exists", overwrite=True)
    files = set(hub_env.head("tester/exists").files)
    assert "stale.txt" not in files and {"extra.json", ".gitattributes", "config.json"} <= files

    with pytest.raises(HubAuthError, match="403"):
        push_folder(small_output, "other/not-mine")  # tester may not create repos in other's namespace

    assert push_folder(small_output, "tester/secret", private=True).created
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub_env.url).model_info("tester/secret", token=False)
    assert HfApi(endpoint=hub_env.url).model_info("tester/secret", token=TOKEN).private


def test_connection_refused_and_offline_keep_the_folder(hub_env, small_output, monkeypatch):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    before = hash_tree(small_output)
    with pytest.raises(HubConnectionError, match="Could not reach the Hub at .*HF_ENDPOINT"):
        push_folder(small_output, "tester/unreachable", token=TOKEN, endpoint=closed)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubConnectionError, match="HF_HUB_OFFLINE"):
        push_folder(small_output, "tester/offline", token=TOKEN)
    assert hash_tree(small_output) == before


def test_prune_checks_the_hub_before_pruning(hub_env, switch_dir, calibration_jsonl, tmp_path):
    HfApi(endpoint=hub_env.url, token=TOKEN).create_repo("tester/taken")
    kwargs = dict(factor=2, calibration_file=calibration_jsonl, progress=False, push_to_hub=True, hub_token=TOKEN)
    with pytest.raises(RepoExistsError, match="already exists"):
        prune_flat(switch_dir, output_dir=tmp_path / "a", repo_id="tester/taken", **kwargs)
    with pytest.raises(HubError, match="repo id"):
        prune_flat(switch_dir, output_dir=tmp_path / "a", **kwargs)
    assert not (tmp_path / "a").exists()


def test_cli_push_errors_are_one_line(hub_env, small_output, capsys):
    assert main(["push", str(small_output), "--repo-id", "not a repo id", "--token", TOKEN]) == 2
    assert "namespace/name" in capsys.readouterr().err
    assert main(["push", str(small_output / "missing"), "--repo-id", "tester/x", "--token", TOKEN]) == 2
    assert "not a checkpoint folder" in capsys.readouterr().err
