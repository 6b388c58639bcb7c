"""Zoo builds are reproducible: the recipe pins what decides the bytes, whatever the calling process has set.

Issue 17: ``uncurl zoo build study-switch-64-topic`` on a machine with two torch threads gave another model than the
documented one-thread build (84.4% topic accuracy against 80.7%). A recipe now carries its thread count and
deterministic algorithms (``ZooRecipe.num_threads`` / ``deterministic_algorithms``, applied to every stage by
:mod:`uncurl_hf.zoo.runtime`). Two builds of a tiny recipe run in subprocesses whose callers differ in
``OMP_NUM_THREADS`` and ``torch.set_num_threads`` must write byte-identical weights, and leave their callers'
settings as they found them. A control per subprocess pretrains again at the caller's own thread count: those
differ between the two, which shows the recipe is large enough for the thread count to matter at all.

Also here: ``zoo_path`` never trains unless asked, and says what it is about to do when it is asked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from uncurl_hf.cli.main import main
from uncurl_hf.zoo import registry
from uncurl_hf.zoo.recipe import FinetuneSpec, IntermediateSpec, ModelSpec, PretrainSpec, ZooRecipe
from uncurl_hf.zoo.runtime import estimated_build_minutes, pinned

REPO = Path(__file__).resolve().parents[1]
TINY = ZooRecipe(
    name="repro-switch-4",
    model=ModelSpec(vocab_size=384, d_model=64, d_kv=16, num_heads=4, d_ff=64, num_layers=2,
                    num_sparse_encoder_layers=1, num_decoder_layers=2, num_sparse_decoder_layers=1, num_experts=4),
    pretrain=PretrainSpec(steps=4, batch_size=16, chunk_tokens=48, warmup=1, checkpoint_every=100, polarity_rows=4),
    intermediate=IntermediateSpec(steps=2, batch_size=16, chunk_tokens=48, warmup=1),
    finetune=FinetuneSpec(epochs=1, batch_size=16, warmup=1, train_limit=48),
)


def _sha(folder: Path) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def build_weights(recipe: ZooRecipe, root: Path) -> dict[str, str]:
    """Run the recipe's three training stages into ``root``; the sha256 of the weights after pretraining and of the
    weights the build keeps."""
    from uncurl_hf.zoo.recipe import finetune, intermediate, pretrain

    work = root / "work"
    pretrained = pretrain(recipe, work, progress=False)
    record = finetune(recipe, intermediate(recipe, pretrained, work, progress=False), root / "model", progress=False)
    return {"pretrained": _sha(pretrained), "final": _sha(root / "model"), "runtime": record["runtime"]}


def _child(threads: int, root: str) -> dict[str, Any]:
    """In a subprocess whose caller runs ``threads`` torch threads: the pinned build, the caller's settings after
    it, and the control: the pretraining stage again at the caller's own thread count (the tokenizer reused)."""
    import shutil

    from uncurl_hf.zoo.recipe import pretrain

    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(threads == 1, warn_only=threads == 1)  # the two callers differ here too
    result: dict[str, Any] = build_weights(TINY, Path(root) / "pinned")
    result["after"] = {"threads": torch.get_num_threads(), "deterministic": torch.are_deterministic_algorithms_enabled(),
                       "warn_only": torch.is_deterministic_algorithms_warn_only_enabled()}
    shutil.copytree(Path(root) / "pinned" / "work" / "tokenizer", Path(root) / "own" / "tokenizer")
    result["own"] = _sha(pretrain(replace(TINY, num_threads=threads), Path(root) / "own", progress=False))
    return result


CHILD = """
import json, sys
sys.path.insert(0, {tests!r})
from test_zoo_reproducible import _child
print("RESULT " + json.dumps(_child({threads}, {root!r})))
"""


def test_two_builds_under_different_caller_thread_settings_write_identical_weights(tmp_path):
    procs = {}
    for threads in (1, 2):
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        code = CHILD.format(tests=str(REPO / "tests"), threads=threads, root=str(tmp_path / f"t{threads}"))
        procs[threads] = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True)
    results = {}
    for threads, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        results[threads] = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    one, two = results[1], results[2]
    # the point: the caller's thread settings do not reach the bytes, after pretraining nor at the end
    assert one["pretrained"] == two["pretrained"] and one["final"] == two["final"], results
    assert one["own"] == one["pretrained"]  # the recipe pins 1 thread: a one-thread caller builds the same
    assert two["own"] != one["own"], "the control builds agree: this recipe is too small to show thread effects"
    assert one["after"] == {"threads": 1, "deterministic": True, "warn_only": True}
    assert two["after"] == {"threads": 2, "deterministic": False, "warn_only": False}
    # what zoo_manifest.json's "finetune" record carries: the pinned settings and what could not be pinned
    assert one["runtime"] == two["runtime"] and one["runtime"]["torch_num_threads"] == 1
    assert one["runtime"]["deterministic_algorithms"] is True and one["runtime"]["torch"] == torch.__version__


def test_pinned_restores_the_callers_settings_and_random_state():
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with pinned(1, deterministic=True):
        assert torch.are_deterministic_algorithms_enabled() and torch.get_num_threads() == 1
        torch.manual_seed(0)
        torch.rand(5)
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == before
    assert torch.equal(torch.rand(3), expected)


def test_the_recipe_records_its_runtime_and_matches_the_shipped_model():
    """The pinned settings are part of the recipe, so ``zoo_manifest.json`` (which stores ``recipe.to_dict()``)
    records them, and ``finetune`` adds what cannot be pinned (torch version, CPU capability). The shipped
    tiny-switch-8 predates the pin: its manifest records no thread count, so it is left as shipped (its bytes must
    not change) and the pin is the study zoo's documented setting (one-thread workers)."""
    data = registry.RECIPES["tiny-switch-8"].to_dict()
    assert data["num_threads"] == 1 and data["deterministic_algorithms"] is True
    shipped = json.loads((registry.SHIPPED_DIR / "tiny-switch-8" / "zoo_manifest.json").read_text())
    assert "num_threads" not in shipped["recipe"] and "runtime" not in shipped["finetune"]
    assert all(r.num_threads == 1 for r in registry.RECIPES.values() if isinstance(r, ZooRecipe))


def test_zoo_path_of_a_model_not_built_fails_fast_and_names_the_build(tmp_path, monkeypatch, capsys):
    """``uncurl zoo path`` used to train a missing model silently for minutes; now it never trains."""
    monkeypatch.setenv("UNCURL_HF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(registry, "build", lambda *a, **k: pytest.fail("zoo path started a build"))
    name = "study-switch-4-sentiment"
    assert main(["zoo", "path", name]) == 2
    err = capsys.readouterr().err
    minutes = estimated_build_minutes(registry.get_recipe(name))
    assert err.startswith(f"error: Zoo model '{name}' is not built yet") and err.count("\n") == 1
    assert f"run `uncurl zoo build {name}` (about {minutes} minutes on 2 cores)" in err
    assert 5 <= minutes <= 60
    assert main(["zoo", "path", "tiny-switch-8"]) == 0  # the shipped model needs no build (./run.sh)
    assert capsys.readouterr().out.strip() == str(registry.SHIPPED_DIR / "tiny-switch-8")


def test_an_asked_for_build_says_what_it_does_first(tmp_path, monkeypatch, caplog):
    """Callers that do build (the Space's default models) pass ``build_if_missing=True``: a warning with the
    duration comes before the training starts."""
    monkeypatch.setenv("UNCURL_HF_CACHE", str(tmp_path / "cache"))
    logged_before_build = []
    monkeypatch.setattr(registry, "build", lambda name, out, progress=True: logged_before_build.extend(
        r.getMessage() for r in caplog.records) or out)
    with caplog.at_level(logging.WARNING, logger="uncurl_hf.zoo.registry"):
        registry.zoo_path("study-switch-8-topic", build_if_missing=True, progress=False)
    assert len(logged_before_build) == 1, logged_before_build
    assert "study-switch-8-topic is not built yet: training it now" in logged_before_build[0]
    assert "minutes on 2 cores" in logged_before_build[0]


def test_estimate_skips_finished_stages(tmp_path):
    recipe = registry.get_recipe("study-switch-16-sentiment")
    full = estimated_build_minutes(recipe, tmp_path)
    for stage in ("pretrained", "intermediate"):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "config.json").write_text("{}")
    assert estimated_build_minutes(recipe, tmp_path) < full
    assert estimated_build_minutes(registry.get_recipe("study-switch-64-topic")) > estimated_build_minutes(
        registry.get_recipe("study-switch-4-topic"))


def _locked(path: Path) -> bool:
    """Whether another open file description holds an exclusive flock on ``path``."""
    import fcntl

    with open(path, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def test_a_second_holder_of_the_build_lock_says_so_and_waits(tmp_path, caplog):
    import threading

    from uncurl_hf.zoo.runtime import exclusive

    lock, order, inside = tmp_path / "work.lock", [], threading.Event()
    release = threading.Event()

    def first() -> None:
        with exclusive(lock, "the work folder"):
            order.append("first in")
            inside.set()
            release.wait(10)
            order.append("first out")

    thread = threading.Thread(target=first)
    thread.start()
    inside.wait(10)
    assert _locked(lock)
    second = threading.Thread(target=lambda: _enter_and_record(exclusive, lock, order))
    with caplog.at_level(logging.WARNING, logger="uncurl_hf.zoo.runtime"):
        second.start()
        second.join(0.3)
        assert second.is_alive() and order == ["first in"]  # waiting, not in
        release.set()
        thread.join(10)
        second.join(10)
    assert order == ["first in", "first out", "second in"]
    assert "another build is using the work folder" in caplog.text and not _locked(lock)


def _enter_and_record(exclusive, lock: Path, order: list[str]) -> None:
    with exclusive(lock, "the work folder"):
        order.append("second in")


def test_a_build_holds_the_shared_pretraining_and_its_output_locked(tmp_path, monkeypatch):
    """Two builds sharing a pretraining (E=32 topic and hedge) must not train into one work folder at once: the
    pretraining stages run under the work folder's lock, the fine-tuning and the rename under the output's."""
    workdir, out = tmp_path / "work" / "repro-switch-4", tmp_path / "zoo" / "repro-switch-4"
    seen: dict[str, bool] = {}

    def pretrain(recipe, folder, progress=True):
        seen["pretrain"] = _locked(workdir.with_name("repro-switch-4.lock"))
        return folder

    def finetune(recipe, pretrained, staging, progress=True):
        seen["finetune"] = _locked(out.with_name("repro-switch-4.lock"))
        seen["pretraining free"] = not _locked(workdir.with_name("repro-switch-4.lock"))
        staging.mkdir(parents=True)
        (staging / "config.json").write_text("{}")
        return {}

    monkeypatch.setattr(registry, "pretrain", pretrain)
    monkeypatch.setattr(registry, "intermediate", lambda recipe, pretrained, folder, progress=True: pretrained)
    monkeypatch.setattr(registry, "finetune", finetune)
    monkeypatch.setattr(registry, "write_manifest", lambda *a, **k: None)
    assert registry.build(TINY, out, workdir=workdir, progress=False) == out
    assert seen == {"pretrain": True, "finetune": True, "pretraining free": True}
    assert (out / "config.json").exists() and not out.with_name("repro-switch-4.building").exists()
