"""``uncurl prune``: its flags come from the recipe and the run options (:mod:`uncurl_hf.cli.arguments`).

``uncurl prune SRC --recipe r.yaml -o OUT`` runs a recipe file; every recipe flag given on the command line
overrides the file's value (a flag choosing the expert counts or the data source replaces the file's choice).
"""

from __future__ import annotations

import argparse
from typing import Any

from uncurl_hf.cli.arguments import add_settings, given, method_arg
from uncurl_hf.options import RunOptions
from uncurl_hf.recipe import CalibrationSpec, PruneRecipe

COUNT_CHOICES = ("factor", "num_experts_per_layer", "max_drop", "plan")  # exactly one decides the expert counts
DATA_CHOICES = ("task", "file")  # exactly one is the calibration source


def add_prune_parser(sub: Any) -> None:
    p = sub.add_parser("prune", help="prune a sparse MoE checkpoint for a task")
    p.add_argument("model", help="checkpoint folder, zoo model name (uncurl zoo list) or Hub id (namespace/name)")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--recipe", metavar="RECIPE.yaml",
                   help="a recipe file (uncurl_recipe.yaml of an output, or your own); flags given override it")
    p.add_argument(
        "--method-arg", action="append", type=method_arg, default=[], metavar="KEY=VALUE", dest="method_args",
        help="method option (repeatable), e.g. --method-arg router=anchor (`uncurl methods` lists them)",
    )
    p.add_argument("--uniform", action="store_true",
                   help="adaptive methods (uncurl, msmoe): keep floor(E / factor) experts in every layer "
                   "(= --method-arg uniform=true)")
    add_settings(p, PruneRecipe)
    add_settings(p, CalibrationSpec)
    add_settings(p, RunOptions)
    p.set_defaults(func=cmd_prune)


def recipe_from_args(args: argparse.Namespace) -> PruneRecipe:
    """The recipe file (if any) with the command line's recipe flags on top."""
    data = PruneRecipe.load(args.recipe).to_dict() if args.recipe else {}
    data.pop("format", None)
    top = given(args, PruneRecipe)
    calibration = given(args, CalibrationSpec)
    if any(name in top for name in COUNT_CHOICES):
        for name in COUNT_CHOICES:
            data.pop(name, None)
    if "plan" in top:
        data.pop("method", None)
        data.pop("method_options", None)
    options = dict(data.get("method_options") or {})
    options.update(dict(args.method_args))
    if args.uniform:
        options["uniform"] = True
    if options:
        top["method_options"] = options
    spec = dict(data.pop("calibration", None) or {})
    if any(name in calibration for name in DATA_CHOICES):
        for name in DATA_CHOICES:
            spec.pop(name, None)
    spec.update(calibration)
    return PruneRecipe.from_dict({**data, **top, "calibration": spec}, where="the command line's recipe")


def cmd_prune(args: argparse.Namespace) -> int:
    """``uncurl prune SRC (--task T | --calibration-file F) (--factor F | --num-experts-per-layer K,..) -o OUT``,
    ``uncurl prune SRC --recipe r.yaml -o OUT`` or ``uncurl prune SRC --plan PLAN.json -o OUT``."""
    from uncurl_hf.calibration.distributed import process_rank
    from uncurl_hf.pipeline.prune import prune

    recipe = recipe_from_args(args)
    options = RunOptions(**given(args, RunOptions))
    result = prune(args.model, recipe, args.output, options)
    if process_rank() != 0:  # torchrun: rank 0 prints (and wrote) the result
        return 0
    print(result.summary_table())
    search = result.plan.metadata.get("max_drop")
    if search:
        print(f"--max-drop {search['max_drop_points']:g}: {search['metric']} on {search['split']} "
              f"({search['num_examples']} examples) {search['unpruned_score']:.4f} -> {search['chosen_score']:.4f} "
              f"(floor {search['floor']:.4f}), {search['evaluations']} candidates scored")
    return 0
