"""Out-of-domain quality of learned masks: learning objective, training data and refit, against SparseGPT.

Rows, all from one model load and the same token budget per learned run:
- dense; SparseGPT 2:4 mask only and with its weight update (``--baselines``, calibrated on ``--calibration``);
- per target sparsity and tile map (``--tile-maps``: free, columns): the one-shot prior (``--prior``), then one
  learned run per ``--losses`` entry (PATCH ``--mode``; ``maskllm`` is always 50 %, free maps only), and with
  ``--refit`` the same masks with SparseGPT's weight
  update refitted for them (calibrated on ``--calibration``; ``--refit-keep tiles``: the learned tile map
  kept and SparseGPT's own 2:4 patterns inside it).
Perplexity under the pinned protocol (first ``--windows`` x 512 tokens) on every ``--texts`` entry; list
out-of-domain texts first: nothing here trains or calibrates on them.

    python benchmarks/generalization.py --out benchmarks/results/generalization_cpu.md   # the default recipe's budget
    python benchmarks/generalization.py --device cuda --prior sparsegpt --steps 200 --batch 8 --seqlen 512 \\
        --text "austen-train@1,self:409600@1" --baselines --refit --out benchmarks/results/generalization_h100.md
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import tilesparse as ts
from _table import write_table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--modes", default="joint", help="joint, tile, maskllm (comma-separated)")
    p.add_argument("--sparsities", default="0.45,0.25")
    p.add_argument("--losses", default="ce,kd")
    p.add_argument("--tile-maps", default="free", help="free, columns (comma-separated; see LearnConfig.tile_map)")
    p.add_argument("--prior", default="wanda")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: LearnConfig's)")
    p.add_argument("--text", default="austen-train", help="training source (text, self:N or a mixture)")
    p.add_argument("--calibration", default=None, help="calibration of baselines and refit (default --text)")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--baselines", action="store_true", help="SparseGPT 2:4 rows (mask only, with update)")
    p.add_argument("--refit", action="store_true", help="refitted rows after every learned row")
    p.add_argument("--refit-keep", default="mask",
                   help="what the refitted rows keep of the learned mask: mask, tiles or both (comma-separated)")
    p.add_argument("--texts", default="mobydick,debian-reference,prideprejudice",
                   help="evaluation texts (out of domain first)")
    p.add_argument("--windows", type=int, default=10)
    p.add_argument("--out", default=None, help="markdown table (a .json with the rows is written beside it)")
    p.add_argument("--masks-out", default=None,
                   help="save every learned row's masks under this folder (for benchmarks/zeroshot_masks.py)")
    args = p.parse_args(argv)
    texts = args.texts.split(",")
    calibration = args.calibration or args.text
    lm = ts.load_model(args.model, dtype=args.dtype, device=args.device)
    pristine = {k: v.clone() for k, v in lm.model.state_dict().items()}
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    rows: list[dict] = []

    def row(name: str, **extra) -> None:
        ppl = {t: round(ts.perplexity(lm, t, windows=args.windows, progress=False).perplexity, 2) for t in texts}
        rows.append({"row": name, **ppl, **extra})
        print(rows[-1], flush=True)
        if args.out:  # rows so far survive an interruption
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))
        lm.model.load_state_dict(pristine)

    def keep(slug: str, masks) -> None:
        if args.masks_out:
            ts.save_masks(masks, Path(args.masks_out) / slug)

    row("dense")
    if args.baselines:
        for update in (False, True):
            t0 = time.perf_counter()
            masks = ts.prune(lm, method="sparsegpt", pattern="2:4", update_weights=update, calibration=calibration,
                             samples=args.calib_samples, progress=False)
            ts.apply_masks(lm, masks)
            row(f"SparseGPT 2:4, {'with weight update' if update else 'mask only'}", sparsity=0.5,
                seconds=round(time.perf_counter() - t0, 1))
    for mode in args.modes.split(","):
        targets = [0.5] if mode == "maskllm" else [float(x) for x in args.sparsities.split(",")]
        maps = ["free"] if mode == "maskllm" else args.tile_maps.split(",")
        for s, tile_map in ((s, m) for s in targets for m in maps):
            by_map = "" if tile_map == "free" else f", {tile_map} tile map"
            for i, loss in enumerate(args.losses.split(",")):
                t0 = time.perf_counter()
                res = ts.learn(lm, mode=mode, sparsity=s, prior=args.prior, steps=args.steps, batch=args.batch,
                               seqlen=args.seqlen, text=args.text, loss=loss, calib_samples=args.calib_samples,
                               lr=args.lr, progress=False, **({} if mode == "maskllm" else {"tile_map": tile_map}))
                seconds = time.perf_counter() - t0
                tag = f"{mode}-s{round(s * 100)}" + ("" if tile_map == "free" else f"-{tile_map}")
                if i == 0:
                    ts.apply_masks(lm, res.prior)
                    row(f"one-shot prior ({args.prior}) for {mode}{by_map}", sparsity=s)
                step_s = sum(h["seconds"] for h in res.history) / len(res.history)
                label = f"{mode}{by_map}, loss {loss}"
                keep(f"{tag}-{loss}", res.maskset)
                ts.apply_masks(lm, res.maskset)
                row(label, sparsity=s, seconds=round(seconds, 1), step_s=round(step_s, 3))
                for kept in args.refit_keep.split(",") if args.refit else []:
                    t0 = time.perf_counter()
                    info = ts.refit(lm, res.maskset, keep=kept, calibration=calibration, samples=args.calib_samples,
                                    progress=False)
                    ts.apply_masks(lm, info["maskset"])
                    row(f"{label} + refit" + (" (tile map kept)" if kept == "tiles" else ""), sparsity=s,
                        seconds=round(time.perf_counter() - t0, 1))
    tokens = args.steps * args.batch * args.seqlen
    head = (f"{lm.name} ({args.dtype}) on {device_name}. Learned rows: {args.steps} steps x {args.batch} x "
            f"{args.seqlen} = {tokens} tokens of `{args.text}` from a {args.prior} prior, learning rate "
            f"{args.lr or 'default'}; baselines and refit "
            f"calibrated on `{calibration}` ({args.calib_samples} x 512 tokens). Perplexity: first {args.windows} x "
            f"512 windows. Command: `python benchmarks/generalization.py {' '.join(argv or [])}`")
    write_table(head, ["sparsity"] + texts + ["seconds", "step_s"], rows, args.out)
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
