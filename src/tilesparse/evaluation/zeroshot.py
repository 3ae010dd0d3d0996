"""Zero-shot evaluation through lm-eval-harness (0.4.13), offline from locally built task files.

:func:`prepare_tasks` builds (cached under ``cache_dir()/zeroshot/``) a folder of lm-eval task YAMLs
over local JSONL files. The default suite, :data:`OFFLINE_TASKS`, is generated (seeded,
deterministic) from the embedded evaluation-only texts that set-up already fetched - Persuasion,
Pride and Prejudice and Moby Dick, never the texts that masks learn on; see
:mod:`tilesparse.data.cloze` and :mod:`tilesparse.data.zeroshot_items`:

- ``*_cloze``: LAMBADA-style last-word cloze - metrics acc (the target is the greedy continuation)
  and perplexity (chance 0);
- ``*_next_sentence``: which of four sentences follows the passage - acc and acc_norm (chance 1/4);
- ``*_word_choice``: which of four words of similar frequency fills a gap - acc and acc_norm
  (chance 1/4).

Two optional sources add tasks and never stop a run; what cannot be had is listed with its reason
in :attr:`ZeroShotResult.unavailable`:

- BIG-bench (``bb_*``, :mod:`tilesparse.data.bigbench`): built only from a given sdist or folder
  (``bigbench=`` or ``$TILESPARSE_BIGBENCH_SDIST``); never downloaded;
- :data:`STANDARD_TASKS` (hellaswag, arc, piqa, winogrande, lambada_openai, boolq, ...): lm-eval's own
  tasks, whose data come from the Hugging Face hub when it is reachable.

:func:`run_zeroshot` evaluates an in-memory model (possibly masked/pruned) with lm-eval's ``HFLM``
and ``simple_evaluate``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import socket
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..data.bigbench import BIGBENCH_TASKS, NOT_GIVEN
from ..errors import TilesparseError
from ..paths import cache_dir

BUILD_VERSION = 3
DEFAULT_LIMIT = 200
SEED = 1234


@dataclass(frozen=True)
class OfflineTask:
    """A task generated from an embedded evaluation-only text: ``kind`` is ``cloze``,
    ``next_sentence`` or ``word_choice``."""

    text: str
    kind: str
    description: str


OFFLINE_TASKS: dict[str, OfflineTask] = {
    "persuasion_cloze": OfflineTask("persuasion", "cloze", "last-word cloze over Persuasion (Jane Austen)"),
    "mobydick_cloze": OfflineTask("mobydick", "cloze", "last-word cloze over Moby Dick (Herman Melville)"),
    "prideprejudice_next_sentence": OfflineTask(
        "prideprejudice", "next_sentence", "next sentence, 1 of 4, in Pride and Prejudice (Jane Austen)"),
    "mobydick_next_sentence": OfflineTask(
        "mobydick", "next_sentence", "next sentence, 1 of 4, in Moby Dick (Herman Melville)"),
    "mobydick_word_choice": OfflineTask(
        "mobydick", "word_choice", "gap word, 1 of 4 of similar frequency, in Moby Dick (Herman Melville)"),
}
BIGBENCH_NAMES = tuple(BIGBENCH_TASKS)
# every task prepare_tasks can build: the offline suite, then the opt-in BIG-bench tasks
LOCAL_TASKS: list[str] = [*OFFLINE_TASKS, *BIGBENCH_NAMES]
# standard lm-eval tasks whose data come from the Hugging Face hub (used only when it is reachable)
STANDARD_TASKS: list[str] = ["hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande",
                             "lambada_openai", "boolq", "openbookqa"]
UNREACHABLE = "unavailable (data not reachable)"
HUB_HOST = "huggingface.co"


# --------------------------------------------------------------------------------------- task files
def zeroshot_dir() -> Path:
    """Where the zero-shot task folders are cached."""
    return cache_dir() / "zeroshot"


def _write_jsonl(path: Path, docs: list[dict]) -> None:
    part = path.with_suffix(".jsonl.part")
    with part.open("w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    part.replace(path)


def _dataset_block(jsonl: Path, hf_cache: Path) -> dict:
    return {"dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(jsonl)}, "cache_dir": str(hf_cache)},
            "test_split": "test"}


def write_multiple_choice_task(out_dir: Path, name: str, docs: list[dict], *, description: str = "") -> Path:
    """Write ``<name>.jsonl`` (docs ``{query, choices, gold}``) and ``<name>.yaml`` (lm-eval
    ``multiple_choice`` task, metrics acc and acc_norm) into ``out_dir``; returns the YAML path."""
    import yaml

    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = out_dir / f"{name}.jsonl"
    _write_jsonl(jsonl, docs)
    cfg = {"task": name, **_dataset_block(jsonl, out_dir / "hf_cache"),
           "output_type": "multiple_choice", "doc_to_text": "query", "doc_to_choice": "choices",
           "doc_to_target": "gold", "target_delimiter": " ",
           "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                           for m in ("acc", "acc_norm")],
           "metadata": {"version": BUILD_VERSION, "description": description}}
    path = out_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def write_cloze_task(out_dir: Path, name: str, docs: list[dict], *, description: str = "") -> Path:
    """Write ``<name>.jsonl`` (docs ``{context, target}``) and ``<name>.yaml`` (lm-eval
    ``loglikelihood`` task like LAMBADA: acc = target is the greedy continuation, and perplexity)."""
    import yaml

    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = out_dir / f"{name}.jsonl"
    _write_jsonl(jsonl, docs)
    cfg = {"task": name, **_dataset_block(jsonl, out_dir / "hf_cache"),
           "output_type": "loglikelihood", "doc_to_text": "context", "doc_to_target": "target",
           "target_delimiter": "",
           "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                           {"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
           "metadata": {"version": BUILD_VERSION, "description": description}}
    path = out_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def _check_limit(limit, what: str = "limit") -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise TilesparseError(f"{what} must be a positive integer (or None for all items), got {limit!r}")


def _chance(docs: list[dict]) -> float:
    return sum(1.0 / len(d["choices"]) for d in docs) / len(docs)


def task_text(name: str) -> str:
    """The prose of an embedded evaluation-only text (refuses the texts that masks learn on)."""
    from ..data.embedded import EMBEDDED_TEXTS, TRAIN_TEXTS, embedded_text
    from ..data.zeroshot_items import book_body

    if name in TRAIN_TEXTS or name not in EMBEDDED_TEXTS:
        raise TilesparseError(f"{name!r} is not an evaluation text (training texts: {', '.join(TRAIN_TEXTS)})")
    return book_body(embedded_text(name))


def build_offline_docs(task: OfflineTask, text: str, limit: int | None) -> list[dict]:
    """The docs of one offline task over ``text`` (``limit`` items, seeded with :data:`SEED`)."""
    from ..data.cloze import build_cloze
    from ..data.zeroshot_items import build_next_sentence, build_word_choice

    builders = {"cloze": build_cloze, "next_sentence": build_next_sentence, "word_choice": build_word_choice}
    return builders[task.kind](text, limit=limit, seed=SEED)


def _write_offline_tasks(out: Path, limit: int | None) -> dict[str, dict]:
    info, texts = {}, {}
    for name, task in OFFLINE_TASKS.items():
        if task.text not in texts:
            texts[task.text] = task_text(task.text)
        docs = build_offline_docs(task, texts[task.text], limit)
        if not docs:
            raise TilesparseError(f"text {task.text!r} gives no items for {name}")
        if task.kind == "cloze":
            write_cloze_task(out, name, docs, description=task.description)
            chance = 0.0
        else:
            write_multiple_choice_task(out, name, docs, description=task.description)
            chance = round(_chance(docs), 4)
        info[name] = {"n": len(docs), "chance": chance, "source": f"tilesparse embedded text {task.text}"}
    return info


def _write_bigbench_tasks(out: Path, source: Path | None, limit: int | None) -> tuple[dict, dict]:
    """Build the BIG-bench tasks from ``source``; returns (info, unavailable reasons)."""
    from ..data.bigbench import convert_task, load_task_json, locate_task_jsons

    if source is None:
        return {}, {name: NOT_GIVEN for name in BIGBENCH_NAMES}
    jsons, unavailable = locate_task_jsons(source, zeroshot_dir() / "bigbench", list(BIGBENCH_NAMES))
    info = {}
    for name, path in jsons.items():
        try:
            docs = convert_task(load_task_json(path), name, limit=limit, seed=SEED)
        except TilesparseError as exc:
            unavailable[name] = str(exc)
            continue
        write_multiple_choice_task(out, name, docs,
                                   description=f"BIG-bench {BIGBENCH_TASKS[name].rsplit('/', 1)[0]}")
        info[name] = {"n": len(docs), "chance": round(_chance(docs), 4),
                      "source": f"bigbench==1.0.0 {BIGBENCH_TASKS[name]}"}
    return info, dict(sorted(unavailable.items(), key=lambda kv: BIGBENCH_NAMES.index(kv[0])))


def _remove_stale(out: Path, keep: list[str]) -> None:
    for path in [*out.glob("*.yaml"), *out.glob("*.jsonl")]:
        if path.stem not in keep:
            path.unlink()


def prepare_tasks(limit: int | None = DEFAULT_LIMIT, *, bigbench: str | os.PathLike | None = None) -> Path:
    """Build (or reuse) the local lm-eval task folder and return it (the ``include_path``).

    Always the offline suite (:data:`OFFLINE_TASKS`), from the embedded texts only: no network, no
    pip. The BIG-bench tasks are added only when a source is given: ``bigbench`` or
    ``$TILESPARSE_BIGBENCH_SDIST`` (a downloaded ``bigbench-1.0.0.tar.gz`` or a folder of its
    ``task.json`` files); otherwise, or when the source lacks them, the manifest lists them as
    unavailable with the reason (see :func:`unavailable_tasks`).

    ``limit`` caps the items per task (``None``: all); the items are a seeded random subset, the same
    for every run, and a smaller limit selects a subset of a larger one. Idempotent and cached under
    ``cache_dir()/zeroshot/tasks-<limit>/``.
    """
    from ..data.bigbench import bigbench_source

    _check_limit(limit)
    source = bigbench_source(bigbench)
    out = zeroshot_dir() / f"tasks-{'all' if limit is None else limit}"
    manifest_path = out / "manifest.json"
    want = {"version": BUILD_VERSION, "limit": limit, "seed": SEED, "dir": str(out.resolve()),
            "tasks": list(OFFLINE_TASKS), "bigbench": None if source is None else str(source.resolve())}
    try:
        manifest = json.loads(manifest_path.read_text())
        built = [t for t in LOCAL_TASKS if t in manifest.get("info", {})]
        if ({k: manifest.get(k) for k in want} == want
                and (source is None or not manifest.get("unavailable"))
                and all((out / f"{t}.yaml").is_file() and (out / f"{t}.jsonl").is_file() for t in built)):
            return out
    except (OSError, json.JSONDecodeError):
        pass

    out.mkdir(parents=True, exist_ok=True)
    info = _write_offline_tasks(out, limit)
    bb_info, unavailable = _write_bigbench_tasks(out, source, limit)
    info.update(bb_info)
    _remove_stale(out, list(info))
    part = manifest_path.with_suffix(".json.part")
    part.write_text(json.dumps({**want, "info": info, "unavailable": unavailable}, indent=2))
    part.replace(manifest_path)
    return out


def _manifest(include_path: Path) -> dict:
    try:
        return json.loads((Path(include_path) / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def task_info(include_path: Path) -> dict[str, dict]:
    """Per-task ``{n, chance, source}`` recorded by :func:`prepare_tasks` (empty for other folders)."""
    return _manifest(include_path).get("info", {})


def unavailable_tasks(include_path: Path) -> dict[str, str]:
    """The tasks :func:`prepare_tasks` could not build into this folder, with the reason for each."""
    return _manifest(include_path).get("unavailable", {})


def local_task_names(include_path: Path) -> list[str]:
    """Task names defined by the YAML files of an include folder."""
    import yaml

    names = []
    for p in sorted(Path(include_path).glob("*.yaml")):
        try:
            cfg = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(cfg, dict) and isinstance(cfg.get("task"), str):
            names.append(cfg["task"])
    order = {t: i for i, t in enumerate(LOCAL_TASKS)}
    return sorted(names, key=lambda t: (order.get(t, len(order)), t))


# --------------------------------------------------------------------------------------- results
@dataclass
class TaskScore:
    """One task's scores (acc_norm / perplexity are ``None`` where the task does not define them)."""

    task: str
    acc: float
    acc_stderr: float | None
    n: int
    acc_norm: float | None = None
    acc_norm_stderr: float | None = None
    perplexity: float | None = None
    chance: float | None = None


@dataclass
class ZeroShotResult:
    """Scores per task, their mean acc, and the requested tasks whose data were not reachable."""

    model: str
    scores: list[TaskScore]
    unavailable: dict[str, str] = field(default_factory=dict)
    limit: int | None = None
    seconds: float = 0.0

    @property
    def mean_acc(self) -> float | None:
        return sum(s.acc for s in self.scores) / len(self.scores) if self.scores else None

    @property
    def mean_acc_norm(self) -> float | None:
        vals = [s.acc_norm for s in self.scores if s.acc_norm is not None]
        return sum(vals) / len(vals) if vals else None

    def __getitem__(self, task: str) -> TaskScore:
        for s in self.scores:
            if s.task == task:
                return s
        raise KeyError(task)

    def to_dict(self) -> dict:
        return {"model": self.model, "limit": self.limit, "seconds": round(self.seconds, 2),
                "tasks": {s.task: {k: v for k, v in asdict(s).items() if k != "task"} for s in self.scores},
                "mean_acc": self.mean_acc, "mean_acc_norm": self.mean_acc_norm,
                "unavailable": dict(self.unavailable)}

    def __str__(self) -> str:
        def f(x, digits=3):
            return "-" if x is None else f"{x:.{digits}f}"

        w = max([20, *(len(s.task) for s in self.scores), *(len(t) for t in self.unavailable)])
        lines = [f"zero-shot (lm-eval 0.4.13), model {self.model}, {self.seconds:.0f} s",
                 f"{'task':<{w}} {'n':>5} {'acc':>7} {'± se':>7} {'acc_norm':>9} {'chance':>7} {'ppl':>8}"]
        for s in self.scores:
            lines.append(f"{s.task:<{w}} {s.n:>5} {f(s.acc):>7} {f(s.acc_stderr):>7} {f(s.acc_norm):>9} "
                         f"{f(s.chance):>7} {f(s.perplexity, 2):>8}")
        if self.scores:
            lines.append(f"{'mean':<{w}} {'':>5} {f(self.mean_acc):>7} {'':>7} {f(self.mean_acc_norm):>9}")
        for t, why in self.unavailable.items():
            lines.append(f"{t:<{w}} {why}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------- running
def hub_reachable(host: str = HUB_HOST, timeout: float = 3.0) -> bool:
    """True when the Hugging Face hub answers (and offline mode is not forced)."""
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes")
           for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _quiet_lm_eval() -> None:
    os.environ.setdefault("DISABLE_MULTIPROC", "1")  # bootstrap stderr in-process (no worker pool)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("lm_eval", "lm-eval", "datasets", "evaluate", "absl", "filelock", "fsspec", "urllib3",
                 "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except Exception:  # pragma: no cover
        pass
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except Exception:  # pragma: no cover
        pass


def _metric(res: dict, key: str):
    v = res.get(f"{key},none")
    return None if v is None or v == "N/A" or (isinstance(v, float) and math.isnan(v)) else float(v)


def _import_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise TilesparseError("zero-shot evaluation needs lm-eval: pip install 'lm-eval==0.4.13' "
                              "(or tilesparse[eval])") from None
    return lm_eval, HFLM, TaskManager


def _task_list(tasks: list[str] | str | None, local: list[str], optional: list[str]) -> list[str]:
    """The requested task names, checked (default: the folder's tasks and the standard ones)."""
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    if tasks is None:
        tasks = local + [t for t in STANDARD_TASKS if t not in local]
    if not tasks:
        raise TilesparseError("no zero-shot tasks given")
    known = local + [t for t in optional if t not in local]
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise TilesparseError(f"unknown zero-shot task(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    return list(dict.fromkeys(tasks))


def run_zeroshot(loaded, tasks: list[str] | str | None = None, *, limit: int | None = None,
                 batch_size: int = 8, device: str | None = "cpu", include_path: str | Path | None = None,
                 progress: bool = True, bigbench: str | os.PathLike | None = None) -> "ZeroShotResult":
    """Zero-shot scores of an in-memory model (``tilesparse.models.LoadedModel``) with lm-eval.

    ``tasks``: names from :data:`LOCAL_TASKS` and/or :data:`STANDARD_TASKS` (a list or a comma
    separated string; default: the prepared tasks and the standard ones). ``limit``: items per task
    (default: the 200 prepared ones). ``bigbench``: the opt-in BIG-bench source (see
    :func:`prepare_tasks`). ``include_path``: a folder of task YAMLs to use instead of the prepared
    one. The model is used as it is (masked or pruned weights included); with ``device`` it is moved
    there first. A requested task that cannot be had (BIG-bench without its source, standard tasks
    without the hub) is listed in ``result.unavailable`` with the reason instead of failing. Progress
    goes to stderr, one line per task.
    """
    _check_limit(limit)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise TilesparseError(f"batch_size must be a positive integer, got {batch_size!r}")
    if include_path is None:
        include_path = prepare_tasks(DEFAULT_LIMIT if limit is None or limit <= DEFAULT_LIMIT else limit,
                                     bigbench=bigbench)
    include_path = Path(include_path)
    if not include_path.is_dir():
        raise TilesparseError(f"task folder {include_path} does not exist")
    local = local_task_names(include_path)
    tasks = _task_list(tasks, local, LOCAL_TASKS + STANDARD_TASKS)
    not_built = {**{t: NOT_GIVEN for t in BIGBENCH_NAMES}, **unavailable_tasks(include_path)}
    unavailable: dict[str, str] = {t: not_built.get(t, f"not in the task folder {include_path}")
                                   for t in tasks if t in LOCAL_TASKS and t not in local}

    _quiet_lm_eval()
    lm_eval, HFLM, TaskManager = _import_lm_eval()
    standard = [t for t in tasks if t not in local and t not in unavailable]
    if standard and not hub_reachable():
        unavailable.update({t: UNREACHABLE for t in standard})
        standard = []
    run_tasks = [t for t in tasks if t in local or t in standard]

    model = loaded.model
    if device is not None and str(next(model.parameters()).device) != str(device):
        model.to(device)
    model.eval()
    t0 = time.perf_counter()
    scores: list[TaskScore] = []
    info = task_info(include_path)
    if run_tasks:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tm = TaskManager(include_path=str(include_path), include_defaults=bool(standard))
            lm = HFLM(pretrained=model, tokenizer=loaded.tokenizer, batch_size=batch_size,
                      add_bos_token=True if getattr(loaded, "needs_bos", False) else None)
        for i, task in enumerate(run_tasks, 1):
            t1 = time.perf_counter()
            if progress:
                print(f"[zeroshot] {i}/{len(run_tasks)} {task} ...", file=sys.stderr, flush=True)
            sink = io.StringIO()
            try:
                with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
                    warnings.simplefilter("ignore")
                    out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=tm, limit=limit,
                                                  bootstrap_iters=1000, log_samples=False,
                                                  random_seed=0, numpy_random_seed=SEED,
                                                  torch_random_seed=SEED, fewshot_random_seed=SEED)
            except Exception as exc:  # network/data errors of the standard tasks
                if task in local:
                    raise
                unavailable[task] = f"{UNREACHABLE}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                continue
            res = out["results"][task]
            n = out.get("n-samples", {}).get(task, {}).get("effective")
            score = TaskScore(task=task, acc=_metric(res, "acc"), acc_stderr=_metric(res, "acc_stderr"),
                              n=int(n) if n is not None else -1, acc_norm=_metric(res, "acc_norm"),
                              acc_norm_stderr=_metric(res, "acc_norm_stderr"),
                              perplexity=_metric(res, "perplexity"),
                              chance=info.get(task, {}).get("chance"))
            scores.append(score)
            if progress:
                print(f"[zeroshot] {task}: acc {score.acc:.3f} (n={score.n}, "
                      f"{time.perf_counter() - t1:.0f} s)", file=sys.stderr, flush=True)
    return ZeroShotResult(model=getattr(loaded, "name", type(model).__name__), scores=scores,
                          unavailable=unavailable, limit=limit, seconds=time.perf_counter() - t0)
