"""End-to-end decode benchmark: LLaMA-2-7B-shaped model (random bf16 weights), dense vs hybrid, same harness.

    PYTHONPATH=src python3 benchmarks/e2e_decode.py --compile --batches 1,16,64 --prompts 128,2048 --out e2e.md

For every batch ``B`` and prompt length ``P``: ``B`` prompts of ``P`` random tokens, greedy generation of ``G``
tokens with a static KV cache; every decode step is one CUDA-graph replay (argmax and the next-token copy
included), the prefill runs as one call. With ``--compile`` the model's forward is ``torch.compile``d
(``fullgraph=True``, mode ``max-autotune-no-cudagraphs`` unless ``--compile-mode`` says otherwise) for dense and hybrid rows alike, so each ratio is
against compiled dense from the same run; the time to first token is the prefill call (compiled too). Hybrid models swap every decoder linear (q/k/v/o/gate/up/down) for ``HybridLinear`` with a
random tile map at the target sparsity (global tile ranking by random scores via
``select_dense_tiles``) and a magnitude 2:4 mask inside 2:4 tiles; with ``--q4 GROUP`` they are 4-bit
(``HybridLinearQ4``, round to nearest in groups of ``GROUP`` input columns), and a sparsity of 0 is the 4-bit
dense model, so that 4-bit hybrid, 4-bit dense and 16-bit dense come from one run.
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

from _table import emit
from tilesparse.kernels import cuda_mma, ops
from tilesparse.kernels.linear import HybridLinear
from tilesparse.kernels.linear_q4 import HybridLinearQ4
from tilesparse.masks.nm import topk_mask
from tilesparse.masks.tiles import DENSE, SPARSE, TileGrid, hybrid_mask, select_dense_tiles
from tilesparse.quant import quantize_rtn


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


def hybridize(model, sparsity: float, tile=(128, 128), seed: int = 0, q4_group: int = 0,
              tile_map: str = "free") -> float:
    """Swap every decoder linear for a hybrid layer at ``sparsity`` (16-bit, or 4-bit with groups of ``q4_group``
    input columns, round to nearest, when it is not 0), its dense tiles chosen freely or as whole tile-columns
    (``tile_map``); returns the achieved sparsity."""
    lin = decoder_linears(model)
    names = list(lin)
    grids = [TileGrid(lin[n].out_features, lin[n].in_features, *tile) for n in names]
    g = torch.Generator().manual_seed(seed)
    scores = [torch.rand(gr.shape, generator=g) for gr in grids]
    res = select_dense_tiles(scores, grids, sparsity, tile_map=tile_map) if sparsity > 0 else None
    for i, (n, gr) in enumerate(zip(names, grids)):
        m = lin[n]
        dense = res.dense[i] if res is not None else torch.ones(gr.shape, dtype=torch.bool)  # (4-bit dense)
        kinds = torch.where(dense, DENSE, SPARSE).to(torch.int8)
        m24 = topk_mask(m.weight.detach().abs().float())
        if q4_group:
            keep = hybrid_mask(kinds.to(m24.device), m24, gr)
            q = quantize_rtn(m.weight.detach().float(), keep, group_size=q4_group)
            new = HybridLinearQ4.from_linear(m, q.quantized, kinds, m24, tile)
        else:
            new = HybridLinear.from_kinds(m, kinds, m24, tile)
        parent = model.model.layers.get_submodule(n.rpartition(".")[0])
        setattr(parent, n.rpartition(".")[2], new)
        del m
    gc.collect()
    torch.cuda.empty_cache()
    return res.achieved_sparsity if res is not None else 0.0


def linear_bytes(model) -> int:
    tot = 0
    for m in model.model.layers.modules():
        if isinstance(m, (HybridLinear, HybridLinearQ4)):
            tot += m.nbytes()
        elif isinstance(m, nn.Linear):
            tot += sum(p.numel() * p.element_size() for p in m.parameters())
    return tot


def init_cache(cache, model, batch: int) -> None:
    """Allocate the static cache's tensors now rather than at its first update, so a compiled forward sees the
    cache it will always see and compiles once instead of again at the second call."""
    cfg = model.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if hasattr(cache, "early_initialization"):
        cache.early_initialization(batch, heads, head_dim, model.dtype, model.device)


@torch.no_grad()
def generate(model, prompt: torch.Tensor, gen: int, reps: int, graphs: bool = True, trace=None,
             profile: bool = False):
    """Returns (tokens, prefill_s, decode_s): medians over ``reps`` runs; decode steps as CUDA-graph replays, or
    eager calls when ``graphs`` is false (what ``model.generate`` does by default). ``profile``: then one more
    prefill under ``torch.profiler``, its busiest operators printed (by GPU time, then by host time)."""
    from transformers import StaticCache

    B, P = prompt.shape
    cache = StaticCache(config=model.config, max_cache_len=P + gen)
    dev = prompt.device
    init_cache(cache, model, B)

    def prefill():
        cache.reset()
        out = model(input_ids=prompt, past_key_values=cache, cache_position=torch.arange(P, device=dev),
                    use_cache=True)
        return out.logits[:, -1].argmax(-1)

    trace = trace or (lambda what: None)
    nxt = prefill()  # warm-up (also initialises the cache and tunes the prefill shapes)
    torch.cuda.synchronize()
    trace("first prefill")
    nxt = prefill()  # a compiled forward that still recompiles (older transformers: a lazily initialised cache)
    torch.cuda.synchronize()
    trace("second prefill")
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
    trace("decode warm-up")
    g = torch.cuda.CUDAGraph() if graphs else None
    try:
        if g is not None:
            with torch.cuda.graph(g):
                tok_static = step()
            torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - report and time eagerly instead
        print(f"CUDA graph capture failed ({type(e).__name__}: {str(e)[:200]}); timing eager decode steps")
        g = None
    trace("capture")

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
    if profile:
        profile_prefill(prefill)
    return tokens, statistics.median(pre_t), statistics.median(dec_t)


def profile_prefill(prefill, rows: int = 12) -> None:
    """One prefill under ``torch.profiler``: wall time, the GPU's busy time, and the operators that take the most
    GPU time and the most host time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        prefill()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    avg = prof.key_averages()
    gpu = sum(e.self_device_time_total for e in avg if e.device_type == DeviceType.CUDA) / 1e3
    print(f"  profiled prefill: wall {wall * 1e3:.1f} ms (with the profiler), GPU kernels {gpu:.1f} ms", flush=True)
    for key in ("self_cuda_time_total", "self_cpu_time_total"):
        print(avg.table(sort_by=key, row_limit=rows, max_name_column_width=60), flush=True)


def env_prefix() -> str:
    """The library settings this run changed from their defaults, as ``TILESPARSE_X=value `` (for the command
    line in the table's header)."""
    from tilesparse.settings import Settings, env_name, settings

    now = settings()
    out = []
    for field, info in Settings.model_fields.items():
        value = getattr(now, field)
        if field != "cache" and value != info.default:
            out.append(f"{env_name(field)}={int(value) if isinstance(value, bool) else value} ")
    return "".join(out)


_SPENT: dict[str, list] = {}


def _time_calls(module, names) -> None:
    """Count the calls of ``module.<name>`` and the seconds they take (``--trace``: where a warm-up goes)."""
    for name in names:
        fn = getattr(module, name)
        _SPENT[name] = [0, 0.0]

        def timed(*a, _fn=fn, _name=name, **k):
            t0 = time.time()
            try:
                return _fn(*a, **k)
            finally:
                _SPENT[_name][0] += 1
                _SPENT[_name][1] += time.time() - t0
        setattr(module, name, timed)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batches", "--batch", default="16", help="comma-separated batch sizes")
    ap.add_argument("--prompts", "--prompt", default="128", help="comma-separated prompt lengths")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile every model's forward (fullgraph, --compile-mode)")
    ap.add_argument("--compile-mode", default="max-autotune-no-cudagraphs",
                    help="torch.compile mode (default max-autotune-no-cudagraphs: the CUDA graphs are the harness's)")
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--sparsities", default="0.25,0.35,0.45")
    ap.add_argument("--tile-map", default="free", choices=("free", "columns"),
                    help="dense tiles anywhere, or whole tile-columns (the TileLang route's layers)")
    ap.add_argument("--q4", type=int, default=0, metavar="GROUP",
                    help="hybrid rows with 4-bit weights in groups of GROUP input columns (round to nearest); "
                         "a sparsity of 0 in --sparsities is then the 4-bit dense row")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--eager", action="store_true", help="decode steps as eager calls instead of CUDA-graph replays")
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", action="store_true",
                    help="after each row's timing, profile one prefill and print its busiest operators")
    ap.add_argument("--trace", action="store_true",
                    help="print the time of each warm-up phase, with the tuning and launch preparation in it")
    args = ap.parse_args()
    props = torch.cuda.get_device_properties(0)
    batches = [int(v) for v in args.batches.split(",")]
    prompts = [int(v) for v in args.prompts.split(",")]
    if args.trace:
        _time_calls(ops, ("autotune", "autotune_eager", "_prepared_runner"))
    if args.compile:
        from torch import _dynamo

        _dynamo.config.cache_size_limit = 64  # one graph per (batch, prompt) prefill and per batch decode
    if cuda_mma.available() and min(batches) <= cuda_mma.MAX_TOKENS:  # decode candidates, NVRTC in parallel
        t0 = time.time()
        n = sum(cuda_mma.precompile(ops.mma_keys(b), os.cpu_count() or 4) for b in batches
                if b <= cuda_mma.MAX_TOKENS)
        print(f"precompiled {n} mma kernels in {time.time() - t0:.0f}s", flush=True)
    kv_budget = 0.45 * props.total_memory
    rows = []
    for i, s in enumerate([0.0] + [float(v) for v in args.sparsities.split(",")]):
        t0 = time.time()
        model = build_model(args.layers, seed=0)
        lb_dense = linear_bytes(model)
        q4 = args.q4 if i > 0 else 0  # (the first row: the 16-bit dense model)
        achieved = hybridize(model, s, q4_group=q4, tile_map=args.tile_map) if s > 0 or q4 else 0.0
        if args.compile:
            model.forward = torch.compile(model.forward, mode=args.compile_mode, fullgraph=True, dynamic=False)
        setup = time.time() - t0
        for B in batches:
            for P in prompts:
                kv = 2 * args.layers * B * (P + args.gen) * model.config.hidden_size * 2
                if kv > kv_budget:
                    print(f"skipped batch {B}, prompt {P}: a {kv / 2**30:.0f} GiB KV cache does not fit", flush=True)
                    continue
                g = torch.Generator(device="cuda").manual_seed(0)
                prompt = torch.randint(0, 32000, (B, P), device="cuda", generator=g)
                torch.cuda.synchronize()
                t_phase = [time.time()]

                def trace(what):
                    if args.trace:
                        spent = ", ".join(f"{n} {v[0]} calls {v[1]:.1f}s" for n, v in _SPENT.items() if v[0])
                        print(f"  {what}: {time.time() - t_phase[0]:.1f}s{' (' + spent + ')' if spent else ''}",
                              flush=True)
                        for v in _SPENT.values():
                            v[:] = [0, 0.0]
                    t_phase[0] = time.time()

                tokens, pre, dec = generate(model, prompt, args.gen, args.reps, graphs=not args.eager, trace=trace,
                                            profile=args.profile)
                row = dict(s=s, achieved=achieved, B=B, P=P, pre=pre, dec=dec, q4=q4,
                           dec_tps=B * (args.gen - 1) / dec, lin_bytes=linear_bytes(model), lin_dense=lb_dense,
                           ws=ops.workspace_bytes(), setup=setup)
                rows.append(row)
                kind = f"4-bit (groups of {q4}) " if q4 else ""
                print(f"{kind}sparsity {s:.2f} (achieved {achieved:.4f}), batch {B}, prompt {P}: first token "
                      f"{pre * 1e3:.1f} ms, decode {dec * 1e3:.1f} ms ({row['dec_tps']:.0f} tok/s), linear bytes "
                      f"{row['lin_bytes'] / lb_dense:.3f}x, setup {setup:.0f}s", flush=True)
                del tokens
        del model
        gc.collect()
        torch.cuda.empty_cache()
        if args.compile:
            if args.trace:
                print(_dynamo.utils.compile_times(repr="str", aggregate=True), flush=True)
            _dynamo.reset()
    dense = {(r["B"], r["P"]): r for r in rows if r["s"] == 0 and not r["q4"]}
    how = (f"torch.compile (fullgraph, {args.compile_mode}) for dense and hybrid alike"
           if args.compile else "not compiled (eager modules)")
    lines = [
        f"# End-to-end decode ({props.name})",
        "",
        f"Measured {datetime.date.today().isoformat()} on {props.name}, torch {torch.__version__}, "
        f"triton {__import__('triton').__version__}, transformers {__import__('transformers').__version__}.",
        f"LLaMA-2-7B config ({args.layers} of 32 decoder layers), random bf16 weights, greedy generation of "
        f"{args.gen} tokens after the prompt, static KV cache, {how}; decode steps as "
        f"{'eager calls' if args.eager else 'CUDA-graph replays'}; median of {args.reps} runs. First token: the "
        f"prefill call and its argmax. Ratios: against dense with the same batch, prompt and harness, this run.",
        f"Command: `{env_prefix()}PYTHONPATH=src python3 benchmarks/e2e_decode.py {' '.join(sys.argv[1:])}`",
        "",
        "| batch | prompt | weights | sparsity (achieved) | first token ms | vs dense | decode tokens/s | vs dense |"
        " decoder linear weights GB | vs dense |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d = dense.get((r["B"], r["P"]))
        ttft = f"{d['pre'] / r['pre']:.3f}x" if d else "-"
        dec = f"{r['dec_tps'] / d['dec_tps']:.3f}x" if d else "-"
        weights = f"4-bit, groups of {r['q4']}" if r["q4"] else "16-bit"
        lines.append(
            f"| {r['B']} | {r['P']} | {weights} | "
            f"{r['s'] * 100:.0f}% ({r['achieved'] * 100:.2f}%) | {r['pre'] * 1e3:.1f} | {ttft} | "
            f"{r['dec_tps']:.0f} | {dec} | {r['lin_bytes'] / 1e9:.3f} | {r['lin_bytes'] / r['lin_dense']:.3f}x |")
    lines.append("")
    if rows:
        lines.append(f"Transient kernel workspace (split-K partials, prefill unpack scratch) at the end: "
                     f"{rows[-1]['ws'] / 1e6:.1f} MB (not included above).")
    text = "\n".join(lines) + "\n"
    emit(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
