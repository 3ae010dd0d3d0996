"""Zero-shot evaluation through lm-eval: task building (BIG-bench JSON, cloze) and end-to-end runs."""

from __future__ import annotations

import io
import json
import random
import re
import tarfile

import pytest
import yaml

from tilesparse.data.bigbench import BIGBENCH_TASKS, MEMBER_PREFIX, convert_task, format_example
from tilesparse.data.cloze import build_cloze, normalize_text
from tilesparse.errors import TilesparseError

pytest.importorskip("lm_eval")

from tilesparse.evaluation import zeroshot as zs  # noqa: E402

STORY = (
    "Chapter 1\n\n"
    "Anne walked to the garden with her sister Mary. The garden was quiet and green, and Mary spoke "
    "of the house at Kellynch. Anne listened, and thought of the sea. \"Shall we go to Lyme?\" asked "
    "Mary. Anne said that she would like to see Lyme again, and the sea, and the Cobb. They walked on "
    "past the orchard and the old wall, and came back to the house.\n\n"
    "In the evening the family sat by the fire. Charles read the newspaper and talked of the hunting, "
    "and Mary complained of her health, while Anne sat with the children and told them about the sea "
    "at Lyme and the Cobb. The children laughed and asked for more stories about the Cobb. Charles "
    "said that the weather would be fine tomorrow, and that they should all walk to Uppercross. Mary "
    "agreed at last, for she liked Uppercross.\n"
)
TEXT = "\n\n".join([STORY] * 3)


def synthetic_task(n: int = 12, *, append: bool | None = None) -> dict:
    task = {"name": "synthetic", "description": "x", "keywords": [], "metrics": ["multiple_choice_grade"],
            "examples": []}
    if append is not None:
        task["append_choices_to_input"] = append
    for i in range(n):
        right = f"answer {i}"
        task["examples"].append({"input": f"Question number {i}?",
                                 "target_scores": {f"wrong {i}": 0, right: 1, f"bad {i} ": 0}})
    task["examples"].append({"input": "generative, skipped", "target": "x"})
    return task


# ------------------------------------------------------------------------------------- BIG-bench
def test_format_example_styles():
    task = {"task_prefix": "Answer.\n", "example_input_prefix": "\nQ: ", "example_output_prefix": "\nA: "}
    ex = {"input": "Which?", "target_scores": {"no": 0, "yes ": 1}}
    # BIG-bench's own zero-shot format: choices listed in the query
    doc = format_example(ex, task, random.Random(0), style="bigbench")
    assert doc["choices"] == ["no", "yes"] and doc["gold"] == 1
    assert doc["query"].startswith("Answer.\n\nQ: Which?\n  choice: ")
    assert doc["query"].endswith("\nA:") and "choice: no" in doc["query"] and "choice: yes" in doc["query"]
    doc = format_example(ex, {**task, "append_choices_to_input": False}, random.Random(0), style="bigbench")
    assert doc["query"] == "Answer.\n\nQ: Which?\nA:"
    # plain (default): the task's own prefixes only, choices not listed
    assert format_example(ex, task, random.Random(0))["query"] == "Answer.\n\nQ: Which?\nA:"
    assert format_example(ex, {}, random.Random(0))["query"] == "Which?\nAnswer:"
    ex2 = {"input": "The most reasonable goal of 'X' is ", "target_scores": {"a": 1, "b": 0}}
    assert format_example(ex2, {}, random.Random(0))["query"] == "The most reasonable goal of 'X' is"
    with pytest.raises(ValueError):
        format_example({"input": "x", "target_scores": {"a": 0, "b": 0}}, task, random.Random(0))


def test_convert_bigbench_json_to_jsonl_and_yaml(tmp_path):
    task = synthetic_task(12)
    docs = convert_task(task, "synthetic", limit=5, seed=1)
    assert len(docs) == 5
    assert docs == convert_task(task, "synthetic", limit=5, seed=1)  # deterministic
    assert docs == convert_task(task, "synthetic", limit=8, seed=1)[:5]  # nested selections
    assert len(convert_task(task, "synthetic", limit=None)) == 12  # the generative example is skipped
    for d in docs:
        assert d["choices"][d["gold"]] == f"answer {d['idx']}"
        assert d["query"] == f"Question number {d['idx']}?\nAnswer:"
    path = zs.write_multiple_choice_task(tmp_path, "synthetic_mc", docs)
    cfg = yaml.safe_load(path.read_text())
    assert cfg["task"] == "synthetic_mc" and cfg["output_type"] == "multiple_choice"
    assert cfg["dataset_path"] == "json" and cfg["test_split"] == "test"
    assert (cfg["doc_to_text"], cfg["doc_to_choice"], cfg["doc_to_target"]) == ("query", "choices", "gold")
    assert [m["metric"] for m in cfg["metric_list"]] == ["acc", "acc_norm"]
    assert all(m["aggregation"] == "mean" and m["higher_is_better"] for m in cfg["metric_list"])
    lines = (tmp_path / "synthetic_mc.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == docs
    assert cfg["dataset_kwargs"]["data_files"]["test"] == str(tmp_path / "synthetic_mc.jsonl")
    assert zs.local_task_names(tmp_path) == ["synthetic_mc"]


def _fake_sdist(path):
    with tarfile.open(path, "w:gz") as tar:
        for name, rel in BIGBENCH_TASKS.items():
            data = json.dumps(synthetic_task(6)).encode()
            info = tarfile.TarInfo(MEMBER_PREFIX + rel)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_prepare_tasks_builds_and_caches(tmp_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("TILESPARSE_BIGBENCH_SDIST", str(_fake_sdist(tmp_path / "bigbench-1.0.0.tar.gz")))
    monkeypatch.setattr(zs, "cloze_text", lambda: TEXT)
    out = zs.prepare_tasks(limit=4)
    assert out == tmp_cache / "zeroshot" / "tasks-4"
    assert sorted(zs.local_task_names(out)) == sorted(zs.LOCAL_TASKS)
    info = zs.task_info(out)
    assert all(info[t]["n"] <= 4 for t in zs.LOCAL_TASKS) and info["bb_winowhy"]["n"] == 4
    assert info["bb_winowhy"]["chance"] == pytest.approx(1 / 3, abs=1e-3)
    for rel in BIGBENCH_TASKS.values():  # only the task files are kept
        assert (tmp_cache / "zeroshot" / "bigbench" / rel).is_file()
    stamp = (out / "bb_social_iqa.jsonl").stat().st_mtime_ns
    monkeypatch.setenv("TILESPARSE_BIGBENCH_SDIST", str(tmp_path / "missing.tar.gz"))  # not needed again
    assert zs.prepare_tasks(limit=4) == out
    assert (out / "bb_social_iqa.jsonl").stat().st_mtime_ns == stamp
    assert zs.prepare_tasks(limit=2) == tmp_cache / "zeroshot" / "tasks-2"  # task.json files reused
    with pytest.raises(TilesparseError, match="positive"):
        zs.prepare_tasks(limit=0)


# ------------------------------------------------------------------------------------- cloze
def test_cloze_builder_is_deterministic_and_well_formed():
    items = build_cloze(TEXT, limit=None, min_words=10, max_words=40)
    assert items, "no cloze items"
    norm = normalize_text(TEXT)
    assert "Chapter" not in norm
    for it in items:
        word = it["target"][1:]
        assert it["target"] == " " + word and re.fullmatch(r"[A-Za-z]{3,}", word)
        assert not it["context"].endswith(word)  # the held-out word is not in the context's end
        # context + target is a passage of the text that ends a sentence right after the target
        pos = norm.find(it["context"] + it["target"])
        assert pos >= 0 and norm[pos + len(it["context"] + it["target"])] in ".!?"
        assert 10 <= len(it["context"].split()) <= 40
        assert re.search(rf"\b{word}\b", it["context"])  # LAMBADA-style: predictable from the passage
    again = build_cloze(TEXT, limit=3, min_words=10, max_words=40)
    assert again == items[:3] and again == build_cloze(TEXT, limit=3, min_words=10, max_words=40)
    assert build_cloze(TEXT, limit=3, seed=7, min_words=10, max_words=40) != again or len(items) <= 3


# ------------------------------------------------------------------------------------- end to end
@pytest.fixture
def tiny_loaded(tiny_model_dir):
    from tilesparse.models import load_model

    return load_model(str(tiny_model_dir))


def test_run_zeroshot_end_to_end_tiny_model(tmp_path, tiny_loaded, monkeypatch):
    inc = tmp_path / "tasks"
    mc = [{"query": f"Q: item {i}?\nA:", "choices": ["yes", "no", "maybe"], "gold": i % 3} for i in range(4)]
    zs.write_multiple_choice_task(inc, "tiny_mc", mc)
    # the raw log-likelihood of a choice never beats that of its own prefix: gold = prefix -> acc 1
    pref = [{"query": f"Say {w}:", "choices": [w, w + " and more words"], "gold": 0} for w in ("ab", "cd", "ef")]
    zs.write_multiple_choice_task(inc, "tiny_prefix", pref)
    zs.write_multiple_choice_task(inc, "tiny_antiprefix", [{**d, "gold": 1} for d in pref])
    zs.write_cloze_task(inc, "tiny_cloze", [{"context": "the cat sat on the", "target": " mat"}] * 3)
    monkeypatch.setattr(zs, "hub_reachable", lambda *a, **k: False)

    res = zs.run_zeroshot(tiny_loaded, ["tiny_mc", "tiny_prefix", "tiny_antiprefix", "tiny_cloze", "hellaswag"],
                          include_path=inc, batch_size=4, progress=False)
    assert [s.task for s in res.scores] == ["tiny_mc", "tiny_prefix", "tiny_antiprefix", "tiny_cloze"]
    assert res["tiny_mc"].n == 4 and res["tiny_cloze"].n == 3
    for s in res.scores:
        assert 0.0 <= s.acc <= 1.0
    assert 0.0 <= res["tiny_mc"].acc_norm <= 1.0 and res["tiny_cloze"].acc_norm is None
    assert res["tiny_cloze"].perplexity > 1.0
    assert res["tiny_prefix"].acc == 1.0 and res["tiny_antiprefix"].acc == 0.0
    assert res.unavailable == {"hellaswag": zs.UNREACHABLE}
    d = res.to_dict()
    assert json.loads(json.dumps(d))["tasks"]["tiny_mc"]["n"] == 4
    assert d["mean_acc"] == pytest.approx(sum(s.acc for s in res.scores) / 4)
    assert "hellaswag" in str(res) and "tiny_mc" in str(res)

    res2 = zs.run_zeroshot(tiny_loaded, "tiny_mc", include_path=inc, limit=2, progress=False)
    assert res2["tiny_mc"].n == 2 and not res2.unavailable


def test_run_zeroshot_bad_input(tmp_path, tiny_loaded):
    inc = tmp_path / "tasks"
    zs.write_multiple_choice_task(inc, "tiny_mc", [{"query": "Q:", "choices": ["a", "b"], "gold": 0}])
    with pytest.raises(TilesparseError, match="unknown zero-shot task"):
        zs.run_zeroshot(tiny_loaded, ["no_such_task"], include_path=inc)
    for bad in (0, -3, 1.5):
        with pytest.raises(TilesparseError, match="positive"):
            zs.run_zeroshot(tiny_loaded, ["tiny_mc"], include_path=inc, limit=bad)
    with pytest.raises(TilesparseError, match="batch_size"):
        zs.run_zeroshot(tiny_loaded, ["tiny_mc"], include_path=inc, batch_size=0)
    with pytest.raises(TilesparseError, match="does not exist"):
        zs.run_zeroshot(tiny_loaded, ["tiny_mc"], include_path=tmp_path / "nowhere")


def test_cli_zeroshot_errors(capsys, tmp_cache):
    from tilesparse.cli import main

    assert main(["zeroshot", "--tasks", "bb_social_iqa,nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown zero-shot task(s) nope") and "\n" not in err
    assert main(["zeroshot", "--limit", "0"]) == 2
    assert "--limit must be a positive integer" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.heavy
def test_default_model_above_chance_on_bigbench():
    """The embedded SmolLM2-135M-Instruct, dense, on 50 items of a real BIG-bench task (user cache).

    Measured: acc 0.50 on bb_step_inference (chance 0.25, stderr 0.07); see the README (Zero-shot evaluation).
    """
    from tilesparse.models import load_model

    res = zs.run_zeroshot(load_model(), ["bb_step_inference"], limit=50, progress=False)
    s = res["bb_step_inference"]
    assert s.n == 50 and 0.0 <= s.acc <= 1.0 and 0.0 <= s.acc_norm <= 1.0
    assert s.chance == pytest.approx(0.25, abs=0.01)
    assert s.acc > s.chance + 0.1
