"""Methods, patterns, modes and priors: the recipe, the CLI and the Python configs accept exactly the same values."""

import argparse

import pytest

from tilesparse import options
from tilesparse.cli import build_parser
from tilesparse.errors import TilesparseError
from tilesparse.learning.config import make_config
from tilesparse.pruning import PruneConfig
from tilesparse.recipe import parse_recipe


def _choices(command: str, option: str) -> tuple:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    action = next(a for a in sub.choices[command]._actions if option in a.option_strings)
    return tuple(action.choices)


def _recipe(method: dict):
    return parse_recipe({"methods": [method]})


def test_the_cli_offers_exactly_the_defined_values():
    assert set(_choices("prune", "--method")) == set(options.PRUNE_METHODS)
    assert set(_choices("prune", "--pattern")) == set(options.PRUNE_PATTERNS)
    assert set(_choices("learn", "--mode")) == set(options.LEARN_MODES)
    assert set(_choices("learn", "--prior")) == set(options.PRIORS)


@pytest.mark.parametrize("method", options.PRUNE_METHODS)
@pytest.mark.parametrize("pattern", options.PRUNE_PATTERNS)
def test_every_pruning_method_and_pattern_everywhere(method, pattern):
    sparsity = 0.5 if pattern == "2:4" else 0.3
    assert PruneConfig(method=method, pattern=pattern, sparsity=sparsity).method == method
    r = _recipe({"name": "a", "kind": "oneshot", "method": method, "pattern": pattern, "sparsities": [sparsity]})
    assert (r.methods[0].method, r.methods[0].pattern) == (method, pattern)


@pytest.mark.parametrize("mode", options.LEARN_MODES)
@pytest.mark.parametrize("prior", options.PRIORS)
def test_every_learning_mode_and_prior_everywhere(mode, prior):
    if mode == "tile" and prior == "none":  # PATCH-Tile keeps a one-shot 2:4 pattern: refused by both
        with pytest.raises(TilesparseError, match="PATCH-Tile"):
            make_config(mode=mode, prior=prior)
        with pytest.raises(TilesparseError, match="PATCH-Tile"):
            _recipe({"name": "a", "kind": "learn", "mode": mode, "prior": prior, "sparsities": [0.3]})
        return
    assert (make_config(mode=mode, prior=prior).mode, make_config(mode=mode, prior=prior).prior) == (mode, prior)
    r = _recipe({"name": "a", "kind": "learn", "mode": mode, "prior": prior, "sparsities": [0.3]})
    assert (r.methods[0].mode, r.methods[0].prior) == (mode, prior)


@pytest.mark.parametrize("field,value", [("method", "obs"), ("pattern", "4:8")])
def test_an_unknown_pruning_value_is_refused_everywhere(field, value, capsys):
    with pytest.raises(TilesparseError):
        PruneConfig(**{"method": "wanda", "pattern": "2:4", field: value})
    with pytest.raises(TilesparseError):
        _recipe({"name": "a", "kind": "oneshot", "method": "wanda", "pattern": "2:4", field: value})
    with pytest.raises(SystemExit):
        build_parser().parse_args(["prune", f"--{field}", value, "--out", "x"])


@pytest.mark.parametrize("field,value", [("mode", "dense"), ("prior", "obs")])
def test_an_unknown_learning_value_is_refused_everywhere(field, value):
    with pytest.raises(TilesparseError):
        make_config(**{field: value})
    with pytest.raises(TilesparseError):
        _recipe({"name": "a", "kind": "learn", "mode": "joint", "sparsities": [0.3], field: value})
    with pytest.raises(SystemExit):
        build_parser().parse_args(["learn", f"--{field}", value, "--out", "x"])


def test_learn_and_prune_options_are_the_config_fields():
    from tilesparse.commands.config_args import cli_fields
    from tilesparse.learning.config import LearnConfig

    def dests(command):
        sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
        return {a.dest for a in sub.choices[command]._actions}

    assert set(cli_fields(LearnConfig)) <= dests("learn")
    assert set(cli_fields(LearnConfig)) == set(LearnConfig.model_fields) - {"dtype", "world_size"}
    assert {"method", "pattern", "sparsity", "tile", "update_weights", "damp", "blocksize"} <= dests("prune")


def test_learn_options_reach_the_config():
    from tilesparse.commands.learn import config_from_args

    args = build_parser().parse_args(["learn", "--out", "x", "--mode", "tile", "--density-scope", "block",
                                      "--tile-k", "10,20", "--tile", "64x128", "--hard-24", "--prior", "wanda"])
    cfg = config_from_args(args)
    assert (cfg.mode, cfg.density_scope, cfg.tile_k, cfg.tile, cfg.hard_24, cfg.prior) == \
        ("tile", "block", (10.0, 20.0), (64, 128), True, "wanda")
    assert cfg.hard_tile is False and cfg.l1 == 3.0  # not given: the mode's default
    resumed = config_from_args(build_parser().parse_args(["learn", "--resume", "x", "--steps", "9"]), cfg.to_dict())
    assert resumed.model_dump() == {**cfg.model_dump(), "steps": 9}


@pytest.mark.parametrize("options,msg", [
    ({"stpes": 3}, "unknown key 'methods[0].options.stpes' (did you mean 'steps'?)"),
    ({"density_scope": "blok"}, "'methods[0].options.density_scope' must be one of global, block, got 'blok'"),
    ({"tile_tau": [0, 1]}, "'methods[0]': tile_tau temperatures must be positive"),
])
def test_recipe_learning_options_are_checked_with_their_path(options, msg):
    with pytest.raises(TilesparseError) as e:
        _recipe({"name": "a", "kind": "learn", "mode": "joint", "sparsities": [0.3], "options": options})
    assert msg in str(e.value)


def test_every_boolean_config_field_defaults_to_off():
    """Generated boolean options can only turn a field on; a field that defaulted to on could not be turned off."""
    from tilesparse.commands.config_args import cli_fields
    from tilesparse.learning.config import LearnConfig

    for model in (LearnConfig, PruneConfig):
        for name in cli_fields(model):
            info = model.model_fields[name]
            if info.annotation is bool:
                assert info.default is False, f"{model.__name__}.{name}"
