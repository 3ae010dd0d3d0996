"""End-to-end decode benchmark: LLaMA-2-7B-shaped model (random bf16 weights), dense vs hybrid.

    PYTHONPATH=src python3 benchmarks/e2e_decode.py --out e2e.md [--layers 32] [--batch 16]

Batch ``B`` prompts of ``P`` random tokens, greedy generation of ``G`` tokens with a static KV cache;
the prefill runs eagerly, every decode step is one CUDA-graph replay (argmax and the next-token copy
included). Hybrid models swap every decoder linear (q/k/v/o/gate/up/down) for ``HybridLinear`` with a
random tile map at the target sparsity (global tile ranking by random scores via
``select_dense_tiles``) and a magnitude 2:4 mask inside 2:4 tiles.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import statistics
import sys
import time

import torch
from torch import nn

from tilesparse.kernels import cuda_mma, ops
from tilesparse.kernels.linear import HybridLinear
from tilesparse.masks.nm import topk_mask
from tilesparse.masks.tiles import DENSE, SPARSE, TileGrid, select_dense_tiles


def build_model(layers: int, seed: int):
    import transformers as tf

    cfg = tf.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                         max_position_embeddings=4096)
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = tf.LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    for p in model.parameters():  # HF init may leave some tensors at zero: use small random values
        p.requires_grad_(False)
    return model.eval()


def decoder_linears(model) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.model.layers.named_modules() if isinstance(m, nn.Linear)}


def hybridize(model, sparsity: float, tile=(128, 128), seed: int = 0) -> float:
    lin = decoder_linears(model)
    names = list(lin)
    grids = [TileGrid(lin[n].out_features, lin[n].in_features, *tile) for n in names]
    g = torch.Generator().manual_seed(seed)
    scores = [torch.rand(gr.shape, generator=g) for gr in grids]
    res = select_dense_tiles(scores, grids, sparsity)
    for n, gr, dense in zip(names, grids, res.dense):
        m = lin[n]
        kinds = torch.where(dense, DENSE, SPARSE).to(torch.int8)
        m24 = topk_mask(m.weight.detach().abs().float())
        new = HybridLinear.from_kinds(m, kinds, m24, tile)
        parent = model.model.layers.get_submodule(n.rpartition(".")[0])
        setattr(parent, n.rpartition(".")[2], new)
        del m
    gc.collect()
    torch.cuda.empty_cache()
    return res.achieved_sparsity


def linear_bytes(model) -> int:
    tot = 0
    for m in model.model.layers.modules():
        if isinstance(m, HybridLinear):
            tot += m.nbytes()
        elif isinstance(m, nn.Linear):
            tot += sum(p.numel() * p.element_size() for p in m.parameters())
    return tot


def model_bytes(model) -> int:
    return (sum(p.numel() * p.element_size() for p in model.parameters())
            + sum(b.numel() * b.element_size() for b in model.buffers()))


@torch.no_grad()
def generate(model, prompt: torch.Tensor, gen: int, reps: int, graphs: bool = True):
    """Returns (tokens, prefill_s, decode_s): medians over ``reps`` runs; decode steps as CUDA-graph replays, or
    eager calls when ``graphs`` is false (what ``model.generate`` does by default)."""
    from transformers import StaticCache

    B, P = prompt.shape
    cache = StaticCache(config=model.config, max_cache_len=P + gen)
    dev = prompt.device

    def prefill():
        cache.reset()
        out = model(input_ids=prompt, past_key_values=cache, cache_position=torch.arange(P, device=dev),
                    use_cache=True)
        return out.logits[:, -1].argmax(-1)

    nxt = prefill()  # warm-up (also initialises the cache and tunes the prefill shapes)
    ids = torch.zeros(B, 1, dtype=torch.long, device=dev)
    pos = torch.zeros(1, dtype=torch.long, device=dev)
    ids.copy_(nxt[:, None])
    pos.fill_(P)

    def step():
        out = model(input_ids=ids, past_key_values=cache, cache_position=pos, use_cache=True)
        tok = out.logits[:, -1].argmax(-1)
        ids.copy_(tok[:, None])
        pos.add_(1)
        return tok

    # warm-up eagerly (autotunes the decode shapes), then capture one step
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph() if graphs else None
    try:
        if g is not None:
            with torch.cuda.graph(g):
                tok_static = step()
            torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - report and time eagerly instead
        print(f"CUDA graph capture failed ({type(e).__name__}: {str(e)[:200]}); timing eager decode steps")
        g = None

    pre_t, dec_t = [], []
    tokens = None
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        nxt = prefill()
        ids.copy_(nxt[:, None])
        pos.fill_(P)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        toks = [nxt]
        for _ in range(gen - 1):
            if g is not None:
                g.replay()
                toks.append(tok_static.clone())
            else:
                toks.append(step())
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        pre_t.append(t1 - t0)
        dec_t.append(t2 - t1)
        tokens = torch.stack(toks, 1)
    del g
    return tokens, statistics.median(pre_t), statistics.median(dec_t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--sparsities", default="0.25,0.35,0.45")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--pdl", default="off", help="hybrid rows with the mma kernels launched as programmatic "
                    "dependents (on), without (off), or both (on,off); see cuda_mma.pdl_enabled")
    ap.add_argument("--eager", action="store_true", help="decode steps as eager calls instead of CUDA-graph replays")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    props = torch.cuda.get_device_properties(0)
    g = torch.Generator(device="cuda").manual_seed(0)
    prompt = torch.randint(0, 32000, (args.batch, args.prompt), device="cuda", generator=g)
    if cuda_mma.available() and args.batch <= cuda_mma.MAX_TOKENS:  # the decode steps' candidates, NVRTC in parallel
        t0 = time.time()
        n = cuda_mma.precompile(ops.mma_keys(args.batch), os.cpu_count() or 4)
        print(f"precompiled {n} mma kernels in {time.time() - t0:.0f}s", flush=True)
    rows = []
    for s in [0.0] + [float(v) for v in args.sparsities.split(",")]:
        t0 = time.time()
        model = build_model(args.layers, seed=0)
        lb_dense = linear_bytes(model)
        mb_dense = model_bytes(model)
        achieved = 0.0
        if s > 0:
            achieved = hybridize(model, s)
        setup = time.time() - t0
        for pdl in (["-"] if s == 0 else args.pdl.split(",")):
            if pdl != "-":
                os.environ["TILESPARSE_PDL"] = "1" if pdl == "on" else "0"
            torch.cuda.synchronize()
            tokens, pre, dec = generate(model, prompt, args.gen, args.reps, graphs=not args.eager)
            total = pre + dec
            row = dict(s=s, achieved=achieved, pre=pre, dec=dec, total=total, pdl=pdl,
                       tps=args.batch * args.gen / total, dec_tps=args.batch * (args.gen - 1) / dec,
                       lin_bytes=linear_bytes(model), lin_dense=lb_dense, model_bytes=model_bytes(model),
                       model_dense=mb_dense, mem=torch.cuda.memory_allocated(), ws=ops.workspace_bytes(),
                       setup=setup)
            rows.append(row)
            print(f"sparsity {s:.2f} (achieved {achieved:.4f}, PDL {pdl}): prefill {pre * 1e3:.1f} ms, decode "
                  f"{dec * 1e3:.1f} ms, {row['tps']:.0f} tok/s (decode only {row['dec_tps']:.0f}), linear bytes "
                  f"{row['lin_bytes'] / 1e9:.2f} GB ({row['lin_bytes'] / lb_dense:.3f}x), setup {setup:.0f}s", flush=True)
        del model, tokens
        gc.collect()
        torch.cuda.empty_cache()
    d = rows[0]
    lines = [
        f"# End-to-end decode ({props.name})",
        "",
        f"Measured {datetime.date.today().isoformat()} on {props.name}, torch {torch.__version__}, "
        f"triton {__import__('triton').__version__}, transformers {__import__('transformers').__version__}.",
        f"LLaMA-2-7B config ({args.layers} of 32 decoder layers), random bf16 weights, batch {args.batch}, "
        f"{args.prompt} prompt + {args.gen} generated tokens (greedy), static KV cache, decode steps as "
        f"{'eager calls' if args.eager else 'CUDA-graph replays'}, prefill eager; median of {args.reps} runs. PDL: the hybrid rows' mma kernels launched as "
        f"programmatic dependents (on) or as plain launches (off).",
        f"Command: `PYTHONPATH=src python3 benchmarks/e2e_decode.py {' '.join(sys.argv[1:])}`",
        "",
        "| sparsity (achieved) | PDL | prefill ms | decode ms | tokens/s (total) | speedup | decode-only tokens/s | decode speedup |"
        " decoder linear weights GB | vs dense | whole model GB | vs dense |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['s'] * 100:.0f}% ({r['achieved'] * 100:.2f}%) | {r['pdl']} | {r['pre'] * 1e3:.1f} | {r['dec'] * 1e3:.1f} | "
            f"{r['tps']:.0f} | {d['total'] / r['total']:.3f}x | {r['dec_tps']:.0f} | {d['dec'] / r['dec']:.3f}x | "
            f"{r['lin_bytes'] / 1e9:.3f} | {r['lin_bytes'] / r['lin_dense']:.3f}x | {r['model_bytes'] / 1e9:.3f} | "
            f"{r['model_bytes'] / r['model_dense']:.3f}x |")
    lines.append("")
    lines.append(f"Transient kernel workspace (split-K partials, prefill unpack scratch) at the end: "
                 f"{rows[-1]['ws'] / 1e6:.1f} MB (not included above).")
    text = "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
