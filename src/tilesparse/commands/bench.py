"""``tilesparse bench``: time to first token and decode speed of a dense, masked or packed model."""

from __future__ import annotations

import argparse
import json
import statistics

from ..errors import TilesparseError
from .common import quiet_libraries
from .generate import add_masked_model_args, add_speed_args, prepare_model, speed_switches


def register(sub) -> None:
    p = sub.add_parser("bench", help="time to first token and decode tokens/s, as a deployment would run it",
                       description="Generates --new-tokens tokens for --batch random prompts of --prompt-tokens "
                                   "tokens (no early stop), after --warmup untimed runs (compiling and tuning "
                                   "happen there), and reports the median of --repeats timed runs: time to first "
                                   "token (prefill included) and decode tokens/s. On a GPU the static KV cache, "
                                   "torch.compile and CUDA graphs are on unless turned off. --model may be a packed "
                                   "export; --mask with --hybrid packs a mask artifact on the fly.")
    add_masked_model_args(p)
    p.add_argument("--batch", type=int, default=1, help="sequences generated at once (default 1)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length in tokens (default 128)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per sequence (default 128)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts (default 0)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_speed_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..generation import resolve_switches, timed_generate

    for name in ("batch", "prompt_tokens", "new_tokens", "repeats"):
        if getattr(args, name) <= 0:
            raise TilesparseError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.warmup < 0:
        raise TilesparseError(f"--warmup must be >= 0, got {args.warmup}")
    resolve_switches(args.device.startswith("cuda"), **speed_switches(args))  # fails before loading
    quiet_libraries()
    loaded, note = prepare_model(args)
    g = torch.Generator().manual_seed(args.seed)
    vocab = min(len(loaded.tokenizer), loaded.model.config.get_text_config().vocab_size)
    ids = torch.randint(0, vocab, (args.batch, args.prompt_tokens), generator=g).to(args.device)
    if loaded.bos_id is not None:
        ids[:, 0] = loaded.bos_id
    pad = loaded.tokenizer.pad_token_id or loaded.tokenizer.eos_token_id
    runs = []
    for i in range(args.warmup + args.repeats):
        _, speed = timed_generate(loaded.model, ids, max_new_tokens=args.new_tokens, pad_token_id=pad,
                                  **speed_switches(args))
        if i >= args.warmup:
            runs.append(speed)
    ttft = statistics.median(r.ttft_s for r in runs)
    rates = [r.decode_tokens_per_s for r in runs if r.decode_tokens_per_s is not None]
    rate = statistics.median(rates) if rates else None
    weights = sum(t.numel() * t.element_size() for n, t in loaded.model.state_dict().items()
                  if "embed" not in n and "lm_head" not in n)
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    result = {"model": loaded.name, "what": note, "device": device, "dtype": args.dtype, "batch": args.batch,
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "repeats": args.repeats,
              "ttft_ms": round(ttft * 1e3, 2),
              "decode_tokens_per_s": None if rate is None else round(rate, 2),
              "decode_tokens_per_s_all": None if rate is None else round(rate * args.batch, 2),
              "decoder_weight_bytes": weights, **{k.replace(" ", "_"): v for k, v in runs[0].settings.items()}}
    if args.json:
        print(json.dumps(result))
    else:
        on = ", ".join(k for k, v in runs[0].settings.items() if v) or "eager"
        dec = "-" if rate is None else f"{rate:.1f} tokens/s per sequence ({rate * args.batch:.1f} in all)"
        print(f"{loaded.name} ({note}) on {device}, {args.dtype}, {on}: batch {args.batch}, prompt "
              f"{args.prompt_tokens}, {args.new_tokens} new tokens, median of {args.repeats}: time to first token "
              f"{ttft * 1e3:.1f} ms, decode {dec}; decoder weights {weights / 2**20:.1f} MiB")
    return 0
