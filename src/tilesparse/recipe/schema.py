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

An optional ``quantize:`` section (``{method: gptq, bits: 4, group_size: 128}``) quantizes every run's
weights after its mask, before evaluation and export (:class:`QuantizeConfig`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, BaseModel, Field, model_validator

from ..errors import TilesparseError
from ..options import LearnMode, Prior, PruneMethod, PrunePattern, RecipeKind, RefitKeep, Tile
from ..quant.config import QuantSettings
from ..typed_config import ConfigModel, check, closest, validator


class _RecipePart(ConfigModel):
    _error_prefix = "recipe"


def _training_source(source: str) -> None:
    from ..data import check_training_source

    check_training_source(source)


TrainingSource = Annotated[str, AfterValidator(validator(_training_source))]


class DataConfig(_RecipePart):
    """Texts used for calibration (one-shot pruning, priors) and mask learning: a text name or file,
    ``self:N`` (N tokens sampled from the dense model) or a weighted mixture ``a@0.5,self:200k@0.5``
    (:mod:`tilesparse.data.training`); evaluation texts are refused."""

    calibration: TrainingSource = "austen-train"
    calib_samples: int = Field(32, gt=0)
    calib_seqlen: int = Field(512, gt=1)
    train: TrainingSource = "austen-train"
    seed: int = 0


class PerplexityConfig(_RecipePart):
    """Perplexity evaluation (pinned protocol) on each text."""

    texts: list[str] = Field(default_factory=lambda: ["prideprejudice", "persuasion"])
    seqlen: int = Field(512, gt=1)
    windows: int = Field(10, gt=0)
    batch_size: int = Field(4, gt=0)


def _known_task(task: str) -> str:
    from ..evaluation.zeroshot import LOCAL_TASKS, STANDARD_TASKS

    known = LOCAL_TASKS + STANDARD_TASKS
    check(task in known, f"unknown task '{task}'{closest(task, known)}")
    return task


class ZeroShotConfig(_RecipePart):
    """Zero-shot tasks through lm-eval (``tasks: null`` = the offline tasks, BIG-bench when its sdist is
    given and the standard lm-eval tasks when the hub is reachable; see
    :mod:`tilesparse.evaluation.zeroshot`)."""

    enabled: bool = True
    tasks: list[Annotated[str, AfterValidator(_known_task)]] | None = None
    limit: int | None = Field(100, gt=0)
    batch_size: int = Field(8, gt=0)


class EvaluationConfig(_RecipePart):
    perplexity: PerplexityConfig = Field(default_factory=PerplexityConfig)
    zeroshot: ZeroShotConfig = Field(default_factory=ZeroShotConfig)


class MethodConfig(_RecipePart):
    """One method of the recipe.

    ``kind``: ``dense`` (baseline), ``oneshot`` (magnitude / wanda / sparsegpt with pattern
    unstructured / 2:4 / hybrid) or ``learn`` (mode tile / joint / maskllm). ``sparsities`` lists the
    targets (2:4 and maskllm are always 0.5). Learning keys: ``steps``, ``batch``, ``seqlen``,
    ``lr``, ``prior`` (one-shot method for the priors), ``refit`` (add a row with SparseGPT's weight update
    for the learned masks: ``mask``/``true`` or ``tiles``, see :func:`tilesparse.refit`), ``options`` (any
    further :class:`~tilesparse.learning.LearnConfig` field).
    """

    @property
    def refit_keep(self) -> str | None:
        """What the refit row keeps of the learned mask (``mask``, ``tiles``), or None without one."""
        return "mask" if self.refit is True else (self.refit or None)

    name: str
    kind: RecipeKind = "learn"
    method: PruneMethod | None = None
    pattern: PrunePattern | None = None
    mode: LearnMode | None = None
    sparsities: list[float] = Field(default_factory=list)
    update_weights: bool = False
    steps: int | None = Field(None, ge=1)
    batch: int | None = Field(None, ge=1)
    seqlen: int | None = Field(None, ge=1)
    lr: float | None = Field(None, gt=0)
    prior: Prior = "sparsegpt"
    refit: bool | RefitKeep = Field(False, description="learn only: also a row refitted by SparseGPT's weight "
                                    "update (calibrated on data.calibration), exported like the others: 'mask' "
                                    "(or true) keeps the learned mask, 'tiles' keeps its tile map and lets SparseGPT "
                                    "choose the 2:4 patterns")
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> "MethodConfig":
        if self.kind == "oneshot":
            check(self.method is not None, "a oneshot method needs 'method'")
            check(self.pattern is not None, "a oneshot method needs 'pattern'")
        check(self.kind == "learn" or not self.refit, "'refit' applies to learned methods only")
        if self.kind == "learn":
            check(self.mode is not None, "a learn method needs 'mode'")
            check(not (self.mode == "tile" and self.prior == "none"),
                  "PATCH-Tile keeps a one-shot 2:4 pattern, so its prior cannot be 'none'")
        hybrid = self.is_hybrid
        if (hybrid or (self.kind == "oneshot" and self.pattern == "unstructured")) and not self.sparsities:
            raise ValueError("needs 'sparsities' (a list of targets)")
        for s in self.sparsities:
            ok = 0.0 <= s <= 0.5 if hybrid else 0.0 <= s < 1.0
            check(ok, f"sparsity {s} outside [0, {0.5 if hybrid else 1.0}{']' if hybrid else ')'}")
        return self

    @property
    def is_hybrid(self) -> bool:
        return ((self.kind == "oneshot" and self.pattern == "hybrid")
                or (self.kind == "learn" and self.mode != "maskllm"))

    def targets(self) -> list[float]:
        """The sparsities this method produces a model for."""
        if self.kind == "dense":
            return [0.0]
        if (self.kind == "oneshot" and self.pattern == "2:4") or (self.kind == "learn" and self.mode == "maskllm"):
            return [0.5]
        return list(self.sparsities)


class ExportConfig(_RecipePart):
    """What to ship: the packed hybrid model of the chosen runs (``which``: run ids, or all learned)."""

    packed: bool = True
    which: list[str] | None = None
    save_hf: bool = False


class QuantizeConfig(_RecipePart, QuantSettings):
    """Weight-only quantization of every run (the dense baseline included) after its mask, before evaluation
    and export (fake-quant: the dequantized weights; GPTQ calibrates on ``data.calibration``). Keys: those
    of :class:`~tilesparse.quant.QuantConfig` (``method``, ``bits``, ``group_size``, ``symmetric``...)."""

    def to_config(self):
        """The :class:`~tilesparse.quant.QuantConfig` of these settings."""
        from ..quant import QuantConfig

        return QuantConfig(**self.model_dump())


class ReportConfig(_RecipePart):
    """Report options; ``kernel_results`` = a JSON file of kernel speed results to plot; ``prior_rows``:
    evaluate the one-shot prior of every learned run beside it (what learning added)."""

    plots: bool = True
    prior_rows: bool = True
    tile_map_layers: int = 4
    kernel_results: str | None = None


class Recipe(_RecipePart):
    """A whole recipe. See the module docstring for an example."""

    model: str = "default"
    dtype: str = "float32"
    device: str = "cpu"
    tile: Tile = (128, 128)
    output: str = "runs/default"
    data: DataConfig = Field(default_factory=DataConfig)
    methods: list[MethodConfig] = Field(default_factory=list)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    quantize: QuantizeConfig | None = Field(None, description="quantize every run's weights after its mask, "
                                            "before evaluation and export (default: no quantization)")
    export: ExportConfig = Field(default_factory=ExportConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    keep_checkpoints: bool = Field(False, description="keep each learned run's resumable checkpoint once the "
                                   "run is done")
    notes: str = ""

    @model_validator(mode="after")
    def _check(self) -> "Recipe":
        check(bool(self.methods), "'methods' must list at least one method")
        seen = set()
        for m in self.methods:
            check(m.name not in seen, f"method name '{m.name}' is used twice")
            seen.add(m.name)
        return self

    @property
    def tile_shape(self) -> tuple[int, int]:
        return self.tile

    def to_dict(self) -> dict:
        return self.model_dump()


def _check_learning(r: Recipe) -> Recipe:
    """Every learned run's full learning configuration is valid (errors name ``methods[i].options``)."""
    for i, m in enumerate(r.methods):
        if m.kind != "learn":
            continue
        for target in m.targets():
            try:
                learn_config(r, m, target)
            except TilesparseError as exc:
                text = str(exc).removeprefix("recipe: ")
                if text.startswith("unknown key '") or text.startswith("'"):
                    text = text.replace("'", f"'methods[{i}].options.", 1)
                else:
                    text = f"'methods[{i}]': {text}"
                raise TilesparseError(f"recipe: {text}") from None
    return r


def learn_config(recipe: Recipe, method: MethodConfig, target: float):
    """The :class:`~tilesparse.learning.LearnConfig` of one learned run: the recipe's data and tile, the
    method's keys, then its ``options``."""
    from ..learning.config import make_config

    d = recipe.data
    keys = dict(mode=method.mode, sparsity=target if method.mode != "maskllm" else 0.5, steps=method.steps,
                batch=method.batch, seqlen=method.seqlen, lr=method.lr, prior=method.prior, tile=recipe.tile_shape,
                seed=d.seed, text=d.train, calib_samples=d.calib_samples, calib_seqlen=d.calib_seqlen,
                dtype=recipe.dtype)
    keys.update(method.options)
    return make_config(**keys)


def parse_recipe(data: dict) -> Recipe:
    """Build and validate a :class:`Recipe` from a mapping (e.g. parsed YAML)."""
    if not isinstance(data, dict):
        raise TilesparseError("recipe: the top level must be a mapping")
    return _check_learning(Recipe.parse(data))


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
    """Stable short hash of JSON-serialisable parts (config models and dataclasses allowed)."""
    def norm(x):
        if isinstance(x, BaseModel):
            return x.model_dump()
        return dataclasses.asdict(x) if dataclasses.is_dataclass(x) else x

    blob = json.dumps([norm(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
