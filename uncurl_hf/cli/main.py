"""``uncurl`` command line. One function per subcommand; :func:`build_parser` wires them, so new subcommands
(eval, zoo, demo-run, ...) are one ``add_parser`` block plus one function.

Every :class:`~uncurl_hf.errors.UncurlError` becomes ``error: <message>`` on stderr and a non-zero exit code, with
no traceback unless ``--debug``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from uncurl_hf._version import __version__
from uncurl_hf.cli.arguments import add_settings, given
from uncurl_hf.cli.prune import add_prune_parser
from uncurl_hf.recipe import CalibrationSpec
from uncurl_hf.recover.config import RecoverConfig
from uncurl_hf.errors import UncurlError
from uncurl_hf.io.memory import disable_onednn_primitive_cache

logger = logging.getLogger("uncurl_hf")

SWEEP_CALIBRATION = ("num_examples", "max_length", "batch_size", "seed", "max_logit_samples")


def cmd_study(args: argparse.Namespace) -> int:
    """``uncurl study [--small]``: build the study zoo, sweep it, write docs/study.md (tables + figure)."""
    from dataclasses import replace
    from pathlib import Path

    from uncurl_hf.experiments.study import SMALL, StudyConfig, run_study

    config = SMALL if args.small else StudyConfig()
    config = replace(config, workers=args.workers, **({"max_eval_examples": args.limit} if args.limit else {}))
    name = args.name or ("study_small" if args.small else "study")
    command = "uncurl study" + (" --small" if args.small else "") + (f" --limit {args.limit}" if args.limit else "")
    report = run_study(config, output=args.output, name=name, build=not args.no_build, progress=not args.no_progress,
                       command=command)
    print(f"wrote {Path(args.output) / (name + '.md')} ({len(report.table1)} threshold rows, "
          f"{len(report.table2)} pruned-vs-scratch rows) in {report.wall_time_s:.0f} s")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """``uncurl sweep MODEL --task T --methods M,.. --factors 1,2,4 -o DIR``: score every method at every factor
    (calibrated once, pruned in memory), write results.json/.csv + plot.png, print thresholds with bootstrap CIs."""
    import time

    from uncurl_hf.experiments.sweep import SweepConfig, run_sweep, split_methods
    from uncurl_hf.io.resolve import resolve_model

    try:
        factors = [float(v) for v in args.factors.split(",") if v.strip()]
    except ValueError:
        raise UncurlError(
            f"--factors expects comma-separated numbers >= 1 (e.g. 1,2,4,8), got {args.factors!r}."
        ) from None
    start = time.perf_counter()
    config = SweepConfig(
        model=str(resolve_model(args.model)), task=args.task, methods=tuple(split_methods(args.methods)),
        factors=tuple(factors), split=args.split, max_eval_examples=args.limit, tolerance=args.tolerance,
        bootstrap=args.bootstrap, calibration=CalibrationSpec(task=args.task, **given(args, CalibrationSpec)),
    )
    result = run_sweep(
        config, progress=not args.no_progress, output_dir=args.output, overwrite=args.overwrite,
    )
    print(result.format_table())
    print(f"wrote {result.output_dir} in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    """``uncurl push OUT --repo-id user/name``: upload a pruned output folder to the Hub (HF_ENDPOINT honoured)."""
    from uncurl_hf.io.hub import push_folder

    result = push_folder(
        args.folder, args.repo_id, token=args.token, private=args.private, exist_ok=args.exist_ok,
        overwrite=args.overwrite,
    )
    print(f"{'created' if result.created else 'updated'} {result.repo_url}\ncommit {result.commit_url}")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    """``uncurl methods``: registered pruning methods, one-line descriptions and their options (``--method-arg``)."""
    from uncurl_hf.methods import available_methods, get_method

    names = available_methods()
    width = max(len(n) for n in names)
    for name in names:
        method = get_method(name)
        print(f"{name:<{width}}  {method.description}")
        for line in method.option_lines():
            print(f"{'':<{width}}    {line}")
    return 0


def cmd_families(args: argparse.Namespace) -> int:
    """``uncurl families``: supported MoE architectures and the model types they accept."""
    from uncurl_hf.families import available_families, family_by_name

    for name in available_families():
        family = family_by_name(name)
        print(f"{name}  (model_type: {', '.join(family.model_types)})\n    {family.description}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """``uncurl eval SRC --task T [--reference ORIGINAL]``: metric (accuracy, or perplexity for a text task),
    params, disk MB and ms/example (batch 1 and batched); a causal LM also its perplexity; with ``--reference``, the
    original's score, the agreement of the predicted labels and KL(original || SRC). ``--harness TASKS`` instead
    runs lm-eval on the tasks (:func:`cmd_eval_harness`)."""
    from pathlib import Path

    from uncurl_hf.evaluation.scoring import evaluate_checkpoint
    from uncurl_hf.families import get_family
    from uncurl_hf.io.resolve import resolve_model
    from uncurl_hf.pipeline.source import check_evaluable_family

    args.model = str(resolve_model(args.model))  # a folder, a zoo name or a Hub id, as everywhere
    args.reference = str(resolve_model(args.reference)) if args.reference else None
    for folder in (args.model, args.reference):
        try:
            family = get_family(folder) if folder and (Path(folder) / "config.json").is_file() else None
        except UncurlError:
            family = None  # what is wrong with the folder is reported by the loader, as before
        if family is not None:
            check_evaluable_family(family)
    if args.harness:
        return cmd_eval_harness(args)
    result = evaluate_checkpoint(
        args.model, args.task, split=args.split, limit=args.limit, batch_size=args.batch_size,
        progress=not args.no_progress, reference=args.reference,
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        for key, value in result.to_dict().items():
            if value is not None:  # fields of the other model kind, or of a comparison not asked for
                print(f"{key:<24} {value}")
    return 0


def cmd_eval_harness(args: argparse.Namespace) -> int:
    """``uncurl eval SRC --harness TASKS [--reference ORIGINAL]``: lm-eval's acc on the tasks (original and SRC side
    by side) and the ``lm_eval`` command lines that reproduce them."""
    from uncurl_hf.evaluation.harness import evaluate_harness

    report = evaluate_harness(
        args.model, args.harness, reference=args.reference, split=args.split, limit=args.limit,
        batch_size=args.batch_size, progress=not args.no_progress,
    )
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format_table())
    return 0


def cmd_zoo(args: argparse.Namespace) -> int:
    """``uncurl zoo list | path NAME | build NAME``: the embedded tiny SMoE models."""
    from pathlib import Path

    from uncurl_hf.zoo import registry

    if args.zoo_command == "list":
        for name in registry.available_models():
            print(name)
    elif args.zoo_command == "path":
        print(registry.zoo_path(args.name, progress=not args.no_progress))
    else:
        from uncurl_hf.zoo.runtime import estimated_build_minutes

        out = Path(args.output) if args.output else registry.sources.cache_dir() / "zoo" / args.name
        minutes = estimated_build_minutes(registry.get_recipe(args.name))
        print(f"building {args.name} into {out}" + (f" (about {minutes} min on 2 cores)" if minutes else ""),
              file=sys.stderr)
        print(registry.build(args.name, out, progress=not args.no_progress))
    return 0


def cmd_demo_run(args: argparse.Namespace) -> int:
    """``uncurl demo-run``: the README's main command (prune the zoo model, print original vs pruned)."""
    from uncurl_hf.pipeline.quickstart import format_table, run_demo

    result = run_demo(
        model=args.model, task=args.task, method=args.method, factor=args.factor, output_dir=args.output,
        num_calibration_examples=args.num_calibration, limit=args.limit, progress=not args.no_progress,
    )
    print(f"\n{args.model} pruned x{args.factor:g} with {args.method} on {args.task} "
          f"in {result.prune_seconds:.1f} s -> {result.output_dir}\n")
    print(format_table(result.original, result.pruned))
    if args.specificity:
        import time

        from uncurl_hf.experiments.specificity import SpecificitySpec, format_specificity, run_specificity

        spec, start = SpecificitySpec(), time.perf_counter()
        rows = run_specificity(spec)
        seconds = time.perf_counter() - start
        print(f"\nTask-specific pruning: {spec.model} pruned x{spec.factors[0]:g} for ONE domain (calibrated on its "
              f"text), perplexity pruned / unpruned on every domain ({seconds:.0f} s)\n")
        print(format_specificity(rows))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """``uncurl demo``: the Gradio Space locally (original vs pruned side by side); offline, blocks until Ctrl-C."""
    from uncurl_hf.space.app import launch

    launch(
        base=args.base, pruned=args.pruned or None, host=args.host, port=args.port, share=args.share == "true",
        task=args.task, progress=not args.no_progress,
        request_timeout=args.request_timeout if args.request_timeout > 0 else None,
    )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """``uncurl verify OUT``: manifest hashes, config/plan/weights agreement, load + one forward pass."""
    from uncurl_hf.io.verify import verify_checkpoint

    report = verify_checkpoint(args.folder, forward=not args.no_forward)
    print(report.format())
    report.raise_for_failures()
    return 0


def cmd_recover(args: argparse.Namespace) -> int:
    """``uncurl recover PRUNED --task T --steps N -o OUT``: LoRA fine-tune of a pruned checkpoint (peft), scores
    before/after on the dev split, saved as an adapter or merged into the weights."""
    from uncurl_hf.recover.train import recover

    config = RecoverConfig(**given(args, RecoverConfig))
    result = recover(args.model, args.output, config, overwrite=args.overwrite, progress=not args.no_progress)
    print(result.summary_table())
    return 0


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="uncurl",
        description="Task-specific expert pruning and merging for sparse mixture-of-experts models.",
    )
    parser.add_argument("--version", action="version", version=f"uncurl-hf {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    add_prune_parser(sub)

    p = sub.add_parser("sweep", help="score methods x factors (one calibration), thresholds with bootstrap CIs, plot")
    p.add_argument("model", help="checkpoint folder or zoo model name (tiny-switch-8)")
    p.add_argument("--task", required=True, help="registered task")
    p.add_argument("--methods", default="frequency,uncurl", help="comma-separated method specs (name[:key=value])")
    p.add_argument("--factors", default="1,2,4,8", help="comma-separated factors (1 = unpruned, always included)")
    p.add_argument("-o", "--output", required=True, help="output folder (results.json, results.csv, plot.png)")
    p.add_argument("--tolerance", type=_number, default=1.0, help="allowed drop in points (default 1.0)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CI (0: none)")
    p.add_argument("--split", default="test", choices=["train", "dev", "test"], help="split to score")
    p.add_argument("--limit", type=int, help="score only the first N examples of the split")
    add_settings(p, CalibrationSpec, only=SWEEP_CALIBRATION)  # the task's train split: the recipe's other fields
    p.add_argument("--overwrite", action="store_true", help="replace an existing sweep folder")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("study", help="the paper's study: zoo of E=1..64 SMoEs, sweeps, thresholds, pruned vs scratch")
    p.add_argument("--small", action="store_true", help="E in {8,16} (+ E=4 from scratch), sentiment only (~1 min "
                   "with models built; training them first takes ~40 min on 2 cores)")
    p.add_argument("-o", "--output", default="docs", help="folder for <name>.md/.json and <name>_sweep.png")
    p.add_argument("--name", help="file stem (default study / study_small)")
    p.add_argument("--workers", type=int, default=2, help="parallel training processes (one torch thread each)")
    p.add_argument("--limit", type=int, help="score only the first N test examples (quick checks)")
    p.add_argument("--no-build", action="store_true", help="fail instead of training missing zoo models")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("recover", help="LoRA fine-tune a pruned checkpoint on its task (needs peft)")
    p.add_argument("model", help="pruned output folder written by `uncurl prune`")
    add_settings(p, RecoverConfig)  # every flag is a RecoverConfig field
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=cmd_recover)

    p = sub.add_parser("verify", help="check an output folder: hashes, config/plan/weights agreement, forward pass")
    p.add_argument("folder", help="output folder written by `uncurl prune`")
    p.add_argument("--no-forward", action="store_true", help="skip loading the model and the forward pass")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("push", help="upload a pruned output folder to the Hugging Face Hub")
    p.add_argument("folder", help="output folder written by `uncurl prune`")
    p.add_argument("--repo-id", required=True, metavar="NS/NAME", help="target model repo, e.g. alice/switch-x4")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--token", help="Hub token (default: HF_TOKEN, then the token saved by `hf auth login`)")
    existing = p.add_mutually_exclusive_group()
    existing.add_argument(
        "--exist-ok", action="store_true", help="upload into an existing repo (same-named files replaced, others kept)"
    )
    existing.add_argument(
        "--overwrite", action="store_true", help="make an existing repo mirror the folder (other remote files deleted)"
    )
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("methods", help="list pruning methods")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("families", help="list supported MoE model families")
    p.set_defaults(func=cmd_families)

    p = sub.add_parser("eval", help="evaluate a checkpoint on a task (metric, size, latency), or run lm-eval on it")
    p.add_argument("model", help="checkpoint folder")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--task", help="registered task")
    what.add_argument("--harness", metavar="TASKS",
                      help="run lm-evaluation-harness on comma-separated classification tasks (sentiment,topic,"
                           "hedge) and print the lm_eval command that reproduces it (pip install 'uncurl-hf[eval]')")
    p.add_argument("--split", default="test", choices=["train", "dev", "test"])
    p.add_argument("--limit", "--eval-limit", dest="limit", type=int, help="only the first N examples")
    p.add_argument("--batch-size", type=int, default=64, help="examples per forward pass (default 64)")
    p.add_argument("--reference", metavar="ORIGINAL",
                   help="the model MODEL was pruned from: also report its score, label agreement and "
                        "KL(ORIGINAL || MODEL) (next-token KL for causal LMs)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("zoo", help="the embedded tiny SMoE models (list, path, build)")
    zoo = p.add_subparsers(dest="zoo_command", metavar="ZOO_COMMAND")
    zoo.required = True
    zoo.add_parser("list", help="list zoo models")
    zp = zoo.add_parser("path", help="print a zoo model's folder (never trains: `uncurl zoo build NAME` does)")
    zp.add_argument("name")
    zb = zoo.add_parser("build", help="run a zoo recipe (pretrain + fine-tune) into the cache or -o DIR")
    zb.add_argument("name")
    zb.add_argument("-o", "--output", help="output folder (default: the cache)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=cmd_zoo)

    p = sub.add_parser("demo-run", help="prune the embedded tiny-switch-8 and compare it with the original, then "
                       "show task-specific pruning on the embedded decoder")
    p.add_argument("--model", default="tiny-switch-8", help="zoo model name")
    p.add_argument("--task", default="sentiment")
    p.add_argument("--method", default="frequency")
    p.add_argument("--factor", type=_number, default=2.0)
    p.add_argument("-o", "--output", default="outputs/tiny-switch-8-sentiment", help="where the pruned model goes")
    p.add_argument("--num-calibration", type=int, default=256)
    p.add_argument("--limit", type=int, help="evaluate on the first N test examples only")
    p.add_argument("--no-specificity", dest="specificity", action="store_false",
                   help="skip the few lines of task-specific pruning on the embedded decoder")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=cmd_demo_run)

    p = sub.add_parser("demo", help="launch the Gradio Space locally: original vs pruned side by side (offline)")
    p.add_argument("--base", default="tiny-switch-8", help="base model: zoo name, folder, or cached Hub id")
    p.add_argument(
        "--pruned", action="append", default=[], metavar="MODEL",
        help="pruned checkpoint to offer (repeatable); default: prune --base x2/x4/x8 with frequency into the cache",
    )
    p.add_argument("--task", default="sentiment", help="classification task whose examples the page offers")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 to expose it)")
    p.add_argument("--port", type=int, help="port (default: Gradio's first free port from 7860)")
    p.add_argument("--share", choices=["true", "false"], default="false", help="create a public gradio.live link")
    p.add_argument("--request-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="processing budget of one request; longer ones stop with a message (0: no limit)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars while preparing models")
    p.set_defaults(func=cmd_demo)
    return parser


def _configure_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(level)
    if verbosity < 2:  # transformers' own warnings and load/save progress bars are noise for CLI users
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    _configure_logging(args.verbose)
    disable_onednn_primitive_cache()  # before any matmul: see its docstring
    try:
        return int(args.func(args) or 0)
    except UncurlError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - last-resort message; --debug shows the traceback
        if args.debug:
            raise
        print(f"error: unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
