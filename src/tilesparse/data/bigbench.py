"""Opt-in BIG-bench multiple-choice tasks (from the sdist ``bigbench==1.0.0``), as lm-eval JSONL docs.

BIG-bench is never downloaded: the tasks are built only from a source the user gives (see
:func:`bigbench_source`): an already downloaded ``bigbench-1.0.0.tar.gz`` (358 MB; only the selected
``benchmark_tasks/<task>/task.json`` files are extracted, once, into the cache) or a folder of
extracted ``task.json`` files. Each example (``input`` + ``target_scores`` {choice: score}) becomes
a doc ``{query, choices, gold}`` (see :func:`format_example` for the prompt styles); the scored
continuations are the choices, after one space.
"""

from __future__ import annotations

import json
import os
import random
import tarfile
import zlib
from pathlib import Path

from ..errors import TilesparseError
from ..settings import env_name, setting

SDIST_NAME = "bigbench-1.0.0.tar.gz"
ENV_SDIST = env_name("bigbench_sdist")  # path to a downloaded sdist or a folder of task.json files
NOT_GIVEN = (f"BIG-bench sdist not given: set {ENV_SDIST}=/path/to/{SDIST_NAME} "
             "(or a folder of its task.json files)")
MEMBER_PREFIX = "bigbench-1.0.0/bigbench/benchmark_tasks/"

# local task name -> task.json path under benchmark_tasks/
BIGBENCH_TASKS: dict[str, str] = {
    "bb_goal_inference": "goal_step_wikihow/goal_inference/task.json",
    "bb_step_inference": "goal_step_wikihow/step_inference/task.json",
    "bb_social_iqa": "social_iqa/task.json",
    "bb_winowhy": "winowhy/task.json",
    "bb_timedial": "timedial/task.json",
}


def _seed(name: str, seed: int) -> int:
    return (zlib.crc32(name.encode()) + seed) & 0xFFFFFFFF


def format_example(example: dict, task: dict, rng: random.Random, style: str = "plain") -> dict:
    """One BIG-bench multiple-choice example -> ``{query, choices, gold}``.

    ``style="bigbench"``: BIG-bench's own zero-shot format (``task_prefix`` + ``example_input_prefix``
    (default ``"\\nQ: "``) + input [+ the choices, shuffled, after ``choice_prefix``, when
    ``append_choices_to_input`` (default true)] + ``example_output_prefix`` (default ``"\\nA: "``)).
    ``style="plain"`` (default; better for small models, as lm-eval's own multiple-choice tasks):
    the choices are not listed and the default Q:/A: prefixes are dropped - ``task_prefix`` + the
    task's own input prefix + input + the task's own output prefix, or ``"\\nAnswer:"`` after a
    question, or nothing (the input is then completed by the choice, e.g. "... goal of 'X' is").
    """
    scores = example.get("target_scores")
    if not isinstance(scores, dict) or len(scores) < 2:
        raise ValueError("not a multiple-choice example (needs target_scores with >= 2 choices)")
    keys = list(scores)
    values = [float(scores[k]) for k in keys]
    if max(values) <= min(values):
        raise ValueError("no correct choice")
    gold = values.index(max(values))  # first best choice, as BIG-bench does
    choices = [k.strip() for k in keys]
    text = str(example["input"])
    if style == "bigbench":
        if task.get("append_choices_to_input", True):
            shown = sorted(keys)
            rng.shuffle(shown)
            prefix = task.get("choice_prefix", "\n  choice: ")
            text = text + prefix + prefix.join(c.strip() for c in shown)
        query = (str(task.get("task_prefix", "")) + task.get("example_input_prefix", "\nQ: ") + text
                 + task.get("example_output_prefix", "\nA: "))
    elif style == "plain":
        out = task.get("example_output_prefix")
        if out is None:
            out = "\nAnswer:" if text.rstrip().endswith("?") else ""
        query = (str(task.get("task_prefix", "")) + task.get("example_input_prefix", "") + text.rstrip()
                 + out)
    else:
        raise ValueError(f"unknown style {style!r}")
    return {"query": query.strip(), "choices": choices, "gold": gold}


def convert_task(task: dict, name: str, *, limit: int | None = None, seed: int = 1234,
                 style: str = "plain") -> list[dict]:
    """Docs of a BIG-bench task JSON: a seeded random subset of ``limit`` examples (all when ``None``).

    The subset is a prefix of one fixed seeded permutation, so a smaller limit selects a subset of a
    larger one (and lm-eval's ``--limit`` on top takes a random-like prefix). Examples that are not
    multiple choice are skipped.
    """
    docs: list[dict] = []
    for i, ex in enumerate(task.get("examples", [])):
        rng = random.Random(_seed(f"{name}/{i}", seed))
        try:
            doc = format_example(ex, task, rng, style)
        except (ValueError, KeyError):
            continue
        doc["idx"] = i
        docs.append(doc)
    if not docs:
        raise TilesparseError(f"BIG-bench task {name!r} has no multiple-choice examples")
    random.Random(_seed(name, seed)).shuffle(docs)
    return docs if limit is None else docs[:limit]


def bigbench_source(path: str | os.PathLike | None = None) -> Path | None:
    """The opt-in BIG-bench source: ``path``, else ``$TILESPARSE_BIGBENCH_SDIST``, else ``None``.

    A source is an already downloaded ``bigbench-1.0.0.tar.gz`` or a folder holding the tasks'
    ``task.json`` files (as in the sdist's ``bigbench/benchmark_tasks/``). Nothing is ever downloaded.
    """
    if path not in (None, ""):
        return Path(path).expanduser()
    return setting("bigbench_sdist")


def _in_folder(folder: Path, rel: str) -> Path | None:
    for base in (folder, folder / "benchmark_tasks", folder / "bigbench" / "benchmark_tasks",
                 folder / MEMBER_PREFIX):
        if (base / rel).is_file():
            return base / rel
    return None


def _extract(sdist: Path, members: dict[str, Path]) -> None:
    """Copy the tar members named in ``members`` (member name -> target file) out of the sdist."""
    try:
        with tarfile.open(sdist, mode="r|gz") as tar:
            for member in tar:
                out = members.get(member.name)
                if out is None or not member.isfile():
                    continue
                data = tar.extractfile(member).read()
                out.parent.mkdir(parents=True, exist_ok=True)
                part = out.with_suffix(".json.part")
                part.write_bytes(data)
                part.replace(out)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise TilesparseError(f"cannot read the BIG-bench sdist {sdist}: {exc}") from exc


def locate_task_jsons(source: Path, cache: Path, names: list[str] | None = None
                      ) -> tuple[dict[str, Path], dict[str, str]]:
    """The ``task.json`` of each named task from ``source`` (see :func:`bigbench_source`), and the
    reason for each task that it does not provide.

    From a folder the files are used in place; from the sdist only the selected files are extracted,
    once, into ``cache`` (later calls reuse them). Never raises for a missing or unreadable source.
    """
    names = list(BIGBENCH_TASKS) if names is None else names
    if source.is_dir():
        found = {n: _in_folder(source, BIGBENCH_TASKS[n]) for n in names}
        return ({n: p for n, p in found.items() if p is not None},
                {n: f"BIG-bench folder {source} has no {BIGBENCH_TASKS[n]}" for n, p in found.items() if p is None})
    if not source.is_file():
        return {}, {n: f"BIG-bench source {source} does not exist (${ENV_SDIST})" for n in names}
    wanted = {n: cache / BIGBENCH_TASKS[n] for n in names}
    missing = {MEMBER_PREFIX + BIGBENCH_TASKS[n]: p for n, p in wanted.items() if not p.is_file()}
    if missing:
        try:
            _extract(source, missing)
        except TilesparseError as exc:
            return ({n: p for n, p in wanted.items() if p.is_file()},
                    {n: str(exc) for n, p in wanted.items() if not p.is_file()})
    return ({n: p for n, p in wanted.items() if p.is_file()},
            {n: f"the BIG-bench sdist {source} has no {BIGBENCH_TASKS[n]}"
             for n, p in wanted.items() if not p.is_file()})


def load_task_json(path: Path) -> dict:
    """A BIG-bench ``task.json`` as a dict (:class:`TilesparseError` when unreadable)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise TilesparseError(f"cannot read BIG-bench task {path}: {exc}") from exc
