"""What a recovery run is given (:class:`RecoverConfig`, the ``uncurl recover`` flags) and what it returns
(:class:`RecoverResult`, :class:`SplitScore`), plus the command line equivalent to a config (quoted in the card).
"""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from uncurl_hf.errors import RecoveryError
from uncurl_hf.recover.targets import split_names
from uncurl_hf.settings import setting

SAVE_CHOICES = ("adapter", "merged")
RECOVERY_FILENAME = "uncurl_recovery.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class RecoverConfig:
    """Settings of one recovery run (what ``uncurl recover`` flags set).

    ``target_modules`` is a PEFT target: a regular expression matched against full module names, or a list of
    name suffixes; ``target_parameters`` lists suffixes of fused ``nn.Parameter`` names (the decoders' experts).
    Both ``None`` (the default) adapt the family's default targets (:mod:`uncurl_hf.recover.targets`); either given
    replaces them, and exactly what is given is adapted. ``warmup`` of ``None`` means 10% of the steps.
    ``train_limit``/``eval_limit`` take the first N examples of the train / evaluation splits (quick checks, tests).
    """

    task: str = setting(None, "--task", required=True, help="registered task (trained on train, scored on dev)")
    steps: int = setting(200, "--steps", help="optimizer steps (default 200)")
    lr: float = setting(1e-3, "--lr", help="peak AdamW learning rate (default 1e-3)")
    rank: int = setting(8, "--rank", help="LoRA rank r (default 8)")
    alpha: float = setting(16.0, "--alpha", help="LoRA alpha (default 16)")
    dropout: float = setting(0.0, "--dropout", help="LoRA dropout (default 0)")
    batch_size: int = setting(16, "--batch-size", help="training batch size (default 16)")
    seed: int = setting(0, "--seed", help="seed of the LoRA initialization and the batch order (default 0)")
    warmup: int | None = setting(None, "--warmup", help="warm-up steps (default 10%% of --steps)")
    weight_decay: float = setting(0.0, "--weight-decay", help="AdamW weight decay (default 0)")
    target_modules: str | tuple[str, ...] | None = setting(
        None, "--target-modules", metavar="REGEX",
        help="modules to adapt (regex over full module names); default: the family's attention q/k/v/o + the "
             "surviving experts (uncurl_hf/recover/targets.py). Given, it replaces the defaults",
    )
    target_parameters: str | tuple[str, ...] | None = setting(
        None, "--target-parameters", metavar="NAMES",
        help="fused nn.Parameters to adapt, comma-separated name suffixes (e.g. mlp.experts.gate_up_proj); "
             "given, it replaces the defaults",
    )
    save: str = setting(
        "adapter", "--save", choices=SAVE_CHOICES,
        help="adapter: PEFT adapter folder; merged: LoRA folded in (merge_and_unload), a normal checkpoint",
    )
    eval_test: bool = setting(False, "--eval-test", action="store_true",
                              help="also score the test split before and after")
    eval_limit: int | None = setting(None, "--eval-limit", metavar="N",
                                     help="score only the first N examples of each split")
    train_limit: int | None = setting(None, "--train-limit", metavar="N",
                                      help="train on the first N train examples only")
    max_length: int = setting(
        128, "--max-length",
        help="max source tokens per seq2seq training example (default 128; decoders: the task prompt's own limit, "
             "the one scoring uses)",
    )

    @property
    def warmup_steps(self) -> int:
        return self.warmup if self.warmup is not None else max(1, self.steps // 10)

    @property
    def eval_splits(self) -> tuple[str, ...]:
        return ("dev", "test") if self.eval_test else ("dev",)

    def validate(self) -> None:
        """Refuse settings that cannot train, naming the flag to change (before anything is loaded)."""
        checks = [
            (isinstance(self.steps, int) and self.steps >= 1, f"--steps must be an integer >= 1, got {self.steps!r}."),
            (self.lr > 0, f"--lr must be > 0, got {self.lr!r}."),
            (isinstance(self.rank, int) and self.rank >= 1, f"--rank must be an integer >= 1, got {self.rank!r}."),
            (self.alpha > 0, f"--alpha must be > 0, got {self.alpha!r}."),
            (0 <= self.dropout < 1, f"--dropout must be in [0, 1), got {self.dropout!r}."),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size!r}."),
            (self.warmup is None or self.warmup >= 0, f"--warmup must be >= 0, got {self.warmup!r}."),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay!r}."),
            (self.save in SAVE_CHOICES, f"--save must be one of {', '.join(SAVE_CHOICES)}, got {self.save!r}."),
            (self.eval_limit is None or self.eval_limit >= 1, f"--eval-limit must be >= 1, got {self.eval_limit!r}."),
            (self.train_limit is None or self.train_limit >= 1,
             f"--train-limit must be >= 1, got {self.train_limit!r}."),
            (self.target_modules is None or bool(self.target_modules),
             "--target-modules must name at least one module pattern."),
            (self.target_parameters is None or bool(split_names(self.target_parameters)),
             "--target-parameters must name at least one parameter."),
        ]
        for ok, message in checks:
            if not ok:
                raise RecoveryError(message)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for name in ("target_modules", "target_parameters"):
            if isinstance(data[name], tuple):
                data[name] = list(data[name])
        return data


@dataclass(frozen=True)
class SplitScore:
    """The task metric on one split, before (pruned) and after recovery."""

    split: str
    num_examples: int
    before: float
    after: float

    @property
    def delta(self) -> float:
        return self.after - self.before


@dataclass
class RecoverResult:
    """What a recovery run produced. ``losses`` holds the training loss of every step; ``model`` is the recovered
    model in memory (the ``PeftModel`` for ``save="adapter"``, the merged model otherwise), in eval mode."""

    output_dir: Path
    config: RecoverConfig
    metric: str
    scores: dict[str, SplitScore]
    losses: list[float]
    trainable_params: int
    total_params: int
    train_time_s: float
    wall_time_s: float
    files: list[str] = field(default_factory=list)
    model: Any = field(default=None, repr=False)

    def summary_table(self) -> str:
        """Plain-text table: metric per split before/after, trainable parameters, loss and time."""
        rows = [("", "pruned", "recovered", "change")]
        for s in self.scores.values():
            rows.append((f"{self.metric} ({s.split}, n={s.num_examples})", f"{s.before:.4f}", f"{s.after:.4f}",
                         f"{s.delta:+.4f}"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [f"{r[0]:<{widths[0]}}  " + "  ".join(f"{v:>{widths[i]}}" for i, v in enumerate(r) if i) for r in rows]
        share = self.trainable_params / self.total_params if self.total_params else 0.0
        lines.append(f"LoRA r={self.config.rank}: {self.trainable_params:,} trainable parameters "
                     f"({share:.2%} of {self.total_params:,}); {self.config.steps} steps, loss "
                     f"{self.losses[0]:.4f} -> {self.losses[-1]:.4f} in {self.train_time_s:.1f} s")
        lines.append(f"wrote {self.config.save} to {self.output_dir} in {self.wall_time_s:.1f} s")
        return "\n".join(lines)


def recover_command(source_name: str, config: RecoverConfig) -> str:
    """The ``uncurl recover`` command equivalent to ``config`` (output shown as ``OUTPUT_DIR``)."""
    default = RecoverConfig(task=config.task)
    args = ["uncurl", "recover", source_name, "--task", config.task, "--steps", str(config.steps),
            "--lr", f"{config.lr:g}", "--rank", str(config.rank), "--save", config.save, "-o", "OUTPUT_DIR"]
    optional = [("--alpha", "alpha", "g"), ("--dropout", "dropout", "g"), ("--batch-size", "batch_size", ""),
                ("--seed", "seed", ""), ("--warmup", "warmup", ""), ("--weight-decay", "weight_decay", "g"),
                ("--eval-limit", "eval_limit", ""), ("--train-limit", "train_limit", ""),
                ("--max-length", "max_length", "")]
    for flag, name, spec in optional:
        value = getattr(config, name)
        if value != getattr(default, name):
            args += [flag, format(value, spec) if spec else str(value)]
    given = (("--target-modules", config.target_modules), ("--target-parameters", config.target_parameters))
    for flag, targets in given:
        if targets is not None:
            args += [flag, targets if isinstance(targets, str) else ",".join(targets)]
    if config.eval_test:
        args.append("--eval-test")
    return shlex.join(args)
