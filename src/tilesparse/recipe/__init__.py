"""Recipes: one YAML file from a model to evaluated, exported hybrid-sparse models and a report."""

from .runner import RecipeRunner, RunResult, RunSpec, run_recipe
from .schema import Recipe, default_recipe_path, load_recipe, parse_recipe

__all__ = ["RecipeRunner", "RunResult", "RunSpec", "run_recipe", "Recipe", "default_recipe_path",
           "load_recipe", "parse_recipe"]
