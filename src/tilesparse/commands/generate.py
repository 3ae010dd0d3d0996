"""``tilesparse generate``: generate text with a dense or hybrid-sparse model."""

from __future__ import annotations

import argparse

from ..errors import TilesparseError
from .common import add_mask_arg, add_model_args, load_masked_model, quiet_libraries


DEFAULT_PROMPT = "Tell me a short story about a whale."


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text with a dense, masked or packed hybrid model",
                       description="Greedy (or sampled) generation. --model may be a packed export "
                                   "(tilesparse export / a recipe's export folder); with --mask the mask artifact "
                                   "is applied to a dense base model, and with --hybrid its masked linears run "
                                   "through HybridLinear (packed format: GPU kernels on a GPU, the torch "
                                   "reference on a CPU).")
    add_masked_model_args(p)
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"the prompt (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    p.add_argument("--no-chat", action="store_true", help="do not wrap the prompt in the model's chat template")
    add_speed_args(p)
    p.set_defaults(func=run)


def add_speed_args(p: argparse.ArgumentParser) -> None:
    """The deployment switches (each on by default on a GPU, off on a CPU)."""
    g = p.add_argument_group("speed (default: all on with a GPU, off on a CPU)")
    g.add_argument("--static-cache", action=argparse.BooleanOptionalAction, default=None,
                   help="a static KV cache (cache_implementation='static')")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the decoding step (needs the static cache)")
    g.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="CUDA graphs for the compiled step (compile mode reduce-overhead)")


def speed_switches(args: argparse.Namespace) -> dict:
    return {"static_cache": args.static_cache, "compile": args.compile, "cuda_graphs": args.cuda_graphs}


def add_masked_model_args(p: argparse.ArgumentParser) -> None:
    """``--model`` / ``--dtype`` / ``--device``, ``--mask`` and ``--hybrid``: what :func:`prepare_model` reads."""
    add_model_args(p)
    add_mask_arg(p)
    p.add_argument("--hybrid", action="store_true", help="run the masked linears through HybridLinear")


def prepare_model(args: argparse.Namespace):
    """Load the model (``--mask`` applied, ``--hybrid`` packed); returns ``(loaded, note)``."""
    from ..kernels.linear import convert_model

    if args.hybrid and not args.mask:
        raise TilesparseError("--hybrid needs --mask (the tile map to pack)")
    loaded, ms, note = load_masked_model(args)
    if ms is not None and args.hybrid:
        convert_model(loaded.model, ms.to_bool(), tile=next(iter(ms)).tile)
        note += ", HybridLinear"
    return loaded, note


def build_inputs(tokenizer, prompt: str, chat: bool):
    """Token ids of the prompt, through the chat template when the tokenizer has one and ``chat``."""
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        return ids["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


def run(args: argparse.Namespace) -> int:
    import torch

    quiet_libraries()
    if args.max_new_tokens <= 0:
        raise TilesparseError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise TilesparseError(f"--temperature must be >= 0, got {args.temperature}")
    from ..generation import resolve_switches, timed_generate

    resolve_switches(args.device.startswith("cuda"), **speed_switches(args))  # fails before loading
    loaded, note = prepare_model(args)
    torch.manual_seed(args.seed)
    ids = build_inputs(loaded.tokenizer, args.prompt, not args.no_chat).to(args.device)
    tok = loaded.tokenizer
    out, speed = timed_generate(loaded.model, ids, max_new_tokens=args.max_new_tokens, exact=False,
                                pad_token_id=tok.pad_token_id or tok.eos_token_id, do_sample=args.temperature > 0,
                                temperature=args.temperature, **speed_switches(args))
    print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    first = " (this first call includes compiling; tilesparse bench warms up first)" \
        if speed.settings["torch.compile"] else ""
    print(f"[{loaded.name}: {note}, {out.shape[1] - ids.shape[1]} tokens; {speed}{first}]", flush=True)
    return 0
