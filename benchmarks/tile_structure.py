"""Quality cost of a coarser tile map: one-shot hybrid masks whose dense tiles are chosen freely (the library's
choice), by whole tile-rows, or by whole tile-columns.

Why: a hybrid layer whose tile map is the same in every tile-row (a tile column is 2:4 or dense throughout) is one
all-2:4 GEMM plus one dense GEMM over a column permutation of x, and one whose map is the same in every tile-column
is the same over a row permutation of the output: both run on stock kernels at their full speed, where a free map
needs a hybrid kernel (``docs/NOTEBOOK.md``, "Hybrid GEMM route"). This measures what the constraint costs in
quality before anything is built on it.

How: the library's one-shot hybrid prior scores a tile by the density of the method's unstructured mask at the
target inside it, and makes the densest tiles dense, globally, until the target is met
(:func:`tilesparse.pruning.scores.hybrid_tile_kinds`). Here the score of every tile is replaced by the mean
score of its tile-row (``rows``) or tile-column (``cols``), so that the global choice takes whole rows or
columns; the budget cut can split a few of them (reported as ``mixed``). Everything else is the library's
(same calibration, the same 2:4 pass on the 2:4 tiles). Perplexity on the out-of-domain texts first.

    PYTHONPATH=src python3 benchmarks/tile_structure.py --out benchmarks/results/tile_structure_cpu.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch
from _args import add_model_and_calibration
from _oneshot_session import OneShotSession

from tilesparse.io import apply_masks
from tilesparse.masks.tiles import DENSE
from tilesparse.pruning import (
    PruneConfig,
    prune_model,
    scores,
)

STRUCTURES = ("free", "rows", "cols")
_density = scores.tile_density


def structured_density(structure: str):
    """``tile_density`` with every tile scored by its tile-row's (``rows``) or tile-column's (``cols``) mean."""

    def density(mask, grid):
        d = _density(mask, grid)
        if structure == "rows":
            return d.mean(1, keepdim=True).expand_as(d).clone()
        if structure == "cols":
            return d.mean(0, keepdim=True).expand_as(d).clone()
        return d

    return density


def mixed_lines(kinds: dict[str, torch.Tensor]) -> dict[str, int]:
    """Tile-rows and tile-columns holding both kinds, over all layers."""
    rows = cols = 0
    for k in kinds.values():
        d = k == DENSE
        rows += int((d.any(1) & ~d.all(1)).sum())
        cols += int((d.any(0) & ~d.all(0)).sum())
    return {"mixed_rows": rows, "mixed_cols": cols}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_and_calibration(ap, "mobydick,debian-reference,prideprejudice")
    ap.add_argument("--methods", default="wanda,sparsegpt")
    ap.add_argument("--sparsities", default="0.45,0.25")
    ap.add_argument("--out", default="benchmarks/results/tile_structure_cpu.md")
    ap.add_argument("--cache", default="runs/tile_structure/results.json")
    args = ap.parse_args(argv)
    run = OneShotSession(args, args.cache, write_table)
    cache, loaded, calib, evaluate = run.cache, run.loaded, run.calib, run.evaluate
    run.evaluate_dense()
    for s in (float(v) for v in args.sparsities.split(",")):
        for method in (m for m in args.methods.split(",") if m):
            for structure in STRUCTURES:
                key = f"{method}|{s:g}|{structure}"
                if key in cache:
                    continue
                scores.tile_density = structured_density(structure)
                try:
                    update = method == "sparsegpt"
                    cfg = PruneConfig(method=method, pattern="hybrid", sparsity=s, update_weights=update)
                    t0 = time.perf_counter()
                    ms = prune_model(loaded.model, calib, cfg, progress=True)
                    seconds = time.perf_counter() - t0
                finally:
                    scores.tile_density = _density
                if not update:
                    apply_masks(loaded.model, ms)
                kinds = {m.name: m.kinds for m in ms if m.kinds is not None}
                ppl = evaluate()
                cache[key] = {"ppl": ppl, "sparsity": ms.sparsity(), "seconds": seconds, **mixed_lines(kinds)}
                run.restore()
                print(f"{key}: sparsity {ms.sparsity():.4f}, " + ", ".join(f"{t} {v:.2f}" for t, v in ppl.items())
                      + f", {seconds:.0f} s, {mixed_lines(kinds)}", flush=True)
                run.save()
    run.save()
    return 0


def write_table(args, cache, texts, calib_desc, model_name) -> None:
    d = cache.get("dense", {}).get("ppl", {})
    lines = [
        "# One-shot hybrid masks: free tile maps against whole tile-rows or tile-columns",
        "",
        (f"Model: {model_name}. Calibration: {calib_desc['text']} ({args.calib_text}), {calib_desc['samples']} x "
         f"{calib_desc['seqlen']} tokens, seed 0. Perplexity: first {args.windows} x {args.seqlen}-token windows; "
         "Moby Dick and the Debian Reference are out of domain, Pride and Prejudice is the calibration author's "
         "(in domain). SparseGPT with its weight update, Wanda mask only. Tiles 128x128. `rows` / `cols`: every "
         "tile scored by its tile-row's / tile-column's mean density of the unstructured prior, so the global "
         "choice of dense tiles takes whole rows / columns; `mixed`: tile-rows / tile-columns left with both kinds "
         "(all layers)."),
        "",
        f"Machine: {cache.get('_machine')}.",
        "",
        f"Command: `PYTHONPATH=src python3 benchmarks/tile_structure.py --out {args.out}`",
        "",
        "| method | sparsity | tile map | measured | " + " | ".join(f"PPL {t}" for t in texts)
        + " | vs free | mixed rows / cols | time (s) |",
        "|---|---|---|---|" + "---|" * len(texts) + "---|---|---|",
        "| dense | 0 | - | 0 | " + " | ".join(f"{d[t]:.2f}" if t in d else "-" for t in texts) + " | | | |",
    ]
    for key, r in cache.items():
        if "|" not in key:
            continue
        method, s, structure = key.split("|")
        free = cache.get(f"{method}|{s}|free")
        rel = ""
        if free and structure != "free":
            common = [t for t in texts if t in r["ppl"] and t in free["ppl"]]
            rel = " / ".join(f"{r['ppl'][t] / free['ppl'][t]:.3f}x" for t in common)
        lines.append(f"| {method} | {s} | {structure} | {r['sparsity']:.4f} | "
                     + " | ".join(f"{r['ppl'][t]:.2f}" if t in r["ppl"] else "-" for t in texts)
                     + f" | {rel} | {r['mixed_rows']} / {r['mixed_cols']} | {r['seconds']:.0f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
