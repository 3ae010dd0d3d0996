import pytest

from tilesparse.errors import TilesparseError
from tilesparse.recipe import default_recipe_path, load_recipe, parse_recipe


def base(**over):
    d = {"model": "m", "methods": [{"name": "dense", "kind": "dense"}]}
    d.update(over)
    return d


def test_default_recipe_is_valid():
    r = load_recipe(default_recipe_path())
    names = [m.name for m in r.methods]
    assert names == ["dense", "sparsegpt-2:4", "patch-joint"]
    assert r.methods[2].targets() == [0.25, 0.45] and r.methods[2].refit_keep == "tiles"
    assert r.methods[1].targets() == [0.5]


@pytest.mark.parametrize("data,msg", [
    (base(modle="x"), "unknown key 'modle' (did you mean 'model'?)"),
    (base(data={"calib_sample": 3}), "unknown key 'data.calib_sample' (did you mean 'calib_samples'?)"),
    (base(methods=[{"name": "a", "kind": "learn", "mode": "joint", "sparsities": [0.3], "stpes": 3}]),
     "did you mean 'steps'"),
    (base(methods=[{"name": "a", "kind": "learn", "mode": "joint", "sparsities": [0.6]}]), "outside [0, 0.5]"),
    (base(methods=[{"name": "a", "kind": "oneshot", "method": "wanda", "pattern": "unstructured",
                    "sparsities": [1.0]}]), "outside [0, 1.0)"),
    (base(methods=[{"name": "a", "kind": "learn", "mode": "joint"}]), "needs 'sparsities'"),
    (base(methods=[{"name": "a", "kind": "learn", "mode": "wild", "sparsities": [0.3]}]),
     "'methods[0].mode' must be one of joint, tile, maskllm, got 'wild'"),
    (base(methods=[{"name": "a", "kind": "oneshot", "method": "obs", "pattern": "2:4"}]),
     "'methods[0].method' must be one of magnitude, wanda, sparsegpt"),
    (base(methods=[{"name": "a", "kind": "learn", "mode": "joint", "sparsities": [0.3], "steps": 0}]), ">= 1"),
    (base(methods=[{"name": "a", "kind": "dense"}, {"name": "a", "kind": "dense"}]), "used twice"),
    (base(methods=[]), "at least one method"),
    (base(tile=30), "multiple of 4"),
    (base(evaluation={"perplexity": {"windows": "ten"}}), "must be an integer"),
    (base(evaluation={"zeroshot": {"enabled": "yes"}}), "true or false"),
    (base(evaluation={"zeroshot": {"tasks": ["mobydick_cloze", "helaswag"]}}),
     "'evaluation.zeroshot.tasks[1]': unknown task 'helaswag' (did you mean 'hellaswag'?)"),
    ([1, 2], "top level must be a mapping"),
])
def test_bad_recipes(data, msg):
    with pytest.raises(TilesparseError) as e:
        parse_recipe(data)
    assert msg in str(e.value)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(TilesparseError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    f = tmp_path / "r.yaml"
    f.write_text("model: [unclosed\n")
    with pytest.raises(TilesparseError, match="not valid YAML"):
        load_recipe(f)
