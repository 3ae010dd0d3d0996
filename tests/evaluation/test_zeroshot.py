"""Zero-shot evaluation through lm-eval: the offline suite, opt-in BIG-bench, task files, end-to-end runs."""

from __future__ import annotations

import io
import json
import random
import re
import socket
import subprocess
import tarfile
import zlib

import pytest
import yaml
from conftest import make_synthetic_book

from tilesparse.data.bigbench import (BIGBENCH_TASKS, ENV_SDIST, MEMBER_PREFIX, NOT_GIVEN, bigbench_source,
                                      convert_task, format_example, locate_task_jsons)
from tilesparse.data.cloze import build_cloze, normalize_text
from tilesparse.data.embedded import TRAIN_TEXTS
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


def _fake_sdist(path, names=tuple(BIGBENCH_TASKS)):
    with tarfile.open(path, "w:gz") as tar:
        for name in names:
            data = json.dumps(synthetic_task(6)).encode()
            info = tarfile.TarInfo(MEMBER_PREFIX + BIGBENCH_TASKS[name])
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_bigbench_source_is_opt_in(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_SDIST, raising=False)
    assert bigbench_source() is None and bigbench_source("") is None
    assert bigbench_source(tmp_path) == tmp_path
    monkeypatch.setenv(ENV_SDIST, str(tmp_path / "bb.tar.gz"))
    assert bigbench_source() == tmp_path / "bb.tar.gz" and bigbench_source(tmp_path) == tmp_path
    assert NOT_GIVEN.startswith(f"BIG-bench sdist not given: set {ENV_SDIST}=")


def test_locate_task_jsons_never_raises(tmp_path):
    cache = tmp_path / "cache"
    folder = tmp_path / "tasks"  # a folder laid out as the sdist's bigbench/benchmark_tasks/
    (folder / "social_iqa").mkdir(parents=True)
    (folder / "social_iqa" / "task.json").write_text(json.dumps(synthetic_task(3)))
    found, missing = locate_task_jsons(folder, cache, ["bb_social_iqa", "bb_winowhy"])
    assert found == {"bb_social_iqa": folder / "social_iqa" / "task.json"}
    assert list(missing) == ["bb_winowhy"] and "has no winowhy/task.json" in missing["bb_winowhy"]
    found, missing = locate_task_jsons(tmp_path / "nowhere.tar.gz", cache, ["bb_winowhy"])
    assert not found and "does not exist" in missing["bb_winowhy"]
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"not a tar file")
    found, missing = locate_task_jsons(bad, cache, ["bb_winowhy"])
    assert not found and "cannot read the BIG-bench sdist" in missing["bb_winowhy"]
    sdist = _fake_sdist(tmp_path / "bigbench-1.0.0.tar.gz", ["bb_winowhy"])
    found, missing = locate_task_jsons(sdist, cache, ["bb_winowhy", "bb_timedial"])
    assert found == {"bb_winowhy": cache / BIGBENCH_TASKS["bb_winowhy"]} and list(missing) == ["bb_timedial"]


# ------------------------------------------------------------------------------------- the offline suite
@pytest.fixture
def offline_texts(monkeypatch):
    """Synthetic books instead of the embedded texts; records which texts were asked for."""
    asked = []

    def text(name):
        asked.append(name)
        return make_synthetic_book(seed=zlib.crc32(name.encode()))

    monkeypatch.setattr(zs, "task_text", text)
    return asked


@pytest.fixture
def no_network(monkeypatch):
    """Any subprocess (pip, apt) or socket connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network or subprocess call: {args[:1]}")

    for name in ("run", "Popen", "check_call", "check_output"):
        monkeypatch.setattr(subprocess, name, refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def _docs(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_offline_suite_uses_evaluation_texts_only():
    assert 3 <= len(zs.OFFLINE_TASKS) <= 5 and zs.LOCAL_TASKS[:len(zs.OFFLINE_TASKS)] == list(zs.OFFLINE_TASKS)
    assert {t.text for t in zs.OFFLINE_TASKS.values()} <= {"persuasion", "prideprejudice", "mobydick"}
    assert {t.kind for t in zs.OFFLINE_TASKS.values()} == {"cloze", "next_sentence", "word_choice"}
    for name in TRAIN_TEXTS:
        with pytest.raises(TilesparseError, match="not an evaluation text"):
            zs.task_text(name)
    assert {"hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "lambada_openai",
            "boolq"} <= set(zs.STANDARD_TASKS)


def test_prepare_tasks_builds_the_offline_suite_without_network(tmp_cache, monkeypatch, offline_texts,
                                                                no_network):
    monkeypatch.delenv(ENV_SDIST, raising=False)
    out = zs.prepare_tasks(limit=4)
    assert out == tmp_cache / "zeroshot" / "tasks-4"
    assert zs.local_task_names(out) == list(zs.OFFLINE_TASKS)
    assert set(offline_texts) <= {"persuasion", "prideprejudice", "mobydick"}
    info = zs.task_info(out)
    for name, task in zs.OFFLINE_TASKS.items():
        assert info[name]["n"] == 4 and info[name]["source"] == f"tilesparse embedded text {task.text}"
        assert info[name]["chance"] == (0.0 if task.kind == "cloze" else 0.25)
    assert zs.unavailable_tasks(out) == {name: NOT_GIVEN for name in zs.BIGBENCH_NAMES}
    assert not (tmp_cache / "zeroshot" / "bigbench").exists()
    # cached: nothing rewritten; a smaller limit selects a subset of a larger one
    stamp = (out / "mobydick_next_sentence.jsonl").stat().st_mtime_ns
    assert zs.prepare_tasks(limit=4) == out
    assert (out / "mobydick_next_sentence.jsonl").stat().st_mtime_ns == stamp
    two = zs.prepare_tasks(limit=2)
    for name in zs.OFFLINE_TASKS:
        assert _docs(two / f"{name}.jsonl") == _docs(out / f"{name}.jsonl")[:2]
    cfg = yaml.safe_load((out / "mobydick_word_choice.yaml").read_text())
    assert cfg["output_type"] == "multiple_choice" and "Moby Dick" in cfg["metadata"]["description"]
    with pytest.raises(TilesparseError, match="positive"):
        zs.prepare_tasks(limit=0)


def test_prepare_tasks_adds_bigbench_only_from_a_given_source(tmp_cache, tmp_path, monkeypatch, offline_texts,
                                                              no_network):
    monkeypatch.setenv(ENV_SDIST, str(_fake_sdist(tmp_path / "bigbench-1.0.0.tar.gz")))
    out = zs.prepare_tasks(limit=4)
    assert zs.local_task_names(out) == zs.LOCAL_TASKS and not zs.unavailable_tasks(out)
    info = zs.task_info(out)
    assert info["bb_winowhy"]["n"] == 4 and info["bb_winowhy"]["chance"] == pytest.approx(1 / 3, abs=1e-3)
    for rel in BIGBENCH_TASKS.values():  # only the task files are kept
        assert (tmp_cache / "zeroshot" / "bigbench" / rel).is_file()
    stamp = (out / "bb_social_iqa.jsonl").stat().st_mtime_ns
    assert zs.prepare_tasks(limit=4) == out and (out / "bb_social_iqa.jsonl").stat().st_mtime_ns == stamp
    # a source that cannot be had: the BIG-bench tasks are unavailable with the reason, never an error
    monkeypatch.setenv(ENV_SDIST, str(tmp_path / "missing.tar.gz"))
    out = zs.prepare_tasks(limit=4)
    assert zs.local_task_names(out) == list(zs.OFFLINE_TASKS)
    assert all("missing.tar.gz does not exist" in why for why in zs.unavailable_tasks(out).values())
    # a folder of task.json files, given as an argument
    folder = tmp_path / "extracted" / "bigbench" / "benchmark_tasks" / "winowhy"
    folder.mkdir(parents=True)
    (folder / "task.json").write_text(json.dumps(synthetic_task(5)))
    out = zs.prepare_tasks(limit=4, bigbench=tmp_path / "extracted")
    assert zs.local_task_names(out) == [*zs.OFFLINE_TASKS, "bb_winowhy"]
    assert set(zs.unavailable_tasks(out)) == set(zs.BIGBENCH_NAMES) - {"bb_winowhy"}
    monkeypatch.delenv(ENV_SDIST)
    out = zs.prepare_tasks(limit=4)
    assert zs.local_task_names(out) == list(zs.OFFLINE_TASKS) and not (out / "bb_winowhy.yaml").exists()


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


def test_run_zeroshot_reports_sources_it_cannot_have(tmp_cache, tiny_loaded, monkeypatch, offline_texts):
    monkeypatch.delenv(ENV_SDIST, raising=False)
    monkeypatch.setattr(zs, "hub_reachable", lambda *a, **k: False)
    res = zs.run_zeroshot(tiny_loaded, "persuasion_cloze,bb_social_iqa,hellaswag", limit=2, batch_size=2,
                          progress=False)
    assert [s.task for s in res.scores] == ["persuasion_cloze"] and res["persuasion_cloze"].n == 2
    assert res["persuasion_cloze"].chance == 0.0
    assert res.unavailable == {"bb_social_iqa": NOT_GIVEN, "hellaswag": zs.UNREACHABLE}
    assert NOT_GIVEN in str(res)


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
def test_default_model_above_chance_on_the_offline_tasks(monkeypatch):
    """The embedded SmolLM2-135M-Instruct, dense, on 30 items of two offline multiple-choice tasks.

    Measured (2 CPU cores, about 25 s): acc 0.50 on prideprejudice_next_sentence and 0.87 on
    mobydick_word_choice (chance 0.25).
    """
    from tilesparse.models import load_model

    monkeypatch.delenv(ENV_SDIST, raising=False)
    res = zs.run_zeroshot(load_model(), ["prideprejudice_next_sentence", "mobydick_word_choice"], limit=30,
                          progress=False)
    for s in res.scores:
        assert s.n == 30 and 0.0 <= s.acc_norm <= 1.0 and s.chance == pytest.approx(0.25)
        assert s.acc > s.chance + 0.15
