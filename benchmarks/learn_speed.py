"""Learning-step throughput: PATCH-Tile and PATCH-Joint steps vs a plain dense forward+backward.

Every variant runs in its own subprocess (clean peak-memory numbers: CUDA max allocated, or the CPU
process's peak RSS) on the same model, batch and sequence length:

- ``dense``: forward + backward with every weight trainable (a standard training step, no optimiser);
- ``dense-frozen``: forward + backward with frozen weights (gradients reach only the embeddings);
- ``tile`` / ``joint`` / ``maskllm``: one full mask-learning step as in the trainer (mask built inside
  every layer's forward, CE + density + magnitude terms, backward, AdamW on the logits);
- ``tile-kd`` / ``joint-kd`` / ``maskllm-kd``: the same step with the distillation loss (``loss='kd'``): one
  no-grad forward of the unmasked model first, KL divergence from its logits instead of CE.

Models: ``default`` (SmolLM2-135M) or ``llama7b`` (LLaMA-2-7B shapes: hidden 4096, MLP 11008, 32 heads;
``--layers`` blocks, random weights, vocab ``--vocab``) scaled to fit the device.

    PYTHONPATH=src python3 benchmarks/learn_speed.py --device cpu --out benchmarks/results/learn_speed_cpu.md
    PYTHONPATH=src python3 benchmarks/learn_speed.py --device cuda --dtype bfloat16 --model llama7b \\
        --layers 8 --batch 4 --seqlen 2048 --out benchmarks/results/learn_speed_h100.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

VARIANTS = ("dense", "dense-frozen", "tile", "joint", "maskllm", "tile-kd", "joint-kd", "maskllm-kd")


def build_model(args):
    import torch

    from tilesparse.models import load_model, resolve_dtype

    dtype = resolve_dtype(args.dtype)
    if args.model == "llama7b":
        import transformers as tf

        cfg = tf.LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                             num_hidden_layers=args.layers, num_attention_heads=args.heads,
                             num_key_value_heads=args.heads, vocab_size=args.vocab,
                             max_position_embeddings=max(4096, args.seqlen))
        torch.manual_seed(0)
        with torch.device(args.device):
            model = tf.LlamaForCausalLM(cfg).to(dtype)
        return model.eval(), "LLaMA-2-7B-shaped ({} layers, hidden {}, MLP {}, vocab {})".format(
            args.layers, args.hidden, args.intermediate, args.vocab)
    loaded = load_model(None if args.model == "default" else args.model, dtype=dtype, device=args.device)
    return loaded.model, loaded.name


def run_variant(args) -> dict:
    import torch

    from tilesparse.learning.masked import MaskedModel
    from tilesparse.learning.priors import magnitude_24
    from tilesparse.learning.regularizers import density_penalty, distillation_loss, magnitude_bonus
    from tilesparse.masks.nm import ids_from_mask
    from tilesparse.models import find_prunable_linears

    torch.manual_seed(0)
    torch.set_num_threads(args.threads) if args.threads else None
    model, name = build_model(args)
    dev = torch.device(args.device)
    vocab = model.config.vocab_size
    batch = torch.randint(0, vocab, (args.batch, args.seqlen), device=dev)
    masked = None
    opt = None
    if args.variant.startswith("dense"):
        for p in model.parameters():
            p.requires_grad_(args.variant == "dense")
        model.get_input_embeddings().weight.requires_grad_(True)
    else:
        ids = None
        mode, _, loss_kind = args.variant.partition("-")  # "joint-kd": the joint mode, distillation loss
        if mode == "tile":
            ids = {l.name: ids_from_mask(magnitude_24(l.weight).cpu()) for l in find_prunable_linears(model)}
        masked = MaskedModel(model, mode, tile=(args.tile, args.tile), ids=ids)
        masked.set_values(tile_k=100.0, tile_tau=2.0, pattern_k=100.0, pattern_tau=4.0, record_norms=True)
        opt = torch.optim.AdamW(masked.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
        if args.grad_checkpointing:
            masked.enable_checkpointing()

    def step():
        if masked is None:
            model.zero_grad(set_to_none=True)
            out = model(input_ids=batch, labels=batch, use_cache=False)
            out.loss.backward()
            return
        opt.zero_grad(set_to_none=True)
        masked.state.clear()
        teacher = None
        if loss_kind == "kd":  # as the trainer: one no-grad forward of the unmasked model first
            with torch.no_grad(), masked.unmasked():
                teacher = model(input_ids=batch, use_cache=False).logits[:, :-1]
        out = model(input_ids=batch, labels=batch, use_cache=False)
        loss = out.loss.float()
        if teacher is not None:
            loss = distillation_loss(out.logits[:, :-1], teacher)
        if mode != "maskllm":
            loss = loss + density_penalty(masked.densities("sampled"), 0.55, 7.0)
        loss = loss + magnitude_bonus(masked.masked_norm_sum(), masked.weight_norm_sum, 10.0, 0, 100)
        loss.backward()
        opt.step()

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    med = times[len(times) // 2]
    res = {"variant": args.variant, "model": name, "seconds_median": med, "seconds_min": times[0],
           "tokens_per_s": args.batch * args.seqlen / med}
    if dev.type == "cuda":
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        res["peak_mem_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    wbytes = sum(l.module.weight.numel() * l.module.weight.element_size() for l in find_prunable_linears(model))
    res["prunable_weight_bytes"] = wbytes
    if masked is not None:
        lb = masked.logit_bytes()
        res["logit_bytes"] = lb
        res["tile_logit_fraction_of_weights"] = lb["tile_logits"] / lb["weights"]
        res["all_logit_fraction_of_weights"] = (lb["tile_logits"] + lb["pattern_logits"] + lb["ids"]) / lb["weights"]
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--model", default="default", help="default, llama7b, or a model path")
    p.add_argument("--layers", type=int, default=2, help="llama7b: number of decoder blocks")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--tile", type=int, default=128)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--variants", default="dense,dense-frozen,tile,joint")
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # child mode
    p.add_argument("--out", default=None, help="markdown file for the table")
    args = p.parse_args(argv)
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args)), flush=True)
        return 0
    rows = []
    for v in args.variants.split(","):
        if v not in VARIANTS:
            p.error(f"unknown variant {v}")
        cmd = [sys.executable, __file__, "--variant", v] + [a for a in (argv or sys.argv[1:])]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not line:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"variant {v} failed")
        rows.append(json.loads(line[-1][7:]))
        print(json.dumps(rows[-1]), flush=True)
    base = next((r for r in rows if r["variant"] == "dense"), rows[0])
    lines = [f"# Learning-step throughput ({args.device}, {args.dtype})", "",
             f"Model: {rows[0]['model']}; batch {args.batch} x {args.seqlen} tokens; tile {args.tile}; "
             f"median of {args.repeat} steps after {args.warmup} warm-up; machine: {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} CPU threads" + (", gradient checkpointing" if args.grad_checkpointing else ""), "",
             "| variant | s/step | tokens/s | cost vs dense fwd+bwd | peak memory (GiB) | logits / weights |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        frac = r.get("all_logit_fraction_of_weights")
        tf = r.get("tile_logit_fraction_of_weights")
        fr = "" if frac is None else f"{100 * frac:.3f} % (tile logits {100 * tf:.4f} %)"
        lines.append(f"| {r['variant']} | {r['seconds_median']:.3f} | {r['tokens_per_s']:.0f} | "
                     f"{r['seconds_median'] / base['seconds_median']:.2f}x | {r['peak_mem_gib']:.2f} | {fr} |")
    lines += ["", "Command: `PYTHONPATH=src python3 benchmarks/learn_speed.py " + " ".join(argv or sys.argv[1:]) + "`"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
