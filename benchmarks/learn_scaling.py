"""Mask learning on several GPUs: throughput and memory per GPU, and the final masks of 1 vs 2 GPUs.

Two modes:

- ``throughput``, run under ``torchrun``: learning steps of the real trainer (``learn_masks``: FSDP2 sharding
  with ``--shard on``, gradient checkpointing, the distillation loss, AdamW on fp32 logits) for PATCH-Joint
  and PATCH-Tile on a LLaMA-2-7B-shaped model with random weights (``--model llama7b``: hidden 4096, MLP
  11008, 32 heads, vocab 32000, ``--layers`` blocks, 32 by default). One row per mode: the global batch,
  seconds per step and tokens per second (median over the steps after ``--warmup``), peak memory per process
  (CUDA: the most any rank allocated during the measured steps, and the same over the whole run including
  the model, the prior and the sharding; CPU: the peak RSS of each process), and the learning state a
  replicated run would hold per process (weights, fp32 logits, their gradients, AdamW's two moments).
- ``compare``: runs ``tilesparse learn --shard`` through ``torchrun`` twice on the default model, once on one
  process with ``--global-batch`` sequences per step and once on ``--nproc`` processes with an equal share
  each (same seed, same data order), and compares the two final masks: tile kinds, 2:4 patterns, sparsity
  and perplexity, each also against the one-shot prior the runs start from. The noise of the relaxations is
  drawn per process, so the two runs are different samples of the same learning problem: the comparison
  measures how much of the mask that changes, not a rounding error.

On GPUs::

    torchrun --nproc_per_node 8 benchmarks/learn_scaling.py throughput --device cuda --dtype bfloat16 \\
        --model llama7b --seqlen 4096 --batch 1 --out benchmarks/results/learn_scaling_7b_8xh100.md
    python benchmarks/learn_scaling.py compare --device cuda --dtype bfloat16 --nproc 2 --steps 200 \\
        --seqlen 512 --global-batch 16 --out benchmarks/results/learn_scaling_masks_1v2.md

On the CPU (gloo), at a tiny scale::

    PYTHONPATH=src torchrun --nproc_per_node 2 benchmarks/learn_scaling.py throughput --model tiny --steps 3
    PYTHONPATH=src python benchmarks/learn_scaling.py compare --steps 4 --seqlen 64 --global-batch 4
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _table import emit  # noqa: E402

LLAMA7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
               vocab_size=32000, max_position_embeddings=4096)
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
            max_position_embeddings=1024)
GIB = 2 ** 30


# -- throughput ----------------------------------------------------------------------------
def build_model(args, device):
    """``(model, description)``: a LLaMA-shaped model with random weights, or a model loaded by tilesparse."""
    import torch
    import transformers as tf

    from tilesparse.models import load_model, resolve_dtype

    dtype = resolve_dtype(args.dtype)
    if args.model in ("llama7b", "tiny"):
        shape = LLAMA7B if args.model == "llama7b" else TINY
        layers = args.layers or (32 if args.model == "llama7b" else 2)
        cfg = tf.LlamaConfig(num_hidden_layers=layers, **shape)
        torch.manual_seed(0)
        with torch.device(device):
            model = tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        name = ("LLaMA-2-7B-shaped" if args.model == "llama7b" else "tiny LLaMA") + \
            f" ({layers} blocks, hidden {shape['hidden_size']}, MLP {shape['intermediate_size']}, random weights)"
        return model.eval(), name
    loaded = load_model(None if args.model == "default" else args.model, dtype=dtype, device=str(device))
    return loaded.model, loaded.name


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def throughput(args) -> int:
    import torch
    import torch.distributed as dist

    from tilesparse.learning import init_distributed_from_env, learn_masks, make_config
    from tilesparse.learning.sharded import learning_bytes

    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world = init_distributed_from_env(args.device)
    device = torch.device(args.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    cuda = device.type == "cuda"
    model, name = build_model(args, device)
    vocab = model.config.vocab_size
    global_batch = args.batch * args.grad_accum * world
    n_tokens = args.seqlen * max(64, args.steps * global_batch + 1)
    ids = torch.randint(0, vocab, (n_tokens,), generator=torch.Generator().manual_seed(0))
    shard = {"on": True, "off": False, "auto": None}[args.shard]
    rows = []
    for mode in args.modes.split(","):
        state = learning_bytes(model, mode, (args.tile, args.tile))
        cfg = make_config(mode=mode, sparsity=args.sparsity, steps=args.steps, seqlen=args.seqlen, batch=args.batch,
                          grad_accum=args.grad_accum, tile=(args.tile, args.tile), prior=args.prior, loss=args.loss,
                          grad_checkpointing=not args.no_grad_checkpointing, shard=shard, checkpoint_every=0,
                          dtype=args.dtype)
        stamps: list[float] = []
        step_peak = [0]

        def on_step(step, _metrics):
            if cuda:
                torch.cuda.synchronize(device)
            stamps.append(time.perf_counter())
            if step == args.warmup and cuda:  # measured steps: from here on
                torch.cuda.reset_peak_memory_stats(device)
            if step == args.steps and cuda:
                step_peak[0] = torch.cuda.max_memory_allocated(device)

        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        res = learn_masks(model, cfg, ids, progress=rank == 0 and not args.no_progress, callback=on_step,
                          model_name=name)
        run_peak = torch.cuda.max_memory_allocated(device) if cuda else 0
        steps = [b - a for a, b in zip(stamps, stamps[1:])][max(args.warmup - 1, 0):]
        mine = {"rank": rank, "step_s": statistics.median(steps) if steps else float("nan"),
                "peak_steps_gib": step_peak[0] / GIB if cuda else _peak_rss_gib(),
                "peak_run_gib": run_peak / GIB if cuda else _peak_rss_gib()}
        everyone = [mine]
        if world > 1:
            everyone = [None] * world
            dist.all_gather_object(everyone, mine)
        step_s = max(r["step_s"] for r in everyone)
        tokens = global_batch * args.seqlen
        rows.append({
            "row": f"{res.config.mode}", "model": name, "processes": world, "sharded": res.sharded,
            "global batch": f"{args.batch} x {args.grad_accum} x {world} x {args.seqlen}",
            "tokens/step": tokens, "s/step": round(step_s, 4), "tokens/s": round(tokens / step_s, 1),
            "tokens/s per process": round(tokens / step_s / world, 1),
            "peak GiB per process (steps)": round(max(r["peak_steps_gib"] for r in everyone), 2),
            "peak GiB per process (run)": round(max(r["peak_run_gib"] for r in everyone), 2),
            "replicated state GiB": f"{state['total'] / GIB:.3g}",
            "state GiB per process": f"{state['total'] / GIB / (world if res.sharded else 1):.3g}",
            "per rank": everyone, "sparsity": round(res.maskset.sparsity(), 4),
        })
        del res
    if rank == 0:
        cols = ["processes", "sharded", "global batch", "tokens/step", "s/step", "tokens/s", "tokens/s per process",
                "peak GiB per process (steps)", "peak GiB per process (run)", "replicated state GiB",
                "state GiB per process", "sparsity"]
        memory = ("CUDA max allocated, most of any rank" if cuda else "peak RSS of the process, most of any rank")
        head = [f"# Mask learning on {world} process(es) ({device.type}, {args.dtype})", "",
                f"Model: {name}; tile {args.tile}; loss {args.loss}; prior {args.prior}; gradient checkpointing "
                f"{'off' if args.no_grad_checkpointing else 'on'}; sharding {args.shard}; {args.steps} steps, median "
                f"of the steps after {args.warmup}; memory: {memory}; machine: "
                f"{platform.processor() or platform.machine()}, "
                + (torch.cuda.get_device_name(device) if cuda else f"{os.cpu_count()} CPU threads"),
                "", "| row | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        head += [f"| {r['row']} | " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
        head += ["", "Command: `torchrun --nproc_per_node " + str(world) + " benchmarks/learn_scaling.py "
                 + " ".join(sys.argv[1:]) + "`", ""]
        emit("\n".join(head), args.out)
        if args.out:
            Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))
    if world > 1:
        dist.destroy_process_group()
    return 0


# -- 1 vs N processes ------------------------------------------------------------------------
def compare_masks(a, b) -> dict:
    """Agreement of two mask sets of the same model: tile kinds over hybrid layers, 2:4 patterns (pattern ids)
    over every 2:4-capable layer, and the least-agreeing layer of each."""
    import torch

    tiles = tiles_same = groups = groups_same = 0
    worst_tiles, worst_groups = (2.0, None), (2.0, None)
    for la in a:
        lb = b.layers[la.name]
        if la.pattern != lb.pattern:
            raise ValueError(f"{la.name}: pattern {la.pattern} vs {lb.pattern}")
        if la.pattern == "hybrid":
            ka, kb = la.tile_kinds(), lb.tile_kinds()
            same = int((ka == kb).sum())
            tiles, tiles_same = tiles + ka.numel(), tiles_same + same
            worst_tiles = min(worst_tiles, (same / ka.numel(), la.name), key=lambda x: x[0])
        if la.ids is not None and lb.ids is not None:
            same = int(torch.eq(la.ids, lb.ids).sum())
            groups, groups_same = groups + la.ids.numel(), groups_same + same
            worst_groups = min(worst_groups, (same / la.ids.numel(), la.name), key=lambda x: x[0])
    return {"tiles": tiles, "tile_agreement": tiles_same / tiles if tiles else None,
            "least_agreeing_tiles": worst_tiles, "groups": groups,
            "pattern_agreement": groups_same / groups if groups else None, "least_agreeing_patterns": worst_groups}


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.2f} %"


def compare(args) -> int:
    from tilesparse.io import load_mask_artifact

    if args.global_batch % args.nproc:
        raise SystemExit(f"--global-batch {args.global_batch} is not a multiple of --nproc {args.nproc}")
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="learn_scaling_"))
    runs = {}
    for n in (1, args.nproc):
        out = work / f"procs{n}"
        if out.exists():
            shutil.rmtree(out)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               "-m", "tilesparse", "learn", "--mode", args.mode, "--sparsity", str(args.sparsity),
               "--steps", str(args.steps), "--seqlen", str(args.seqlen), "--batch", str(args.global_batch // n),
               "--seed", str(args.seed), "--tile", str(args.tile), "--prior", args.prior, "--shard",
               "--device", args.device, "--dtype", args.dtype, "--out", str(out), "--json", "--no-progress"]
        if args.model:
            cmd += ["--model", args.model]
        if args.text:
            cmd += ["--text", args.text]
        if args.loss:
            cmd += ["--loss", args.loss]
        for t in args.eval_text or []:
            cmd += ["--eval-text", t]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        if proc.returncode:
            print(proc.stdout[-3000:], proc.stderr[-5000:], sep="\n", file=sys.stderr)
            raise SystemExit(f"tilesparse learn on {n} process(es) failed ({proc.returncode})")
        runs[n] = {"summary": json.loads((out / "summary.json").read_text()), "masks": load_mask_artifact(out),
                   "prior": load_mask_artifact(out / "prior") if (out / "prior").is_dir() else None,
                   "wall_s": time.perf_counter() - t0}
    one, many = runs[1], runs[args.nproc]
    agree = compare_masks(one["masks"], many["masks"])
    rows = [("1 vs %d processes" % args.nproc, agree)]
    for n in (1, args.nproc):
        if runs[n]["prior"] is not None:
            rows.append((f"{n} process(es) vs the prior", compare_masks(runs[n]["prior"], runs[n]["masks"])))
    s1 = one["summary"]
    lines = [f"# Final masks learned on 1 vs {args.nproc} processes ({args.device}, {args.dtype})", "",
             f"Model: {s1['model']}; {args.mode}, target sparsity {args.sparsity}; {args.steps} steps of "
             f"{args.global_batch} x {args.seqlen} tokens (1 process: batch {args.global_batch}; {args.nproc} "
             f"processes: batch {args.global_batch // args.nproc} each, sharded); seed {args.seed}; "
             f"prior {args.prior}; tile {args.tile}.", "",
             "| comparison | tiles | same tile kind | least agreeing layer (tiles) | 2:4 groups | same pattern | "
             "least agreeing layer (patterns) |", "|---|---|---|---|---|---|---|"]
    for label, c in rows:
        wt, wg = c["least_agreeing_tiles"], c["least_agreeing_patterns"]
        lines.append(f"| {label} | {c['tiles']} | {_pct(c['tile_agreement'])} | "
                     f"{'' if wt[1] is None else f'{wt[1]} ({_pct(wt[0])})'} | {c['groups']} | "
                     f"{_pct(c['pattern_agreement'])} | {'' if wg[1] is None else f'{wg[1]} ({_pct(wg[0])})'} |")
    lines += ["", "| run | measured sparsity | final loss | seconds | perplexity |", "|---|---|---|---|---|"]
    for n in (1, args.nproc):
        s = runs[n]["summary"]
        ppl = ", ".join(f"{t}: {v:.3f}" for t, v in (s.get("perplexity") or {}).items())
        lines.append(f"| {n} process(es) | {s['measured_sparsity']:.4f} | {(s.get('final') or {}).get('loss')} | "
                     f"{s['seconds']} | {ppl} |")
    lines += ["", "Command: `python benchmarks/learn_scaling.py " + " ".join(sys.argv[1:]) + "`", ""]
    emit("\n".join(lines), args.out)
    if args.out:
        Path(args.out).with_suffix(".json").write_text(json.dumps(
            {"comparisons": {label: c for label, c in rows},
             "summaries": {str(n): runs[n]["summary"] for n in runs}}, indent=1, default=str))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("throughput", help="tokens/s and memory per process (run under torchrun)")
    t.add_argument("--model", default="llama7b", help="llama7b, tiny, default, or a model path")
    t.add_argument("--layers", type=int, default=0, help="decoder blocks of llama7b/tiny (0: 32 / 2)")
    t.add_argument("--modes", default="joint,tile")
    t.add_argument("--shard", choices=["on", "off", "auto"], default="on")
    t.add_argument("--batch", type=int, default=1, help="sequences per micro-batch and process")
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--seqlen", type=int, default=0, help="tokens per sequence (0: 4096 for llama7b, else 64)")
    t.add_argument("--steps", type=int, default=6)
    t.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    t.add_argument("--no-grad-checkpointing", action="store_true")
    t.add_argument("--threads", type=int, default=0, help="torch CPU threads per process (0: torch's choice)")
    t.add_argument("--no-progress", action="store_true")
    c = sub.add_parser("compare", help="final masks of 1 vs --nproc processes (launches torchrun twice)")
    c.add_argument("--model", default=None, help="model for tilesparse learn (default: the embedded default model)")
    c.add_argument("--text", default=None, help="training text (default: tilesparse learn's)")
    c.add_argument("--mode", default="joint")
    c.add_argument("--nproc", type=int, default=2)
    c.add_argument("--global-batch", type=int, default=4, help="sequences per optimiser step, all processes")
    c.add_argument("--seqlen", type=int, default=256)
    c.add_argument("--steps", type=int, default=32)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--loss", default=None)
    c.add_argument("--eval-text", action="append", default=None, help="perplexity text (repeatable)")
    c.add_argument("--workdir", default=None, help="keep the two runs here (default: a temporary folder)")
    for q in (t, c):
        q.add_argument("--device", default="cpu")
        q.add_argument("--dtype", default="float32")
        q.add_argument("--sparsity", type=float, default=0.45)
        q.add_argument("--tile", type=int, default=128)
        q.add_argument("--out", default=None, help="markdown report (and .json beside it)")
    t.add_argument("--loss", default="kd")
    t.add_argument("--prior", default="magnitude", help="one-shot prior (random weights: magnitude)")
    c.add_argument("--prior", default="sparsegpt")
    args = p.parse_args(argv)
    if args.command == "throughput":
        if not args.seqlen:
            args.seqlen = 4096 if args.model == "llama7b" else 64
        if not 1 <= args.warmup < args.steps:
            p.error("--warmup must be at least 1 and smaller than --steps")
        return throughput(args)
    return compare(args)


if __name__ == "__main__":
    raise SystemExit(main())
