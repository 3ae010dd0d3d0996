"""Zero-shot accuracy (the offline lm-eval suite) of saved mask artifacts, beside dense and SparseGPT 2:4.

Learned masks come from a GPU run (``benchmarks/generalization.py --masks-out DIR`` saves one artifact per
learned row); this script scores them where lm-eval is installed (the CPU machine), on the same model.
Rows: dense; with ``--baselines`` SparseGPT 2:4 mask only and with its weight update (calibrated on
``--calibration``, ``--calib-samples`` x 512 tokens); then every ``NAME=PATH`` of ``--masks`` (an artifact
folder or ``.safetensors`` file; checked against the model's weights). Columns: accuracy per task and the
mean over tasks.

    python benchmarks/zeroshot_masks.py --model gemma3-270m --baselines --calibration "austen-train@1,self:204800@1" \\
        --masks "PATCH 45 %=runs/gemma/joint-s45-kd" --limit 50 --out benchmarks/results/zeroshot_gemma_cpu.md
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

import tilesparse as ts
from _args import named_path
from _table import write_table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--masks", nargs="*", default=[], type=named_path, metavar="NAME=PATH",
                   help="mask artifacts to score")
    p.add_argument("--baselines", action="store_true", help="SparseGPT 2:4 rows (mask only, with update)")
    p.add_argument("--calibration", default="austen-train", help="calibration of the baselines")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--tasks", default=None, help="comma-separated tasks (default: the offline suite)")
    p.add_argument("--limit", type=int, default=50, help="items per task")
    p.add_argument("--out", default=None, help="markdown table (a .json with the rows is written beside it)")
    args = p.parse_args(argv)
    masks = args.masks
    from tilesparse.evaluation.zeroshot import OFFLINE_TASKS

    tasks = args.tasks.split(",") if args.tasks else list(OFFLINE_TASKS)
    lm = ts.load_model(args.model, dtype=args.dtype)
    pristine = {k: v.clone() for k, v in lm.model.state_dict().items()}
    rows: list[dict] = []

    def row(name: str) -> None:
        t0 = time.perf_counter()
        res = ts.zeroshot(lm, tasks, limit=args.limit)
        accs = {s.task: round(s.acc, 3) for s in res.scores}
        rows.append({"row": name, **accs, "mean": round(res.mean_acc, 3), "seconds": round(time.perf_counter() - t0)})
        print(rows[-1], flush=True)
        lm.model.load_state_dict(pristine)

    row("dense")
    if args.baselines:
        for update in (False, True):
            m = ts.prune(lm, method="sparsegpt", pattern="2:4", update_weights=update, calibration=args.calibration,
                         samples=args.calib_samples, progress=False)
            ts.apply_masks(lm, m)
            row(f"SparseGPT 2:4, {'with weight update' if update else 'mask only'}")
    for name, path in masks:
        ts.apply_masks(lm, ts.load_masks(path, lm))
        row(name)
    cpu = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    head = (f"Zero-shot accuracy, {lm.name} ({args.dtype}) on {cpu}: {args.limit} items per task, lm-eval. "
            f"Command: `python benchmarks/zeroshot_masks.py {' '.join(argv or [])}`")
    write_table(head, tasks + ["mean"], rows, args.out)
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
