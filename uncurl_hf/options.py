"""``RunOptions``: HOW a pruning run executes. None of these changes the output's bytes.

Where the model is read from, on which device and in which dtype calibration runs, whether the surgery streams,
how shards are cut, whether files are fsynced, what may be trusted, whether progress is shown, whether the result
is evaluated and pushed. What the run *does* is the recipe (:class:`uncurl_hf.recipe.PruneRecipe`).

Two caveats are stated where they apply rather than hidden: calibrating on another device or in another dtype
computes the float statistics differently, which can change a plan made from float statistics (the integer routing
counts frequency relies on rarely move); and ``max_shard_size`` decides how tensors are grouped into files, not
their values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from uncurl_hf.errors import UncurlError
from uncurl_hf.settings import setting

DEVICES = ("cpu", "cuda", "mps", "auto")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class RunOptions:
    """Execution settings of :func:`uncurl_hf.prune` (see the module docstring)."""

    overwrite: bool = setting(False, "--overwrite", action="store_true", help="replace an existing output folder")
    dry_run: bool = setting(
        False, "--dry-run", action="store_true",
        help="calibrate and plan, print the plan (counts, groups, bytes before/after) and write only the plan",
    )
    plan_out: str | None = setting(None, "--plan-out", metavar="PATH", help="also write the pruning plan JSON here")
    device: str = setting(
        "cpu", "--device", metavar="DEVICE",
        help="calibration device: cpu, cuda, cuda:N, mps, or auto (accelerate's device_map over the devices)",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = setting(
        "auto", "--dtype", choices=DTYPES,
        help="calibration dtype (auto: the checkpoint's); statistics are float64 on CPU, output = source dtype",
    )
    revision: str | None = setting(None, "--revision", metavar="REV", help="Hub revision of a Hub model id")
    streaming: bool = setting(
        False, "--streaming", action="store_true",
        help="write out of core, one layer in memory at a time (same files); with --plan the model is never loaded",
    )
    offload: bool = setting(
        False, "--offload", action="store_true",
        help="calibrate with the weights left on disk, one transformer block in memory at a time",
    )
    max_shard_size: str = setting("2GB", "--max-shard-size", metavar="SIZE", help="largest weight file (default 2GB)")
    fsync: bool = setting(
        True, "--no-fsync", action="store_false",
        help="do not fsync the output (faster on slow disks; `uncurl verify OUT` tells whether a crash cut it short)",
    )
    allow_pickle: bool = setting(
        False, "--allow-pickle", action="store_true",
        help="read pickle-only (.bin) weights with torch.load(weights_only=True); refused by default",
    )
    trust_remote_code: bool = setting(
        False, "--trust-remote-code", action="store_true",
        help="let transformers run Python code shipped with the checkpoint (auto_map); refused by default",
    )
    progress: bool = setting(True, "--no-progress", action="store_false", help="hide progress bars")
    evaluate: bool = setting(
        False, "--evaluate", action="store_true",
        help="score the original and the pruned model on the task's test split and put both in the model card",
    )
    eval_limit: int | None = setting(None, "--eval-limit", metavar="N", help="with --evaluate: the first N examples")
    card: bool = setting(True, "--no-card", action="store_false", help="do not write README.md (the model card)")
    base_model_id: str | None = setting(None, "--base-model-id", metavar="NS/NAME",
                                        help="Hub id of the source model, for the card's base_model")
    push_to_hub: bool = setting(False, "--push-to-hub", action="store_true",
                                help="upload the output folder to --repo-id when done")
    repo_id: str | None = setting(None, "--repo-id", metavar="NS/NAME", help="with --push-to-hub: the Hub model repo")
    hub_token: str | None = setting(None, "--token", help="Hub token (default: HF_TOKEN or `hf auth login`)")
    private: bool = setting(False, "--private", action="store_true", help="with --push-to-hub: create it private")
    hub_exist_ok: bool = setting(False, "--hub-exist-ok", action="store_true",
                                 help="with --push-to-hub: upload into an existing repo")

    def __post_init__(self) -> None:
        base = self.device.split(":", 1)[0] if isinstance(self.device, str) else None
        if base not in DEVICES or (":" in self.device and base not in ("cuda", "mps")):
            raise UncurlError(f"--device must be one of {', '.join(DEVICES)} (or cuda:N), got {self.device!r}.")
        if self.dtype not in DTYPES:
            raise UncurlError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}.")
        if self.eval_limit is not None and (isinstance(self.eval_limit, bool) or not isinstance(self.eval_limit, int)
                                            or self.eval_limit < 1):
            raise UncurlError(f"--eval-limit must be an integer >= 1, got {self.eval_limit!r}.")
        if self.dry_run and (self.push_to_hub or self.evaluate):
            raise UncurlError("--dry-run writes only the plan; drop --push-to-hub / --evaluate.")
