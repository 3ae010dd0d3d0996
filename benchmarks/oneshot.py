"""One-shot pruning benchmark: perplexity, measured sparsity and wall time of every method x pattern.

Default: the embedded SmolLM2-135M-Instruct, calibration on the Austen training split (32 x 512 tokens,
seed 0), perplexity on Pride and Prejudice and Persuasion (first 10 x 512-token windows, pinned
protocol). Rows: dense; magnitude / Wanda / SparseGPT at 2:4, 50 % unstructured, and hybrid tiles at
45 / 35 / 25 %. SparseGPT keeps its reconstructed weights (``--sparsegpt-mask-only`` evaluates its mask
on the original weights instead); magnitude and Wanda masks are applied to the original weights.

Results are cached per row in a JSON file (``--cache``), so an interrupted run resumes; the markdown table
is rewritten after every row.

    PYTHONPATH=src python3 benchmarks/oneshot.py --out benchmarks/results/oneshot_cpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
from _args import add_model_and_calibration  # noqa: E402

from tilesparse.commands.common import quiet_libraries  # noqa: E402
from tilesparse.evaluation import evaluate_text  # noqa: E402
from tilesparse.io import apply_masks  # noqa: E402
from tilesparse.models import find_prunable_linears, load_model  # noqa: E402
from tilesparse.pruning import PruneConfig, calibration_ids, prune_model  # noqa: E402

PATTERN_ROWS = [("2:4", 0.5), ("hybrid", 0.35), ("unstructured", 0.5), ("hybrid", 0.45), ("hybrid", 0.25)]
TEXT_NAMES = {"prideprejudice": "Pride and Prejudice", "persuasion": "Persuasion"}


def machine(device: str = "cpu") -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return (f"{torch.cuda.get_device_name()} (pruning and evaluation on the GPU, fp32, TF32 off), "
                f"torch {torch.__version__}")
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def row_key(method: str, pattern: str, s: float) -> str:
    return f"{method}|{pattern}|{s:g}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_and_calibration(ap, "prideprejudice,persuasion")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    ap.add_argument("--patterns", default=None,
                    help="subset of rows, e.g. '2:4,hybrid:0.35' (default: 2:4, unstructured:0.5, hybrid 0.45/0.35/0.25)")
    ap.add_argument("--tile", default="128")
    ap.add_argument("--sparsegpt-mask-only", action="store_true")
    ap.add_argument("--tile-map", default="free", help="hybrid tile maps: free or columns (PruneConfig.tile_map)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="torch device for pruning and evaluation (default cpu)")
    ap.add_argument("--table-only", action="store_true", help="rewrite the table from the cache and stop")
    ap.add_argument("--out", default="benchmarks/results/oneshot_cpu.md")
    ap.add_argument("--cache", default="runs/oneshot/results.json")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = PATTERN_ROWS
    if args.patterns:
        rows = []
        for item in args.patterns.split(","):
            pat, s = (item, "0.5") if item == "2:4" else (item.rsplit(":", 1) + ["0.5"])[:2]
            rows.append((pat, float(s)))
    methods = [m for m in args.methods.split(",") if m]
    texts = [t for t in args.eval_texts.split(",") if t]
    cache_path = Path(args.cache)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}

    if args.table_only:
        loaded = load_model(args.model)
        _, calib_desc = calibration_ids(loaded, args.calib_text, args.calib_samples, args.seqlen, args.seed)
        write_table(args, cache, methods, rows, texts, calib_desc, loaded.name)
        return 0
    loaded = load_model(args.model, device=args.device)
    layers = find_prunable_linears(loaded.model)
    originals = {l.name: l.weight.detach().clone() for l in layers}
    calib, calib_desc = calibration_ids(loaded, args.calib_text, args.calib_samples, args.seqlen, args.seed)
    cache["_machine"] = machine(args.device)

    def restore():
        for l in layers:
            l.set_weight(originals[l.name])

    def evaluate() -> dict:
        return {t: evaluate_text(loaded, t, seqlen=args.seqlen, max_windows=args.windows, progress=False).perplexity
                for t in texts}

    def save():
        cache_path.write_text(json.dumps(cache, indent=1))
        write_table(args, cache, methods, rows, texts, calib_desc, loaded.name)

    if "dense" not in cache:
        cache["dense"] = {"ppl": evaluate(), "sparsity": 0.0, "seconds": 0.0}
        save()
    # rows outer, methods inner: the sanity comparisons (2:4 across methods) finish first
    for pattern, s in rows:
        for method in methods:
            key = row_key(method, pattern, s)
            if key in cache:
                continue
            update = method == "sparsegpt" and not args.sparsegpt_mask_only
            cfg = PruneConfig(method=method, pattern=pattern, sparsity=s, tile=args.tile, update_weights=update,
                              tile_map=args.tile_map)
            t0 = time.perf_counter()
            ms = prune_model(loaded.model, calib, cfg, progress=True)
            seconds = time.perf_counter() - t0
            if not update:
                apply_masks(loaded.model, ms)
            zeros = sum(int((l.weight == 0).sum()) for l in layers) / sum(l.numel for l in layers)
            ppl = evaluate()
            cache[key] = {"ppl": ppl, "sparsity": ms.sparsity(), "zeros": zeros, "seconds": seconds,
                          "update_weights": update, "tile_budget": ms.meta.get("tile_budget"),
                          "fallbacks": (ms.meta.get("sparsegpt") or {}).get("fallback_layers", [])}
            restore()
            print(f"{cfg.label()}: sparsity {ms.sparsity():.4f}, ppl "
                  + ", ".join(f"{t} {v:.2f}" for t, v in ppl.items()) + f", {seconds:.0f} s", flush=True)
            save()
    save()
    return 0


def write_table(args, cache, methods, rows, texts, calib_desc, model_name) -> None:
    cmd = " ".join(["PYTHONPATH=src python3 benchmarks/oneshot.py", *getattr(args, "argv", [])])
    lines = [
        "# One-shot pruning: magnitude, Wanda, SparseGPT x 2:4, unstructured, hybrid tiles",
        "",
        f"Model: {model_name}. Calibration: {calib_desc['text']} ({args.calib_text}), "
        f"{calib_desc['samples']} x {calib_desc['seqlen']} tokens, seed {calib_desc['seed']}. "
        f"Perplexity: first {args.windows} x {args.seqlen}-token windows, no BOS. Tiles {args.tile}. "
        "SparseGPT " + ("mask only (original weights)" if args.sparsegpt_mask_only else
                        "with its weight update") + "; magnitude and Wanda masks on the original weights. "
        "Hybrid: dense tiles chosen globally from the tile density of the same method's unstructured mask "
        f"at the target ({'whole tile-columns' if args.tile_map == 'columns' else 'free tile map'}), "
        "the rest 2:4 (two passes). Time = pruning wall time (both passes for hybrid), "
        "evaluation excluded" + ("; the CPU was shared with other jobs, so times are indicative." if args.device == "cpu"
                                else "."),
        "",
        f"Machine: {cache.get('_machine') or machine()}.",
        "",
        f"Command: `{cmd}`",
        "",
        "| method | pattern | target | measured sparsity | " + " | ".join(
            f"PPL {TEXT_NAMES.get(t, t)}" for t in texts) + " | time (s) |",
        "|---|---|---|---|" + "---|" * len(texts) + "---|",
    ]
    d = cache.get("dense")
    if d:
        lines.append("| dense | - | 0 % | 0.0000 | " + " | ".join(f"{d['ppl'][t]:.2f}" for t in texts) + " | - |")
    order = sorted(rows, key=lambda r: (r[0] != "2:4", r[0] != "unstructured", -r[1]))
    for pattern, s in order:
        for method in methods:
            r = cache.get(row_key(method, pattern, s))
            if not r:
                continue
            lines.append(f"| {method} | {pattern} | {100 * s:g} % | {r['sparsity']:.4f} | "
                         + " | ".join(f"{r['ppl'][t]:.2f}" for t in texts) + f" | {r['seconds']:.0f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
