"""Quality at 4 bits: weight-only group-wise quantization after one-shot masks, against the same masks in full
precision, out-of-domain texts first.

Rows (every one from a fresh model load; masks by SparseGPT with its weight update, calibrated on
``--calibration``; GPTQ calibrated on the same text, with the mask held fixed):
- dense; dense at 4 bits (round to nearest, and GPTQ);
- per ``--sparsities`` entry (``0.5`` = 2:4 everywhere, below it hybrid dense / 2:4 tiles): the mask in full
  precision, then the same model at 4 bits (each of ``--sparse-methods``, from the same pruned weights);
- per ``--masks NAME=PATH`` (a saved mask artifact, e.g. learned PATCH masks from
  ``generalization.py --masks-out``): the mask alone on the model's weights, then at 4 bits the same way.
``--observer mse`` chooses every group's range by the clipping search (``tilesparse.quant.rtn``); ``--act-order``
runs GPTQ by decreasing Hessian diagonal (``tilesparse.quant.gptq``).
Perplexity under the pinned protocol (first ``--windows`` x 512 tokens) on every ``--texts`` entry; list
out-of-domain texts first: nothing here calibrates on them. The ``4-bit vs 16-bit`` column is the first text's
perplexity ratio of a 4-bit row to its full-precision row.

    python benchmarks/quant_accuracy.py --out benchmarks/results/quant_accuracy_cpu.md
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time

import torch

import tilesparse as ts
from tilesparse.quant.state import clear_quantized
from _args import named_path
from _table import write_table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--sparsities", default="0.5,0.45,0.35,0.25")
    p.add_argument("--texts", default="mobydick,debian-reference,prideprejudice")
    p.add_argument("--calibration", default="austen-train")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--asymmetric", action="store_true", help="min/max grid with a zero point per group")
    p.add_argument("--observer", default="minmax", choices=["minmax", "mse"])
    p.add_argument("--act-order", action="store_true", help="GPTQ visits columns by decreasing Hessian diagonal")
    p.add_argument("--sparse-methods", default="gptq", help="quantizers of the pruned rows (rtn, gptq or both)")
    p.add_argument("--masks", nargs="*", default=[], type=named_path, metavar="NAME=PATH",
                   help="saved mask artifacts to score")
    p.add_argument("--windows", type=int, default=10)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    texts = [t for t in args.texts.split(",") if t]
    sparsities = [float(x) for x in args.sparsities.split(",") if x]
    calib = dict(calibration=args.calibration, samples=args.samples, progress=False)
    rows: list[dict] = []
    grid = "asymmetric (uint8 zero point)" if args.asymmetric else "symmetric"
    default_model = ("the embedded SmolLM2-135M-Instruct; its weights come from a Q4_1 GGUF, already 4-bit with "
                     "asymmetric groups of 32")
    qkw = dict(group_size=args.group_size, symmetric=not args.asymmetric, observer=args.observer,
               act_order=args.act_order)
    sparse_methods = [m for m in args.sparse_methods.split(",") if m]
    if args.calibration.startswith("austen"):
        domains = (f"{', '.join(texts[:-1])} out of domain, " if len(texts) > 1 else "") + \
            f"{texts[-1]} in the calibration's domain"
    else:  # text sampled from the model itself: none of the texts is its domain
        domains = f"{', '.join(texts)}: none of them in the calibration's domain"
    command = argv if argv is not None else sys.argv[1:]
    kinds = (["SparseGPT with its weight update"] if sparsities else []) + (
        ["saved masks alone, no weight update (the text they were learned on is their own record, not this "
         "script's)"] if args.masks else [])
    head = (f"# Quality at 4 bits ({args.device}, {platform.machine()}, torch {torch.__version__})\n\n"
            f"Model: {args.model or default_model} (fp32 compute). Masks: {'; '.join(kinds)}; "
            f"4 bits: group {args.group_size} along the input, {grid}, bf16 scales, "
            f"{args.observer} observer{', GPTQ act-order' if args.act_order else ''}, "
            f"after the mask (pruned weights stay 0). Calibration: {args.calibration} ({args.samples} x 512 "
            f"tokens) for {'the masks and ' if sparsities else ''}GPTQ. "
            f"Perplexity: first {args.windows} x 512 tokens; {domains}.\n\n"
            f"Command (in `benchmarks/`): `python quant_accuracy.py {shlex.join(command)}`")
    cols = ["sparsity", *texts, "4-bit vs 16-bit", "seconds"]

    def score(lm, row: str, sparsity: float, t0: float, base: dict | None = None) -> dict:
        ppl = {t: round(ts.perplexity(lm, t, windows=args.windows, progress=False).perplexity, 2) for t in texts}
        r = {"row": row, "sparsity": f"{100 * sparsity:.0f} %", **ppl, "seconds": round(time.time() - t0)}
        if base is not None:
            r["4-bit vs 16-bit"] = f"{ppl[texts[0]] / base[texts[0]]:.3f}x"
        rows.append(r)
        if args.out:  # the table so far, rewritten after every row: a stopped run keeps its rows
            write_table(head, cols, rows, args.out)
        else:
            print(r, flush=True)
        return r

    def load():
        return ts.load_model(args.model, device=args.device)

    t0 = time.time()
    dense = score(load(), "dense", 0.0, t0)
    for method in ("rtn", "gptq"):
        t0 = time.time()
        lm = load()
        ts.quantize(lm, method=method, **qkw, **calib)
        score(lm, f"dense, 4-bit {method.upper()}", 0.0, t0, dense)
    def masked_rows(lm, masks, name: str, sparsity: float, t0: float) -> None:
        """The masked model at 16 bits, then each of ``--sparse-methods`` at 4 bits from the same weights."""
        full = score(lm, name, sparsity, t0)
        pruned = {k: v.clone() for k, v in lm.model.state_dict().items()}
        for method in sparse_methods:
            t0 = time.time()
            lm.model.load_state_dict(pruned)
            ts.quantize(lm, masks, method=method, **qkw, **calib)
            score(lm, f"{name}, 4-bit {method.upper()}", sparsity, t0, full)
            clear_quantized(lm.model)

    for s in sparsities:
        t0 = time.time()
        lm = load()
        pattern = "2:4" if s == 0.5 else "hybrid"
        kw = {} if s == 0.5 else {"sparsity": s}
        masks = ts.prune(lm, method="sparsegpt", pattern=pattern, update_weights=True, **kw, **calib)
        masked_rows(lm, masks, "SparseGPT 2:4" if s == 0.5 else "SparseGPT hybrid", s, t0)
    for name, path in args.masks:
        t0 = time.time()
        lm = load()
        masks = ts.load_masks(path, lm)
        ts.apply_masks(lm, masks)
        masked_rows(lm, masks, name, masks.sparsity(), t0)
    write_table(head, cols, rows, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
