"""Bad inputs through the ``uncurl`` CLI: one table row per way a user (or a broken download) can get it wrong.

Every row must give exactly one ``UncurlError`` subclass (checked with ``--debug``, which lets it propagate), whose
message names the fix; without ``--debug`` the CLI prints only ``error: <message>`` and exits non-zero; and nothing
is written or changed anywhere: the input model, the calibration data, the plan and the output's parent folder are
byte-identical afterwards (every file hashed, every folder listed).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import shutil
import stat
import subprocess
import sys
from contextlib import redirect_stderr
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import forked
import unprivileged
import uncurl_hf.errors as errors
from uncurl_hf import LayerPlan, PruningPlan
from uncurl_hf.cli.main import main

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("encoder.block.1", "encoder.block.3", "decoder.block.1", "decoder.block.3")


@dataclass
class Ctx:
    """Where a case builds its inputs: ``tmp`` (hashed before/after), the shared tiny model and calibration file."""

    tmp: Path
    switch: Path
    t5: Path
    cal: Path

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def model(self, name: str = "model") -> Path:
        """A private copy of the tiny Switch checkpoint to break."""
        return Path(shutil.copytree(self.switch, self.tmp / name))

    def file(self, name: str, data: bytes | str) -> Path:
        path = self.tmp / name
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    def plan(self, name: str = "plan.json", **changes: Any) -> Path:
        """A plan file; by default a valid one for the tiny model (keep experts 0-3), ``changes`` break it."""
        num_experts = changes.pop("num_experts", 8)
        layers = [LayerPlan.keep(n, num_experts, range(4)) for n in changes.pop("layers", LAYERS)]
        values = dict(model_type="switch_transformers", family="switch_transformers", method="manual", layers=layers)
        values.update(changes)
        return PruningPlan(**values).save(self.tmp / name)

    def prune(self, model: Path | str | None = None, *extra: str, data: str | None = "cal", factor: str | None = "2",
              out: Path | None = None) -> list[str]:
        """``prune MODEL --calibration-file CAL --factor 2 -o OUT --no-progress`` with the given pieces swapped."""
        argv = ["prune", str(model or self.switch)]
        if data == "cal":
            argv += ["--calibration-file", str(self.cal)]
        elif data is not None:
            argv += ["--calibration-file", data]
        if factor is not None:
            argv += ["--factor", factor]
        return [*argv, "-o", str(out or self.out), "--no-progress", "--num-calibration", "12", "--batch-size", "6",
                *extra]


def _garbage_dir(c: Ctx) -> list[str]:
    folder = c.tmp / "garbage"
    folder.mkdir()
    (folder / "weights.dat").write_bytes(os.urandom(256))
    (folder / "notes.txt").write_text("not a model")
    return c.prune(folder)


def _config(c: Ctx, config: Any, name: str = "model") -> Path:
    model = c.model(name)
    (model / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return model


def _switch_config(c: Ctx) -> dict[str, Any]:
    return json.loads((c.switch / "config.json").read_text())


def _without(c: Ctx, *names: str) -> Path:
    model = c.model()
    for name in names:
        (model / name).unlink()
    return model


def _truncated(c: Ctx) -> list[str]:
    model = c.model()
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) * 2 // 3])
    return c.prune(model)


def _corrupt_header(c: Ctx) -> list[str]:
    model = c.model()
    data = bytearray((model / "model.safetensors").read_bytes())
    data[:8] = (2**40).to_bytes(8, "little")  # header length far beyond the file
    (model / "model.safetensors").write_bytes(bytes(data))
    return c.prune(model)


def _missing_tensor(c: Ctx) -> list[str]:
    from safetensors.torch import load_file, save_file

    model = c.model()
    tensors = load_file(str(model / "model.safetensors"))
    del tensors["encoder.block.1.layer.1.mlp.router.classifier.weight"]
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    return c.prune(model)


def _sharded(c: Ctx) -> Path:
    from transformers import AutoModelForSeq2SeqLM

    folder = c.tmp / "sharded"
    AutoModelForSeq2SeqLM.from_pretrained(c.switch).save_pretrained(folder, max_shard_size="150KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(c.switch / name, folder / name)
    assert len(list(folder.glob("*.safetensors"))) > 1
    return folder


def _missing_shard(c: Ctx) -> list[str]:
    folder = _sharded(c)
    sorted(folder.glob("model-*.safetensors"))[-1].unlink()
    return c.prune(folder)


def _broken_index(c: Ctx) -> list[str]:
    folder = _sharded(c)
    (folder / "model.safetensors.index.json").write_text('{"metadata": {}, "weight_map": ')
    return c.prune(folder)


def _pickle_model(c: Ctx, payload: Any = None) -> Path:
    folder = c.tmp / "pickled"
    folder.mkdir()
    shutil.copy(c.switch / "config.json", folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(c.switch / name, folder / name)
    if payload is None:
        from safetensors.torch import load_file

        payload = load_file(str(c.switch / "model.safetensors"))
    torch.save(payload, folder / "pytorch_model.bin")
    return folder


class _RunsCode:
    """Unpickling this calls ``os.system`` — what ``weights_only=True`` must refuse."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def _malicious_pickle(c: Ctx) -> list[str]:
    marker = c.tmp.parent / f"{c.tmp.name}-PWNED"
    return c.prune(_pickle_model(c, {"shared.weight": _RunsCode(marker)}), "--allow-pickle")


def _remote_code(c: Ctx, *extra: str) -> list[str]:
    folder = c.tmp / "remote"
    folder.mkdir()
    marker = c.tmp.parent / f"{c.tmp.name}-PWNED"
    config = {
        "model_type": "evil_moe",
        "architectures": ["EvilMoEForConditionalGeneration"],
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                     "AutoModelForSeq2SeqLM": "modeling_evil.EvilMoEForConditionalGeneration"},
    }
    (folder / "config.json").write_text(json.dumps(config))
    code = f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
    (folder / "configuration_evil.py").write_text(code)
    (folder / "modeling_evil.py").write_text(code)
    shutil.copy(c.switch / "model.safetensors", folder)
    return c.prune(folder, *extra)


def _rlimit_write(c: Ctx) -> list[str]:
    return c.prune()  # run in a child whose file-size limit makes the weight write fail (see RLIMIT_CASES)


def _read_only_parent(c: Ctx) -> list[str]:
    (c.tmp / "a-file").write_text("x")
    return c.prune(out=c.tmp / "a-file" / "out")


def _chmod(c: Ctx, name: str, mode: int) -> list[str]:
    """A model copy with ``name`` (``""``: the folder itself) set to ``mode``; run it as a user bound by the bits
    (see UNPRIVILEGED_CASES)."""
    model = c.model()
    os.chmod(model / name, mode)
    return c.prune(model)


def _weights_symlink(c: Ctx, target: str) -> list[str]:
    model = c.model()
    (model / "model.safetensors").unlink()
    os.symlink(target, model / "model.safetensors")
    return c.prune(model)


def _unwritable_output_parent(c: Ctx) -> list[str]:
    parent = c.tmp / "read-only"
    parent.mkdir()
    os.chmod(parent, 0o555)
    return c.prune(out=parent / "sub" / "out")  # a missing folder under it: it is where "sub" would be created


@dataclass(frozen=True)
class Case:
    id: str
    error: type[errors.UncurlError]
    message: str  # regex that must occur in the message; it includes the part that names the fix
    build: Callable[[Ctx], list[str]]


E = errors
CASES = [
    # the model folder
    Case("model-missing", E.ModelNotFoundError, "does not exist.*local checkpoint folder",
         lambda c: c.prune(c.tmp / "nope")),
    Case("model-is-a-file", E.ModelNotFoundError, "is a file; give the checkpoint folder",
         lambda c: c.prune(c.file("model.safetensors", b"x"))),
    Case("model-dir-empty", E.ModelNotFoundError, "no config.json.*save_pretrained",
         lambda c: c.prune((c.tmp / "empty").mkdir() or c.tmp / "empty")),
    Case("model-dir-garbage", E.ModelNotFoundError, "no config.json", _garbage_dir),
    Case("config-not-json", E.CheckpointError, "Restore a valid config.json", lambda c: c.prune(_config(c, "{nope"))),
    Case("config-not-object", E.CheckpointError, "not a JSON object; restore", lambda c: c.prune(_config(c, "[1, 2]"))),
    Case("config-no-model-type", E.UnsupportedModelError, r"Supported families: .*switch_transformers \(model_type",
         lambda c: c.prune(_config(c, {k: v for k, v in _switch_config(c).items() if k != "model_type"}))),
    Case("config-dense-t5", E.UnsupportedModelError, "'t5' is not a sparse mixture-of-experts.*Point uncurl at",
         lambda c: c.prune(c.t5)),
    Case("config-unsupported-family", E.UnsupportedModelError, "'llama' is not a sparse.*Supported families",
         lambda c: c.prune(_config(c, {**_switch_config(c), "model_type": "llama"}))),
    Case("config-invalid-values", E.CheckpointError, "num_experts.*Restore the config.json that came with",
         lambda c: c.prune(_config(c, {**_switch_config(c), "num_experts": "eight"}))),
    Case("weights-missing", E.ModelNotFoundError, "no \\*.safetensors weights; copy the weights in",
         lambda c: c.prune(_without(c, "model.safetensors"))),
    Case("weights-truncated", E.CheckpointError, "corrupt or truncated.*re-download", _truncated),
    Case("weights-corrupt-header", E.CheckpointError, "corrupt or truncated.*re-download", _corrupt_header),
    Case("weights-missing-tensor", E.CheckpointError, "do not match its config.json.*random.*Re-download",
         _missing_tensor),
    Case("index-missing-shard", E.CheckpointError, "names 1 missing shard.*Re-download", _missing_shard),
    Case("index-malformed", E.CheckpointError, "shard index .* is unreadable.*re-download", _broken_index),
    Case("pickle-refused", E.CheckpointError, "only pickle weights.*--allow-pickle",
         lambda c: c.prune(_pickle_model(c))),
    Case("pickle-code-refused-even-when-allowed", E.CheckpointError, "hold more than tensors.*posix.system.*"
         "get safetensors weights",
         _malicious_pickle),
    Case("remote-code-refused", E.RemoteCodeError, "configuration_evil.py.*--trust-remote-code", _remote_code),
    Case("remote-code-trusted-but-unsupported", E.UnsupportedModelError, "'evil_moe' is not a sparse",
         lambda c: _remote_code(c, "--trust-remote-code")),
    Case("model-dir-unreadable", E.AccessDeniedError, r"Cannot read the model folder .*/model: permission denied "
         r"\(mode d---------.*chmod -R u\+rX", lambda c: _chmod(c, "", 0)),
    Case("weights-unreadable", E.AccessDeniedError, r"Cannot read the weight file .*/model.safetensors: permission "
         r"denied \(mode ----------.*chmod u\+r", lambda c: _chmod(c, "model.safetensors", 0)),
    Case("tokenizer-unreadable", E.AccessDeniedError, r"Cannot read the checkpoint file .*/tokenizer.json: permission "
         r"denied.*chmod u\+r", lambda c: _chmod(c, "tokenizer.json", 0)),
    Case("weights-symlink-loop", E.BrokenSymlinkError, r"weight file .*/model.safetensors is a symlink loop "
         r"\(model.safetensors -> model.safetensors.*replace it with the real file",
         lambda c: _weights_symlink(c, "model.safetensors")),
    Case("weights-dangling-symlink", E.BrokenSymlinkError, r"weight file .*/model.safetensors is a dangling symlink: "
         r"it points to ../gone/model.safetensors, which does not exist.*re-download",
         lambda c: _weights_symlink(c, "../gone/model.safetensors")),
    Case("tokenizer-missing", E.CheckpointError, "no tokenizer vocabulary.*untrained.*Copy the model's tokenizer",
         lambda c: c.prune(_without(c, "tokenizer.json", "tokenizer_config.json"))),
    # factor and per-layer counts
    Case("factor-1", E.InvalidFactorError, "factor 1 keeps every expert.*factor > 1", lambda c: c.prune(factor="1")),
    Case("factor-below-1", E.InvalidFactorError, "below 1.*factor > 1", lambda c: c.prune(factor="0.5")),
    Case("factor-0", E.InvalidFactorError, "below 1", lambda c: c.prune(factor="0")),
    Case("factor-negative", E.InvalidFactorError, "below 1", lambda c: c.prune(factor="-2")),
    Case("factor-above-experts", E.InvalidFactorError, "keep 0 experts.*Use a factor <= 8",
         lambda c: c.prune(factor="16")),
    Case("factor-not-a-number", E.InvalidFactorError, "--factor expects a number > 1 .*got 'two'",
         lambda c: c.prune(factor="two")),
    Case("factor-nan", E.InvalidFactorError, "finite number > 1", lambda c: c.prune(factor="nan")),
    Case("factor-inf", E.InvalidFactorError, "finite number > 1", lambda c: c.prune(factor="inf")),
    Case("factor-missing", E.InvalidFactorError, "Give a pruning factor", lambda c: c.prune(factor=None)),
    Case("factor-and-counts", E.InvalidFactorError, "not factor and num_experts_per_layer",
         lambda c: c.prune(None, "--num-experts-per-layer", "4,4,4,4")),
    Case("counts-wrong-length", E.InvalidFactorError, "Got 3 per-layer expert counts for a model with 4 sparse.*one "
         "count per layer", lambda c: c.prune(None, "--num-experts-per-layer", "4,4,2", factor=None)),
    Case("counts-with-zero", E.InvalidFactorError, "integers >= 1 \\(every layer keeps at least one",
         lambda c: c.prune(None, "--num-experts-per-layer", "4,0,2,2", factor=None)),
    Case("counts-above-experts", E.InvalidFactorError, "between 1 and 8, got 9",
         lambda c: c.prune(None, "--num-experts-per-layer", "4,4,2,9", factor=None)),
    Case("counts-not-integers", E.InvalidFactorError, "expects integers.*4,4,2,2",
         lambda c: c.prune(None, "--num-experts-per-layer", "4,four,2,2", factor=None)),
    Case("counts-unknown-layer", E.InvalidFactorError, "does not have; its sparse layers are",
         lambda c: c.prune(None, "--num-experts-per-layer", "encoder.block.7=2", factor=None)),
    # calibration data and tasks
    Case("calibration-empty", E.CalibrationDataError, "holds no examples; add at least one",
         lambda c: c.prune(data=str(c.file("empty.txt", "")))),
    Case("calibration-blank-lines", E.CalibrationDataError, "holds no examples",
         lambda c: c.prune(data=str(c.file("blank.txt", "\n  \n\t\n")))),
    Case("calibration-tiny", E.CalibrationDataError, "too small: layer .* saw \\d token.*Give more examples",
         lambda c: c.prune(data=str(c.file("tiny.txt", "good\n")))),
    Case("calibration-binary", E.CalibrationDataError, "not UTF-8 text.*re-encode",
         lambda c: c.prune(data=str(c.file("binary.txt", bytes(range(128, 256)) * 4)))),
    Case("calibration-nul-bytes", E.CalibrationDataError, "looks binary.*UTF-8 .txt",
         lambda c: c.prune(data=str(c.file("nul.txt", b"good movie\x00\x00\x00\x01\x02\x00" * 20)))),
    Case("calibration-wrong-extension", E.CalibrationDataError, "extension .xml; use .txt",
         lambda c: c.prune(data=str(c.file("data.xml", "<a/>\n")))),
    Case("calibration-jsonl-malformed", E.CalibrationDataError, "line 2: not valid JSON",
         lambda c: c.prune(data=str(c.file("bad.jsonl", '{"text": "good"}\n{"text": \n')))),
    Case("calibration-jsonl-no-text", E.CalibrationDataError, "line 1: no field 'text', 'messages' or 'prompt'",
         lambda c: c.prune(data=str(c.file("notext.jsonl", '{"sentence": "good"}\n')))),
    Case("calibration-file-missing", E.CalibrationDataError, "does not exist; check the path",
         lambda c: c.prune(data=str(c.tmp / "missing.txt"))),
    Case("calibration-size-0", E.CalibrationDataError, "num_examples must be an integer >= 1",
         lambda c: [*c.prune(), "--num-calibration", "0"]),
    Case("calibration-none", E.CalibrationDataError, "exactly one source.*--task NAME", lambda c: c.prune(data=None)),
    Case("task-unknown", E.UnknownTaskError, "Unknown task 'sentimant'.*--calibration-file",
         lambda c: c.prune(None, "--task", "sentimant", data=None)),
    Case("method-unknown", E.UnknownMethodError, "Unknown pruning method 'magic'.*uncurl methods",
         lambda c: c.prune(None, "--method", "magic")),
    # the output folder
    Case("output-is-input", E.OutputExistsError, "is the input model folder; choose another -o",
         lambda c: c.prune(c.model(), out=c.tmp / "model")),
    Case("output-inside-input", E.OutputExistsError, "inside the input model folder; choose another -o",
         lambda c: c.prune(c.model(), out=c.tmp / "model" / "pruned")),
    Case("output-exists", E.OutputExistsError, "already exists; pass --overwrite",
         lambda c: (c.out.mkdir(), (c.out / "config.json").write_text("{}"), c.prune())[-1]),
    Case("output-is-a-file", E.OutputExistsError, "is a file; remove it or choose another -o",
         lambda c: [*c.prune(out=c.file("out", "x")), "--overwrite"]),
    Case("output-not-a-model-folder", E.OutputExistsError, "not a model folder; refusing to replace it",
         lambda c: (c.out.mkdir(), (c.out / "thesis.tex").write_text("keep"), [*c.prune(), "--overwrite"])[-1]),
    Case("output-parent-not-a-directory", E.CheckpointError, "Choose an -o whose parent is a writable directory",
         _read_only_parent),
    Case("output-parent-not-writable", E.AccessDeniedError, r"Cannot write the output .*/read-only/sub/out: the "
         r"folder .*/read-only is not writable for this user \(permission denied; mode dr-xr-xr-x.*Choose an -o in a "
         r"folder you can write to", _unwritable_output_parent),
    Case("write-fails-file-too-large", E.CheckpointError, "File too large.*Nothing was written.*free disk space",
         _rlimit_write),
    # saved plans
    Case("plan-not-json", E.InvalidPlanError, "not valid JSON",
         lambda c: c.prune(None, "--plan", str(c.file("p.json", "{layers: [")), data=None, factor=None)),
    Case("plan-not-object", E.InvalidPlanError, "must be a JSON object",
         lambda c: c.prune(None, "--plan", str(c.file("p.json", "[]")), data=None, factor=None)),
    Case("plan-malformed-layers", E.InvalidPlanError, "Malformed pruning plan",
         lambda c: c.prune(None, "--plan", str(c.file("p.json", '{"layers": [{"name": 1}]}')), data=None,
                           factor=None)),
    Case("plan-missing-file", E.InvalidPlanError, "Cannot read the pruning plan",
         lambda c: c.prune(None, "--plan", str(c.tmp / "nope.json"), data=None, factor=None)),
    Case("plan-other-model-expert-count", E.InvalidPlanError, "made for 16 experts but the model layer has 8; "
         "recompute", lambda c: c.prune(None, "--plan", str(c.plan(num_experts=16)), data=None, factor=None)),
    Case("plan-other-model-layers", E.InvalidPlanError, "names layers \\['encoder.block.5'\\].*recompute the plan",
         lambda c: c.prune(None, "--plan", str(c.plan(layers=[*LAYERS, "encoder.block.5"])), data=None,
                           factor=None)),
    Case("plan-other-family", E.InvalidPlanError, "made for a 'mixtral' model.*compute a plan on this model",
         lambda c: c.prune(None, "--plan", str(c.plan(family="mixtral", model_type="mixtral")), data=None,
                           factor=None)),
    Case("plan-with-factor", E.InvalidFactorError, "not factor and plan", lambda c: c.prune(None, "--plan", str(c.plan()),
                                                                                   data=None)),
    Case("plan-with-method", E.InvalidPlanError, "drop --method",
         lambda c: c.prune(None, "--plan", str(c.plan()), "--method", "frequency", data=None, factor=None)),
]
RLIMIT_CASES = {"write-fails-file-too-large": 64 * 1024}  # RLIMIT_FSIZE bytes: below the ~390 kB weight file
# Run in a child bound by permission bits (tests/unprivileged.py: as root, CAP_DAC_OVERRIDE is dropped first).
UNPRIVILEGED_CASES = {"model-dir-unreadable", "weights-unreadable", "tokenizer-unreadable", "output-parent-not-writable"}


def _snapshot(*roots: Path) -> dict[str, str]:
    """Every file (sha256) and folder under ``roots``: a byte-level picture to compare before/after."""
    picture = {}
    for root in roots:
        for path in [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]:
            picture[str(path)] = _fingerprint(path)
    return picture


def _fingerprint(path: Path) -> str:
    """A symlink's target, ``dir``, or the file's sha256 (mode included: a case may not chmod anything back)."""
    if path.is_symlink():
        return f"link -> {os.readlink(path)}"
    mode = stat.filemode(path.lstat().st_mode)
    if path.is_dir():
        return f"dir {mode}"
    try:
        return f"{mode} {hashlib.sha256(path.read_bytes()).hexdigest()}"
    except PermissionError:  # a mode-000 file, for a runner that is not root
        return f"{mode} unreadable"


def _run_cli(argv: list[str], fsize_limit: int | None = None) -> dict[str, Any]:
    """``--debug`` run (the exception's class and message), then a plain run (exit code and stderr)."""
    if fsize_limit is not None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, resource.RLIM_INFINITY))
    result: dict[str, Any] = {"type": None, "message": None}
    try:
        main(["--debug", *argv])
    except Exception as exc:  # noqa: BLE001 - the class is what the test checks
        result.update(type=type(exc).__name__, message=str(exc))
    stderr = io.StringIO()
    with redirect_stderr(stderr):
        result["code"] = main(argv)
    result["stderr"] = stderr.getvalue()
    return result


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(case: Case, switch_dir, t5_dir, calibration_jsonl, tmp_path):
    ctx = Ctx(tmp_path / "work", switch_dir, t5_dir, calibration_jsonl)
    ctx.tmp.mkdir()
    argv = case.build(ctx)
    watched = (ctx.tmp, switch_dir, calibration_jsonl)
    before = _snapshot(*watched)
    if case.id in RLIMIT_CASES:
        result = forked.run(_run_cli, argv, RLIMIT_CASES[case.id])
    elif case.id in UNPRIVILEGED_CASES:
        if not unprivileged.available():
            pytest.skip("this runner cannot give a child process ordinary file permissions (capset failed)")
        result = unprivileged.run(_run_cli, argv)
    else:
        result = _run_cli(argv)

    assert result["type"] == case.error.__name__, result
    assert issubclass(getattr(errors, result["type"]), errors.UncurlError)
    assert re.search(case.message, result["message"], re.S), result["message"]
    assert result["code"] == case.error.exit_code != 0
    assert result["stderr"] == f"error: {result['message']}\n", result["stderr"]
    assert _snapshot(*watched) == before  # inputs untouched, nothing written, no temporary litter
    assert not list(tmp_path.parent.glob(f"{tmp_path.name}*PWNED")), "code from the checkpoint ran"


def test_table_covers_the_issue():
    assert len(CASES) >= 30
    assert {case.error for case in CASES} >= {
        E.ModelNotFoundError, E.UnsupportedModelError, E.CheckpointError, E.RemoteCodeError, E.InvalidFactorError,
        E.CalibrationDataError, E.UnknownTaskError, E.UnknownMethodError, E.OutputExistsError, E.InvalidPlanError,
    }


def test_allowed_pickle_and_counts_flag_prune(switch_dir, calibration_jsonl, tmp_path, capsys):
    """The opt-ins work: ``--allow-pickle`` reads plain tensors, ``--num-experts-per-layer`` sets each layer."""
    ctx = Ctx(tmp_path, switch_dir, switch_dir, calibration_jsonl)
    argv = ctx.prune(_pickle_model(ctx), "--allow-pickle", "--num-experts-per-layer", "4,2,2,1", factor=None)
    assert main(argv) == 0, capsys.readouterr().err
    config = json.loads((ctx.out / "config.json").read_text())
    assert config["num_experts_per_encoder_layer"] == [4, 2] and config["num_experts_per_decoder_layer"] == [2, 1]


def test_real_processes_exit_without_traceback_and_debug_shows_it(switch_dir, calibration_txt, tmp_path):
    """Two real ``python -m uncurl_hf`` processes (started together): exit code 2 and one line, or a traceback."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "uncurl_hf"]
    argv = ["prune", str(switch_dir), "--calibration-file", str(calibration_txt), "--factor", "1",
            "-o", str(tmp_path / "out")]
    procs = [subprocess.Popen([*base, *debug, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for debug in ([], ["--debug"])]
    (_, plain_err), (_, debug_err) = (p.communicate(timeout=300) for p in procs)
    assert procs[0].returncode == 2
    assert plain_err.startswith("error: Pruning factor 1 keeps every expert") and plain_err.count("\n") == 1
    assert "Traceback" not in plain_err
    assert procs[1].returncode == 1 and "Traceback" in debug_err and "InvalidFactorError" in debug_err
    assert not (tmp_path / "out").exists()


def test_pickle_payload_is_plain_data(tmp_path):
    """Sanity check of the malicious fixture: plain ``pickle`` *would* run it (so refusing it means something)."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_RunsCode(marker)))
    assert marker.exists()


def _cli_stderr(argv: list[str]) -> dict[str, Any]:
    """Child: the CLI as a terminal user runs it (its own logging setup, not pytest's); exit code and stderr."""
    import logging

    root = logging.getLogger()
    for handler in root.handlers[:]:  # pytest's capture handlers would swallow the CLI's warnings
        root.removeHandler(handler)
    stderr = io.StringIO()
    with redirect_stderr(stderr):
        code = main(argv)
    return {"code": code, "stderr": stderr.getvalue()}


def test_recover_on_another_task_than_the_calibration_warns(switch_dir, tmp_path):
    """Issue 17: ``uncurl recover OUT --task topic`` on a folder calibrated on sentiment said nothing. It warns now,
    on the command line too, before anything is loaded; the existing -o stops each run right after the checks."""
    from helpers import prune_flat

    pruned = tmp_path / "pruned"
    prune_flat(str(switch_dir), pruned, task="sentiment", factor=2, method="frequency",
               num_calibration_examples=16, progress=False)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "config.json").write_text("{}")
    argv = ["recover", str(pruned), "-o", str(taken), "--no-progress", "--task"]
    other = forked.run(_cli_stderr, [*argv, "topic"])
    assert other["code"] == errors.OutputExistsError.exit_code
    warning, error = other["stderr"].splitlines()
    assert re.fullmatch(r"WARNING uncurl_hf\.recover\.train: .*/pruned was pruned with calibration on the "
                        r"'sentiment' task, but this recovery trains and scores 'topic'.*Recover with --task "
                        r"sentiment, or prune on 'topic' first.*", warning), warning
    assert error.startswith("error: Output folder") and "already exists" in error
    same = forked.run(_cli_stderr, [*argv, "sentiment"])
    assert same["code"] == errors.OutputExistsError.exit_code and "WARNING" not in same["stderr"], same
