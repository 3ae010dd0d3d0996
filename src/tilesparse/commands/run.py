"""``tilesparse run``: execute a recipe end to end (resuming finished stages)."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("run", help="run a recipe: prune/learn, evaluate, export, report",
                       description="Run a YAML recipe end to end. Stages already finished with the same "
                                   "settings are reused, so an interrupted run continues where it stopped.")
    p.add_argument("recipe", nargs="?", default=None,
                   help="recipe YAML (default: the packaged default recipe)")
    p.add_argument("--out", default=None, help="output folder (default: the recipe's 'output')")
    p.add_argument("--show", action="store_true", help="print the validated recipe and exit")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite report.md from the finished stages without computing anything")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..recipe import RecipeRunner, default_recipe_path, load_recipe, run_recipe
    from .common import print_json, quiet_libraries

    quiet_libraries()
    recipe = load_recipe(args.recipe or default_recipe_path())
    if args.show:
        print_json(recipe.to_dict())
        return 0
    if args.report_only:
        print(f"report: {RecipeRunner(recipe, args.out).report_only()}")
        return 0
    results = run_recipe(recipe, args.out)
    width = max(len(r.run_id) for r in results)
    for r in results:
        ppl = "  ".join(f"{t}: {v:.2f}" for t, v in r.perplexity.items())
        print(f"{r.run_id:<{width}}  sparsity {100 * r.measured_sparsity:5.1f} %  {ppl}")
    return 0
