"""BIG-bench multiple-choice tasks from the PyPI sdist ``bigbench==1.0.0``, as lm-eval JSONL docs.

The sdist (358 MB) is fetched with ``pip download`` (never installed), only the selected
``benchmark_tasks/<task>/task.json`` files are extracted into the cache, and the archive is deleted.
Each example (``input`` + ``target_scores`` {choice: score}) becomes a doc ``{query, choices, gold}``
(see :func:`format_example` for the prompt styles); the scored continuations are the choices, after
one space.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path

from ..errors import TilesparseError

SDIST_SPEC = "bigbench==1.0.0"
SDIST_NAME = "bigbench-1.0.0.tar.gz"
ENV_SDIST = "TILESPARSE_BIGBENCH_SDIST"  # optional path to an already downloaded sdist
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


def _download_sdist(dest: Path) -> Path:
    """``pip download`` the sdist into ``dest`` (or use ``$TILESPARSE_BIGBENCH_SDIST``)."""
    given = os.environ.get(ENV_SDIST)
    if given:
        p = Path(given).expanduser()
        if not p.is_file():
            raise TilesparseError(f"${ENV_SDIST}={given} is not a file")
        return p
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / SDIST_NAME
    if target.is_file():
        return target
    print(f"[zeroshot] downloading the BIG-bench sdist ({SDIST_SPEC}, 358 MB) with pip", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "-q", SDIST_SPEC, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not target.is_file():
        err = (proc.stderr or proc.stdout).strip().splitlines()
        raise TilesparseError(f"cannot download {SDIST_SPEC} from PyPI: {err[-1] if err else 'no file'}")
    return target


def fetch_task_jsons(root: Path, names: list[str] | None = None) -> dict[str, Path]:
    """The selected BIG-bench ``task.json`` files under ``root`` (downloaded and extracted if missing).

    Idempotent: when every file is present nothing is fetched. The downloaded sdist is deleted after
    extraction; only the task files are kept.
    """
    names = list(BIGBENCH_TASKS) if names is None else names
    wanted = {n: root / BIGBENCH_TASKS[n] for n in names}
    missing = {MEMBER_PREFIX + BIGBENCH_TASKS[n]: p for n, p in wanted.items() if not p.is_file()}
    if not missing:
        return wanted
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="sdist-", dir=root.parent))
    try:
        sdist = _download_sdist(tmp)
        try:
            with tarfile.open(sdist, mode="r|gz") as tar:
                for member in tar:
                    out = missing.get(member.name)
                    if out is None or not member.isfile():
                        continue
                    data = tar.extractfile(member).read()
                    out.parent.mkdir(parents=True, exist_ok=True)
                    part = out.with_suffix(".json.part")
                    part.write_bytes(data)
                    part.replace(out)
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise TilesparseError(f"cannot read the BIG-bench sdist {sdist}: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lost = [n for n, p in wanted.items() if not p.is_file()]
    if lost:
        raise TilesparseError(f"the BIG-bench sdist has no task.json for {', '.join(lost)}")
    return wanted


def load_task_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise TilesparseError(f"cannot read BIG-bench task {path}: {exc}") from exc
