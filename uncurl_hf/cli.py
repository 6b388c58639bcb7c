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
from uncurl_hf.errors import UncurlError

logger = logging.getLogger("uncurl_hf")


def cmd_prune(args: argparse.Namespace) -> int:
    """``uncurl prune SRC (--task T | --calibration-file F) --factor F --method M -o OUT``."""
    from uncurl_hf.pruning import prune

    result = prune(
        args.model,
        output_dir=args.output,
        factor=args.factor,
        method=args.method,
        task=args.task,
        calibration_file=args.calibration_file,
        num_calibration_examples=args.num_calibration,
        seed=args.seed,
        overwrite=args.overwrite,
        batch_size=args.batch_size,
        max_length=args.max_length,
        plan_out=args.plan_out,
        scale_expert_capacity=not args.keep_expert_capacity,
        method_kwargs=dict(args.method_arg),
        progress=not args.no_progress,
    )
    print(result.summary_table())
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    """``uncurl methods``: registered pruning methods with one-line descriptions."""
    from uncurl_hf.methods import available_methods, get_method

    names = available_methods()
    width = max(len(n) for n in names)
    for name in names:
        print(f"{name:<{width}}  {get_method(name).description}")
    return 0


def cmd_families(args: argparse.Namespace) -> int:
    """``uncurl families``: supported MoE architectures and the model types they accept."""
    from uncurl_hf.families import available_families, family_by_name

    for name in available_families():
        family = family_by_name(name)
        print(f"{name}  (model_type: {', '.join(family.model_types)})\n    {family.description}")
    return 0


def _method_arg(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with VALUE parsed as JSON when possible (numbers, true/false, lists), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


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

    p = sub.add_parser("prune", help="prune a sparse MoE checkpoint for a task")
    p.add_argument("model", help="local checkpoint folder (config.json + *.safetensors + tokenizer)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--task", help="registered task to calibrate on")
    source.add_argument("--calibration-file", help=".txt (one example per line) or .jsonl ('text', optional 'target')")
    p.add_argument("--factor", type=_number, required=True, help="keep floor(E / factor) experts per layer")
    p.add_argument("--method", default="frequency", help="pruning method (see `uncurl methods`)")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-calibration", type=int, default=256, help="calibration examples (default 256)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128, help="max tokens per calibration example")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--plan-out", help="also write the pruning plan JSON here")
    p.add_argument(
        "--method-arg", action="append", type=_method_arg, default=[], metavar="KEY=VALUE",
        help="method-specific option (repeatable), e.g. --method-arg linkage=average",
    )
    p.add_argument(
        "--keep-expert-capacity", action="store_true",
        help="do not raise the per-expert token capacity of pruned layers by E_old/E_new",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("methods", help="list pruning methods")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("families", help="list supported MoE model families")
    p.set_defaults(func=cmd_families)
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
