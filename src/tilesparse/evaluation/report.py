"""``report.md`` and its plots for a recipe run (regenerated from the stage results every run)."""

from __future__ import annotations

import json
import platform
import re
import time
from collections import defaultdict
from pathlib import Path

import torch

_BLOCK = re.compile(r"\.(\d+)\.")


def _block_of(name: str) -> int:
    m = _BLOCK.search(name)
    return int(m.group(1)) if m else 0


def block_densities(maskset) -> list[float]:
    """Kept fraction per decoder block (numel-weighted over the block's masked linears)."""
    kept, total = defaultdict(int), defaultdict(int)
    for lm in maskset:
        b = _block_of(lm.name)
        kept[b] += lm.kept()
        total[b] += lm.numel
    return [kept[b] / total[b] for b in sorted(total)]


def _fmt(x, digits=2):
    return "n/a" if x is None else f"{x:.{digits}f}"


def _zeroshot_mean(z: dict) -> float | None:
    """Mean ``acc`` over the zero-shot tasks of one run (``None`` when not evaluated)."""
    return z.get("mean_acc") if z else None


def _machine() -> str:
    import os

    dev = "CPU"
    if torch.cuda.is_available():
        dev = torch.cuda.get_device_name(0)
    return f"{dev}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}"


def write_report(recipe, results, out: Path, *, total_seconds: float = 0.0, planned: int | None = None,
                 reused_stages: tuple[int, int] | None = None) -> Path:
    """Write ``out/report.md`` and PNG plots from the results of :class:`~tilesparse.recipe.runner.RecipeRunner`.

    ``reused_stages`` = (stages reused from an earlier run, stages done so far) of the invocation that took
    ``total_seconds``; the report says how much of that time was new work.
    """
    from ..io import load_mask_artifact

    out = Path(out)
    texts = list(dict.fromkeys(t for r in results for t in r.perplexity))
    dense = next((r for r in results if r.kind == "dense"), None)
    lines = [f"# tilesparse report: {recipe.model if recipe.model != 'default' else 'SmolLM2-135M-Instruct (Q4_1, dequantized)'}", ""]
    if not total_seconds:
        took = "rewritten from finished stages"
    else:
        took = f"this run took {total_seconds / 60:.1f} min"
        if reused_stages is not None and reused_stages[1]:
            took += (f" (all {reused_stages[1]} stages computed)" if reused_stages[0] == 0 else
                     f" ({reused_stages[0]} of {reused_stages[1]} stages reused from an earlier run)")
    lines += [f"Generated {time.strftime('%Y-%m-%d %H:%M')} on {_machine()}; {took}. Tile {recipe.tile_shape[0]}x"
              f"{recipe.tile_shape[1]}; calibration {recipe.data.calibration} "
              f"({recipe.data.calib_samples} x {recipe.data.calib_seqlen} tokens); learning text "
              f"{recipe.data.train}.", ""]
    q = getattr(recipe, "quantize", None)
    if q is not None:
        cfg = q.to_config()
        calib = " (calibrated on the calibration text)" if cfg.needs_calibration else ""
        lines += [f"Weights: {cfg.describe()}{calib}, quantized after each run's mask (the dense baseline "
                  "too); evaluated as fake-quant (the dequantized weights).", ""]
    p = recipe.evaluation.perplexity
    lines += [f"Perplexity: first {p.windows} non-overlapping windows of {p.seqlen} tokens of each text, "
              "exp(mean NLL) over all predicted tokens. Sparsity is measured over the pruned linears.", ""]
    if planned is not None and len(results) < planned:
        lines += [f"**Partial report: {len(results)} of {planned} runs finished.** Run the recipe again to "
                  "finish the others (finished stages are reused).", ""]
    skipped = {t: why for r in results for t, why in r.perplexity_skipped.items()}
    for t, why in skipped.items():
        lines += [f"Not evaluated: `{t}` (an optional text): {why}", ""]
    if recipe.notes:
        lines += [recipe.notes.strip(), ""]
    # main table
    head = ["run", "kind", "target", "measured sparsity"] + [f"PPL {t}" for t in texts]
    head += ["zero-shot acc (mean)", "learning", "mask time"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        learn = ""
        if r.details.get("steps"):
            tok = r.details.get("tokens", 0)
            tok_s = f"{tok / 1e6:.2f} M" if tok >= 1e6 else f"{tok / 1e3:.1f} k"
            learn = f"{r.details['steps']} steps, {tok_s} tokens"
        zs = _zeroshot_mean(r.zeroshot)
        row = [r.run_id, r.kind, f"{100 * r.target:.0f} %", f"{100 * r.measured_sparsity:.2f} %"]
        row += [_fmt(r.perplexity.get(t)) for t in texts]
        row += [_fmt(100 * zs if zs is not None else None, 1) + (" %" if zs is not None else ""), learn or "-",
                f"{r.mask_seconds:.0f} s"]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    # zero-shot detail
    tasks = sorted({t for r in results for t in (r.zeroshot.get("tasks") or {})})
    if tasks:
        limit = next((r.zeroshot.get("limit") for r in results if r.zeroshot.get("limit")), None)
        errs = sorted(v["acc_stderr"] for r in results for v in (r.zeroshot.get("tasks") or {}).values()
                      if isinstance(v, dict) and v.get("acc_stderr") is not None)
        se = f"; the median standard error of one accuracy is {100 * errs[len(errs) // 2]:.1f} points" if errs else ""
        lines += ["## Zero-shot accuracy per task (lm-eval 0.4.13, acc / acc_norm in %)", "",
                  f"{limit or 'all'} items per task{se}.", ""]
        lines += ["| run | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
        for r in results:
            cells = []
            for t in tasks:
                v = (r.zeroshot.get("tasks") or {}).get(t) or {}
                acc, norm = v.get("acc"), v.get("acc_norm")
                cell = _fmt(100 * acc, 1) if acc is not None else "n/a"
                if norm is not None:
                    cell += f" / {100 * norm:.1f}"
                cells.append(cell)
            lines.append(f"| {r.run_id} | " + " | ".join(cells) + " |")
        unavailable = next((r.zeroshot.get("unavailable") for r in results if r.zeroshot.get("unavailable")), None)
        if unavailable:
            what = unavailable if isinstance(unavailable, str) else "; ".join(
                f"{k}: {v}" for k, v in unavailable.items())
            lines += ["", f"Not evaluated: {what}"]
        lines.append("")
    lines += _export_table(results) + _stage_table(results)
    (out / "results.json").write_text(json.dumps([r.__dict__ for r in results], indent=2, default=str),
                                      encoding="utf-8")
    if not recipe.report.plots:
        (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return out / "report.md"
    from .plots import plot_block_density, plot_speed, plot_tile_maps, plot_tradeoff

    lines += ["## Plots", ""]
    for t in texts:
        series = defaultdict(list)
        for r in results:
            if r.kind != "dense" and t in r.perplexity:
                series[r.method].append((r.measured_sparsity, r.perplexity[t]))
        slug = re.sub(r"[^a-z0-9]+", "-", t.lower()).strip("-")
        f = plot_tradeoff(series, t, out / f"tradeoff-{slug}.png",
                          dense_ppl=dense.perplexity.get(t) if dense else None)
        lines += [f"![perplexity vs sparsity on {t}]({f.name})", ""]
    learned = [r for r in results if r.kind == "learn" and r.mask_dir]
    if learned:
        series, targets, maps_run = {}, {}, None
        for r in learned:
            ms = load_mask_artifact(r.mask_dir)
            series[r.run_id] = block_densities(ms)
            targets[r.run_id] = 1 - r.target
            if maps_run is None or r.target > maps_run[0].target:
                maps_run = (r, ms)
        f = plot_block_density(series, out / "block-density.png", targets)
        lines += ["Density per decoder block of the learned masks: one global budget, so blocks may sit above or "
                  "below the target (the spread grows with training; the priors start every layer at the target):", "",
                  f"![density per block]({f.name})", ""]
        r, ms = maps_run
        hybrid = [lm for lm in ms if lm.pattern == "hybrid"]
        if hybrid:
            k = max(1, recipe.report.tile_map_layers)
            pick = [hybrid[int(i * (len(hybrid) - 1) / max(1, k - 1))] for i in range(min(k, len(hybrid)))]
            maps = {lm.name.replace("model.layers.", "L"): lm.kinds for lm in pick}
            f = plot_tile_maps(maps, out / "tile-maps.png", f"tile maps of {r.run_id}")
            lines += [f"Tile maps of a few layers of {r.run_id}:", "", f"![tile maps]({f.name})", ""]
    kr = recipe.report.kernel_results
    if kr and Path(kr).is_file():
        data = json.loads(Path(kr).read_text())
        series = defaultdict(list)
        for pt in data.get("points", []):
            series[pt["series"]].append((pt["sparsity"], pt["speedup"]))
        f = plot_speed(series, out / "speed.png", f"speed-up over dense ({data.get('device', 'GPU')})")
        lines += [f"Kernel speed ({data.get('device', 'GPU')}, from {Path(kr).name}):", "", f"![speed]({f.name})", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _export_table(results) -> list[str]:
    """Sizes of the packed exports and the result of loading each back."""
    rows = [r for r in results if r.export]
    if not rows:
        return []
    lines = ["## Packed exports", "",
             "Each export is loaded back from disk and its logits compared with the model that was packed "
             "(bf16; the check fails the run when they differ beyond bf16 rounding).", "",
             "| run | folder | file size | vs dense bf16 model | reload check (max abs logit diff) |",
             "|---|---|---|---|---|"]
    for r in rows:
        e = r.export
        lines.append(f"| {r.run_id} | `{r.export_dir}` | {e['file_bytes'] / 2**20:.1f} MiB | "
                     f"{e['file_vs_dense']:.3f}x | passed ({e['reload_max_logit_diff']:.3g}) |")
    return lines + [""]


def _stage_table(results) -> list[str]:
    """What each stage of each run did: computed, reused from an earlier run, or skipped (with why)."""
    if not any(r.stages for r in results):
        return []
    names = list(dict.fromkeys(k for r in results for k in r.stages))
    lines = ["## Stages", "", "| run | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for r in results:
        lines.append(f"| {r.run_id} | " + " | ".join(r.stages.get(k, "-") for k in names) + " |")
    return lines + [""]
