"""Execute a recipe end to end, resuming from finished stages.

Layout of the output folder::

    OUT/recipe.yaml                  the recipe as run
    OUT/stages/<run>/mask/           mask artifact (+ updated weights for SparseGPT with update_weights)
    OUT/stages/<run>/quant/          with a ``quantize`` section: the mask, quantized weights and codes
    OUT/stages/<run>/eval.json       perplexities and zero-shot scores of that run
    OUT/stages/<run>/export/         packed hybrid model (when export.packed)
    OUT/report.md, OUT/*.png         regenerated on every run from the stage results

Every stage folder/file carries the fingerprint of the recipe part it depends on (``stage.json``
written last, atomically). A stage whose fingerprint matches is skipped; anything else is rebuilt, so
an interrupted recipe run again continues where it stopped and a changed recipe recomputes only
what changed.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import atomic_write_text
from ..errors import TilesparseError
from .schema import MethodConfig, Recipe, fingerprint, learn_config

STAGE_FILE = "stage.json"
COMPUTED, REUSED = "computed", "reused"
EXPORT_VERSION = "export-v2"  # v2: the packed file ships non-persistent buffers (rotary inv_freq)


@dataclass
class RunSpec:
    """One model to produce: a method at one target sparsity. ``role='prior'`` is the one-shot prior a
    learned run starts from, evaluated beside it so that the report shows what learning added;
    ``role='refit'`` is the learned run's masks with the kept weights refitted (``refit: true``)."""

    method: MethodConfig
    target: float
    role: str = "main"

    @property
    def learned_run_id(self) -> str:
        safe = self.method.name.replace(":", "").replace("/", "-").replace(" ", "-")
        return safe if self.method.kind == "dense" else f"{safe}-s{round(100 * self.target):02d}"

    @property
    def run_id(self) -> str:
        return self.learned_run_id if self.role == "main" else f"{self.learned_run_id}-{self.role}"

    @property
    def kind(self) -> str:
        return self.method.kind if self.role == "main" else self.role

    @property
    def label(self) -> str:
        """The method as the report names it."""
        if self.role == "prior":
            return f"{self.method.name} prior ({self.method.prior})"
        if self.role == "refit":
            return f"{self.method.name} + refit" + (" (tile map kept)" if self.method.refit_keep == "tiles" else "")
        return self.method.name


@dataclass
class RunResult:
    """What the report needs about one run."""

    run_id: str
    method: str
    kind: str
    target: float
    measured_sparsity: float
    perplexity: dict[str, float] = field(default_factory=dict)
    zeroshot: dict = field(default_factory=dict)
    mask_seconds: float = 0.0
    details: dict = field(default_factory=dict)
    mask_dir: str | None = None
    export_dir: str | None = None
    stages: dict = field(default_factory=dict)  # stage -> "computed" / "reused" / "skipped: reason"
    export: dict = field(default_factory=dict)  # sizes and the reload check of the packed export
    perplexity_skipped: dict = field(default_factory=dict)  # optional text -> why it was not evaluated


def _write_json_atomic(path: Path, obj) -> None:
    atomic_write_text(json.dumps(obj, indent=2, default=str), path)


def _json_done(path: Path, fp: str) -> dict | None:
    """The JSON record at ``path`` if it exists, parses, and carries fingerprint ``fp``; else ``None``."""
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return info if info.get("fingerprint") == fp else None


def _stage_done(folder: Path, fp: str) -> dict | None:
    """The finished-stage record of a stage folder (see :func:`_json_done`)."""
    return _json_done(folder / STAGE_FILE, fp)


class RecipeRunner:
    """Runs the stages of a :class:`Recipe` into an output folder (see module docstring)."""

    def __init__(self, recipe: Recipe, out_dir: str | Path | None = None, *, progress: bool = True,
                 log=print):
        self.recipe = recipe
        self.out = Path(out_dir or recipe.output)
        self.progress = progress
        self.log = log
        self._loaded = None
        self._pristine = None  # state of the prunable weights as loaded

    # ------------------------------------------------------------------ model handling
    def model(self):
        """The base model (loaded once; prunable weights restored before every use)."""
        from ..models import find_prunable_linears, load_model

        if self._loaded is None:
            self._loaded = load_model(self.recipe.model, dtype=self.recipe.dtype, device=self.recipe.device)
            self._pristine = {l.name: l.module.weight.detach().clone() for l in
                              find_prunable_linears(self._loaded.model)}
        else:
            self.restore()
        return self._loaded

    def restore(self) -> None:
        """Put the pristine prunable weights back (after masking, weight updates or quantization)."""
        import torch

        from ..quant.state import clear_quantized

        if self._loaded is None:
            return
        with torch.no_grad():
            for name, w in self._pristine.items():
                self._loaded.model.get_submodule(name).weight.copy_(w)
        clear_quantized(self._loaded.model)

    # ------------------------------------------------------------------ planning
    def plan(self) -> list[RunSpec]:
        """Every run of the recipe in order; each learned run is followed by its one-shot prior
        (``report.prior_rows``)."""
        specs = []
        for m in self.recipe.methods:
            for s in m.targets():
                specs.append(RunSpec(m, s))
                if m.refit:
                    specs.append(RunSpec(m, s, role="refit"))
                if m.kind == "learn" and m.prior != "none" and self.recipe.report.prior_rows:
                    specs.append(RunSpec(m, s, role="prior"))
        return specs

    def base_fingerprint(self) -> str:
        r = self.recipe
        return fingerprint(r.model, r.dtype, r.tile_shape)

    def mask_fingerprint(self, spec: RunSpec) -> str:
        r = self.recipe
        data = r.data if spec.method.kind != "dense" else None
        parts = [self.base_fingerprint(), data, spec.method, spec.target]
        if spec.method.kind == "learn" and spec.role != "prior":  # every learning setting, defaults included
            parts.append(learn_config(r, spec.method, spec.target).to_dict())
        return fingerprint(*parts, spec.role) if spec.role != "main" else fingerprint(*parts)

    def quant_fingerprint(self, spec: RunSpec) -> str | None:
        """Fingerprint of the quantize stage (``None`` without a ``quantize`` section)."""
        q = self.recipe.quantize
        if q is None:
            return None
        return fingerprint(self.mask_fingerprint(spec), q, self.recipe.data if q.method == "gptq" else None)

    def weights_fingerprint(self, spec: RunSpec) -> str:
        """Fingerprint of the weights a run evaluates and exports: its mask's, or its quantized weights'."""
        return self.quant_fingerprint(spec) or self.mask_fingerprint(spec)

    def weights_dir(self, spec: RunSpec) -> Path:
        """The folder whose mask (and updated weights) make the run's model: ``quant/`` or ``mask/``."""
        folder = self.out / "stages" / spec.run_id
        return folder / ("quant" if self.recipe.quantize is not None else "mask")

    def eval_fingerprint(self, spec: RunSpec) -> str:
        return fingerprint(self.weights_fingerprint(spec), self.recipe.evaluation)

    # ------------------------------------------------------------------ stages
    def run(self) -> list[RunResult]:
        """Run every stage not already finished; returns the results and writes the report."""
        from .stages import evaluate_run, export_run, make_mask, quantize_run

        self.out.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(self.out / "recipe.json", self.recipe.to_dict())
        plan = self.plan()
        results: list[RunResult] = []
        t_all = time.perf_counter()
        self._stages = [0, 0]  # [reused, total] stages of this invocation, for the report
        for i, spec in enumerate(plan, 1):
            folder = self.out / "stages" / spec.run_id
            head = f"[{i}/{len(plan)}] {spec.run_id}"
            # mask stage
            mask_dir = folder / "mask"
            status = {}
            info, status["mask"] = self._folder_stage(
                mask_dir, self.mask_fingerprint(spec), f"{head}: building mask ({spec.kind})",
                f"{head}: mask stage done, reused", make_mask, self, spec, mask_dir)
            # quantize stage
            weights_dir = self.weights_dir(spec)
            qfp = self.quant_fingerprint(spec)
            if qfp is not None:
                qinfo, status["quantize"] = self._folder_stage(
                    weights_dir, qfp, f"{head}: quantizing ({self.recipe.quantize.to_config().label()})",
                    f"{head}: quantize stage done, reused", quantize_run, self, spec, mask_dir, weights_dir)
                info = {**info, "quantize": {k: v for k, v in qinfo.items() if k != "fingerprint"}}
            # evaluation stage
            efp = self.eval_fingerprint(spec)
            eval_file = folder / "eval.json"
            ev = _json_done(eval_file, efp)
            if ev is None:
                self.log(f"{head}: evaluating")
                ev = {"fingerprint": efp, **evaluate_run(self, spec, weights_dir)}
                _write_json_atomic(eval_file, ev)
                status["evaluation"] = COMPUTED
            else:
                status["evaluation"] = self._reused(f"{head}: evaluation done, reused")
            # export stage
            export_dir, export = None, None
            if not self.recipe.export.packed:
                status["export"] = "skipped: export.packed is false"
            elif not self._should_export(spec):
                status["export"] = "skipped: not selected for export"
            else:
                export_dir = folder / "export"
                export, status["export"] = self._folder_stage(
                    export_dir, fingerprint(self.weights_fingerprint(spec), EXPORT_VERSION),
                    f"{head}: exporting packed model", f"{head}: export done, reused",
                    export_run, self, spec, weights_dir, export_dir, timed=False)
            self._stages[1] += sum(v in (COMPUTED, REUSED) for v in status.values())
            results.append(self._result(spec, info, ev, export_dir, export, status))
            if i < len(plan):  # a partial report survives an interruption of the later stages
                self._write_report(results, len(plan), time.perf_counter() - t_all)
        self.restore()
        self._write_report(results, len(plan), time.perf_counter() - t_all)
        self.log(f"report: {self.out / 'report.md'}")
        return results

    def _result(self, spec: RunSpec, info: dict, ev: dict, export_dir: Path | None, export: dict | None,
                status: dict) -> RunResult:
        """``export``: the export stage's record (``None`` when not exported)."""
        mask_dir = self.out / "stages" / spec.run_id / "mask"
        zs = ev.get("zeroshot", {})
        status = {**status, "zeroshot": f"skipped: {zs['skipped']}" if "skipped" in zs else status["evaluation"]}
        export = {k: v for k, v in (export or {}).items() if k != "fingerprint"}
        return RunResult(
            run_id=spec.run_id, method=spec.label, kind=spec.kind, target=spec.target,
            measured_sparsity=float(info.get("measured_sparsity", 0.0)),
            perplexity=ev.get("perplexity", {}), zeroshot=zs,
            mask_seconds=float(info.get("seconds", 0.0)), details=info,
            mask_dir=str(mask_dir) if spec.kind != "dense" else None,
            export_dir=str(export_dir) if export_dir else None, stages=status, export=export,
            perplexity_skipped=ev.get("perplexity_skipped", {}),
        )

    def _folder_stage(self, folder: Path, fp: str, computing: str, reused: str, compute, *args,
                      timed: bool = True) -> tuple[dict, str]:
        """A stage whose output is ``folder``: its record (``STAGE_FILE`` inside) when ``fp`` matches, else
        ``compute(*args)`` into an emptied folder, recorded with the fingerprint (and its time when ``timed``).
        Returns ``(record, COMPUTED or REUSED)``; ``computing`` / ``reused`` are the log lines."""
        record = _stage_done(folder, fp)
        if record is not None:
            return record, self._reused(reused)
        if folder.exists():
            shutil.rmtree(folder)
        self.log(computing)
        t0 = time.perf_counter()
        details = compute(*args)
        record = {"fingerprint": fp, **({"seconds": time.perf_counter() - t0} if timed else {}), **details}
        _write_json_atomic(folder / STAGE_FILE, record)
        return record, COMPUTED

    def _reused(self, message: str) -> str:
        self._stages[0] += 1
        self.log(message)
        return REUSED

    def _write_report(self, results: list[RunResult], planned: int, seconds: float) -> None:
        from ..evaluation.report import write_report

        reused, total = getattr(self, "_stages", (0, 0))
        write_report(self.recipe, results, self.out, total_seconds=seconds, planned=planned,
                     reused_stages=(reused, total))

    def finished(self) -> list[RunResult]:
        """Results of the runs whose mask and evaluation stages are finished (nothing is computed)."""
        done = []
        for spec in self.plan():
            folder = self.out / "stages" / spec.run_id
            mfp = self.mask_fingerprint(spec)
            info = _stage_done(folder / "mask", mfp)
            ev = _json_done(folder / "eval.json", self.eval_fingerprint(spec))
            qfp = self.quant_fingerprint(spec)
            qinfo = _stage_done(self.weights_dir(spec), qfp) if qfp is not None else None
            if info is None or ev is None or (qfp is not None and qinfo is None):
                continue
            export_dir = folder / "export"
            export = _stage_done(export_dir, fingerprint(self.weights_fingerprint(spec), EXPORT_VERSION))
            status = {"mask": REUSED, **({"quantize": REUSED} if qinfo is not None else {}), "evaluation": REUSED,
                      "export": REUSED if export is not None else "skipped: not exported"}
            if qinfo is not None:
                info = {**info, "quantize": {k: v for k, v in qinfo.items() if k != "fingerprint"}}
            done.append(self._result(spec, info, ev, export_dir if export is not None else None, export, status))
        return done

    def report_only(self) -> Path:
        """Rewrite ``report.md`` from the finished stages without computing anything."""
        self.out.mkdir(parents=True, exist_ok=True)
        self._write_report(self.finished(), len(self.plan()), 0.0)
        return self.out / "report.md"

    def _should_export(self, spec: RunSpec) -> bool:
        which = self.recipe.export.which
        if spec.kind in ("dense", "prior"):
            return False
        if spec.role == "refit":
            return which is None or spec.run_id in which or spec.method.name in which
        if which is None:
            return spec.method.kind == "learn" or (spec.method.kind == "oneshot" and spec.method.pattern != "unstructured")
        return spec.run_id in which or spec.method.name in which


def run_recipe(recipe: Recipe, out_dir: str | Path | None = None, *, progress: bool = True) -> list[RunResult]:
    """Run a recipe (see :class:`RecipeRunner`)."""
    if not recipe.methods:
        raise TilesparseError("recipe has no methods")
    return RecipeRunner(recipe, out_dir, progress=progress).run()
