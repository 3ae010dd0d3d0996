"""The recipe: one YAML file from a model to evaluated, exported hybrid-sparse models.

Parsing is strict: unknown keys and bad values raise :class:`~tilesparse.errors.TilesparseError`
naming the key path (``methods[2].steps``) and, for typos, the closest valid key.

Example (the default recipe, ``tilesparse/recipe/default.yaml``)::

    model: default
    tile: 128
    data: {calibration: austen-train, calib_samples: 32, calib_seqlen: 512, train: austen-train}
    methods:
      - {name: dense, kind: dense}
      - {name: sparsegpt-2:4, kind: oneshot, method: sparsegpt, pattern: "2:4"}
      - {name: patch-joint, kind: learn, mode: joint, sparsities: [0.25, 0.35, 0.45], steps: 60}
    evaluation:
      perplexity: {texts: [prideprejudice, persuasion], seqlen: 512, windows: 10}
      zeroshot: {tasks: null, limit: 100}
    export: {packed: true}
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import TilesparseError
from ..options import LEARN_MODES as _MODES
from ..options import PRIORS as _PRIORS
from ..options import PRUNE_METHODS as _ONESHOT_METHODS
from ..options import PRUNE_PATTERNS as _PATTERNS
from ..options import RECIPE_KINDS as _KINDS


@dataclass
class DataConfig:
    """Texts used for calibration (one-shot pruning, priors) and mask learning."""

    calibration: str = "austen-train"
    calib_samples: int = 32
    calib_seqlen: int = 512
    train: str = "austen-train"
    seed: int = 0


@dataclass
class PerplexityConfig:
    """Perplexity evaluation (pinned protocol) on each text."""

    texts: list[str] = field(default_factory=lambda: ["prideprejudice", "persuasion"])
    seqlen: int = 512
    windows: int = 10
    batch_size: int = 4


@dataclass
class ZeroShotConfig:
    """Zero-shot tasks through lm-eval (``tasks: null`` = the offline tasks, BIG-bench when its sdist is
    given and the standard lm-eval tasks when the hub is reachable; see
    :mod:`tilesparse.evaluation.zeroshot`)."""

    enabled: bool = True
    tasks: list[str] | None = None
    limit: int | None = 100
    batch_size: int = 8


@dataclass
class EvaluationConfig:
    perplexity: PerplexityConfig = field(default_factory=PerplexityConfig)
    zeroshot: ZeroShotConfig = field(default_factory=ZeroShotConfig)


@dataclass
class MethodConfig:
    """One method of the recipe.

    ``kind``: ``dense`` (baseline), ``oneshot`` (magnitude / wanda / sparsegpt with pattern
    unstructured / 2:4 / hybrid) or ``learn`` (mode tile / joint / maskllm). ``sparsities`` lists the
    targets (2:4 and maskllm are always 0.5). Learning keys: ``steps``, ``batch``, ``seqlen``,
    ``lr``, ``prior`` (one-shot method for the priors), ``options`` (any further trainer settings,
    passed through to the learning config).
    """

    name: str
    kind: str = "learn"
    method: str | None = None
    pattern: str | None = None
    mode: str | None = None
    sparsities: list[float] = field(default_factory=list)
    update_weights: bool = False
    steps: int | None = None
    batch: int | None = None
    seqlen: int | None = None
    lr: float | None = None
    prior: str = "sparsegpt"
    options: dict = field(default_factory=dict)

    def targets(self) -> list[float]:
        """The sparsities this method produces a model for."""
        if self.kind == "dense":
            return [0.0]
        if (self.kind == "oneshot" and self.pattern == "2:4") or (self.kind == "learn" and self.mode == "maskllm"):
            return [0.5]
        return list(self.sparsities)


@dataclass
class ExportConfig:
    """What to ship: the packed hybrid model of the chosen runs (``which``: run ids, or all learned)."""

    packed: bool = True
    which: list[str] | None = None
    save_hf: bool = False


@dataclass
class ReportConfig:
    """Report options; ``kernel_results`` = a JSON file of kernel speed results to plot; ``prior_rows``:
    evaluate the one-shot prior of every learned run beside it (what learning added)."""

    plots: bool = True
    prior_rows: bool = True
    tile_map_layers: int = 4
    kernel_results: str | None = None


@dataclass
class Recipe:
    """A whole recipe. See the module docstring for an example."""

    model: str = "default"
    dtype: str = "float32"
    device: str = "cpu"
    tile: int | list[int] = 128
    output: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    methods: list[MethodConfig] = field(default_factory=list)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    keep_checkpoints: bool = False  # keep each learned run's resumable checkpoint once the run is done
    notes: str = ""

    @property
    def tile_shape(self) -> tuple[int, int]:
        from ..pruning.config import parse_tile

        return parse_tile(self.tile)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# strict parsing


def _unknown(path: str, key: str, allowed: list[str]) -> TilesparseError:
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f" (allowed: {', '.join(allowed)})"
    return TilesparseError(f"recipe: unknown key '{path}{key}'{hint}")


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise TilesparseError(f"recipe: '{path}' must be a mapping, got {type(value).__name__}")
        return _build(tp, value, path + ".")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, path)
            except TilesparseError as exc:
                errors.append(str(exc))
        raise TilesparseError(errors[0] if errors else f"recipe: bad value for '{path}'")
    if origin is list:
        if not isinstance(value, list):
            raise TilesparseError(f"recipe: '{path}' must be a list, got {value!r}")
        return [_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise TilesparseError(f"recipe: '{path}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise TilesparseError(f"recipe: '{path}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TilesparseError(f"recipe: '{path}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TilesparseError(f"recipe: '{path}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise TilesparseError(f"recipe: '{path}' must be a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown(prefix, str(key), names)
        kwargs[key] = _convert(hints[key], value, prefix + key)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise TilesparseError(f"recipe: '{prefix.rstrip('.') or 'recipe'}': {exc}") from None


def _validate(r: Recipe) -> Recipe:
    if not r.methods:
        raise TilesparseError("recipe: 'methods' must list at least one method")
    try:
        r.tile_shape
    except TilesparseError as exc:
        raise TilesparseError(f"recipe: 'tile': {exc}") from None
    if r.data.calib_samples <= 0 or r.data.calib_seqlen <= 1:
        raise TilesparseError("recipe: 'data.calib_samples' must be > 0 and 'data.calib_seqlen' > 1")
    p = r.evaluation.perplexity
    if p.seqlen <= 1 or p.windows <= 0 or p.batch_size <= 0:
        raise TilesparseError("recipe: 'evaluation.perplexity' needs seqlen > 1, windows > 0, batch_size > 0")
    z = r.evaluation.zeroshot
    if z.limit is not None and z.limit <= 0:
        raise TilesparseError("recipe: 'evaluation.zeroshot.limit' must be positive or null")
    if z.tasks is not None:
        from ..evaluation.zeroshot import LOCAL_TASKS, STANDARD_TASKS

        known = LOCAL_TASKS + STANDARD_TASKS
        for i, task in enumerate(z.tasks):
            if task not in known:
                close = difflib.get_close_matches(task, known, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else f" (choose from {', '.join(known)})"
                raise TilesparseError(f"recipe: 'evaluation.zeroshot.tasks[{i}]': unknown task '{task}'{hint}")
    seen = set()
    for i, m in enumerate(r.methods):
        where = f"methods[{i}] ({m.name})"
        if m.name in seen:
            raise TilesparseError(f"recipe: method name '{m.name}' is used twice")
        seen.add(m.name)
        if m.kind not in _KINDS:
            raise TilesparseError(f"recipe: {where}.kind must be one of {_KINDS}, got {m.kind!r}")
        if m.kind == "oneshot":
            if m.method not in _ONESHOT_METHODS:
                raise TilesparseError(f"recipe: {where}.method must be one of {_ONESHOT_METHODS}, got {m.method!r}")
            if m.pattern not in _PATTERNS:
                raise TilesparseError(f"recipe: {where}.pattern must be one of {_PATTERNS}, got {m.pattern!r}")
        if m.kind == "learn":
            if m.mode not in _MODES:
                raise TilesparseError(f"recipe: {where}.mode must be one of {_MODES}, got {m.mode!r}")
            if m.prior not in _PRIORS:
                raise TilesparseError(f"recipe: {where}.prior must be one of {_PRIORS}, got {m.prior!r}")
            if m.mode == "tile" and m.prior == "none":
                raise TilesparseError(f"recipe: {where}: PATCH-Tile keeps a one-shot 2:4 pattern, so its prior "
                                      "cannot be 'none'")
            for key in ("steps", "batch", "seqlen"):
                v = getattr(m, key)
                if v is not None and v < 1:
                    raise TilesparseError(f"recipe: {where}.{key} must be >= 1, got {v}")
            if m.lr is not None and m.lr <= 0:
                raise TilesparseError(f"recipe: {where}.lr must be positive, got {m.lr}")
        hybrid = (m.kind == "oneshot" and m.pattern == "hybrid") or (m.kind == "learn" and m.mode != "maskllm")
        needs_targets = hybrid or (m.kind == "oneshot" and m.pattern == "unstructured")
        if needs_targets and not m.sparsities:
            raise TilesparseError(f"recipe: {where} needs 'sparsities' (a list of targets)")
        for s in m.sparsities:
            hi = 0.5 if hybrid else 1.0
            ok = 0.0 <= s <= 0.5 if hybrid else 0.0 <= s < 1.0
            if not ok:
                raise TilesparseError(f"recipe: {where}: sparsity {s} outside [0, {hi}{']' if hybrid else ')'}")
    return r


def parse_recipe(data: dict) -> Recipe:
    """Build and validate a :class:`Recipe` from a mapping (e.g. parsed YAML)."""
    if not isinstance(data, dict):
        raise TilesparseError("recipe: the top level must be a mapping")
    return _validate(_build(Recipe, data))


def load_recipe(path: str | Path) -> Recipe:
    """Read a YAML (or JSON) recipe file; relative ``output`` paths resolve against the current directory."""
    p = Path(path)
    if not p.is_file():
        raise TilesparseError(f"recipe file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise TilesparseError(f"recipe file {p} is not valid YAML: {str(exc).splitlines()[0]}") from None
    return parse_recipe(data or {})


def default_recipe_path() -> Path:
    """The packaged default recipe."""
    return Path(__file__).with_name("default.yaml")


def fingerprint(*parts: Any) -> str:
    """Stable short hash of JSON-serialisable parts (dataclasses allowed)."""
    def norm(x):
        return dataclasses.asdict(x) if dataclasses.is_dataclass(x) else x

    blob = json.dumps([norm(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
