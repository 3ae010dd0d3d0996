"""Time from loading a model to its first generated token: dense HF folder against a packed hybrid export.

    PYTHONPATH=src python3 benchmarks/load_first_token.py --dir /tmp/lft --out load_first_token.md

Builds a LLaMA-2-7B-shaped model with random bf16 weights on the GPU, saves it as an HF folder (safetensors)
and, with every decoder linear made hybrid at ``--sparsity`` (random tile map, magnitude 2:4 inside 2:4
tiles), as a packed export (``model.packed.safetensors`` + config + tokenizer, as ``tilesparse export``
writes). Then each is loaded in a new Python process with ``tilesparse.load_model(folder, device="cuda")``
and generates one token for a prompt of ``--prompt`` tokens (no compile): the packed export twice, first
with an empty kernel tuning cache (every layer shape is autotuned) and then with the cache that run filled.
The time is wall clock from before ``import torch`` to the first token on the host; files are read from the
page cache after the first load of each (every model is loaded once untimed first).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

from _table import emit

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
from tilesparse import load_model
path, prompt = sys.argv[1], int(sys.argv[2])
loaded = load_model(path, dtype="bfloat16", device="cuda")
t1 = time.perf_counter()
ids = torch.randint(0, 32000, (1, prompt), generator=torch.Generator().manual_seed(0)).cuda()
with torch.no_grad():
    out = loaded.model.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=0)
tok = int(out[0, -1])
t2 = time.perf_counter()
print(json.dumps({"load_s": t1 - t0, "first_token_s": t2 - t1, "total_s": t2 - t0, "token": tok}))
"""


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(32000)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="t0", eos_token="t1", bos_token="t2",
                                   pad_token="t0")


def build(out_dir: str, layers: int, sparsity: float) -> dict:
    import torch

    from e2e_decode import build_model, hybridize

    from pathlib import Path

    from tilesparse.io.export import save_packed_folder
    from tilesparse.io.packed import non_persistent_buffers

    dense_dir, packed_dir = os.path.join(out_dir, "dense"), os.path.join(out_dir, "packed")
    model = build_model(layers, seed=0)
    tok = tokenizer()
    model.save_pretrained(dense_dir)
    tok.save_pretrained(dense_dir)
    buffers = {k: t.detach().clone() for k, t in non_persistent_buffers(model).items()}
    achieved = hybridize(model, sparsity)
    save_packed_folder(model, Path(packed_dir), tok, "random LLaMA-2-7B config", buffers)
    del model
    torch.cuda.empty_cache()
    size = lambda d: sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))  # noqa: E731
    return {"dense_dir": dense_dir, "packed_dir": packed_dir, "achieved": achieved,
            "dense_bytes": size(dense_dir), "packed_bytes": size(packed_dir)}


def child(path: str, prompt: int, env: dict) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, path, str(prompt)], env=env, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"loading {path} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/load_first_token", help="where the two model folders are written")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--sparsity", type=float, default=0.45)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import torch

    name = torch.cuda.get_device_name(0)
    t0 = time.time()
    info = build(args.dir, args.layers, args.sparsity)
    print(f"built and saved in {time.time() - t0:.0f}s: dense {info['dense_bytes'] / 1e9:.2f} GB, packed "
          f"{info['packed_bytes'] / 1e9:.2f} GB", flush=True)
    tune_dir = os.path.join(args.dir, "tscache")
    env = {**os.environ, "TILESPARSE_CACHE": tune_dir}
    child(info["dense_dir"], args.prompt, env)  # untimed: the files into the page cache
    rows = [("dense HF folder", child(info["dense_dir"], args.prompt, env))]
    import shutil
    shutil.rmtree(os.path.join(tune_dir, "autotune"), ignore_errors=True)
    rows.append(("packed export, empty tuning cache", child(info["packed_dir"], args.prompt, env)))
    rows.append(("packed export, warm tuning cache", child(info["packed_dir"], args.prompt, env)))
    dense = rows[0][1]["total_s"]
    lines = [f"# Load to first token ({name})", "",
             f"Measured {datetime.date.today().isoformat()} on {name}, torch {torch.__version__}. LLaMA-2-7B config "
             f"({args.layers} layers), random bf16 weights; packed: {args.sparsity:.0%} target "
             f"({info['achieved']:.2%} achieved) sparsity. A new process per row: `import torch`, "
             f"`tilesparse.load_model(folder, device='cuda')`, `generate(max_new_tokens=1)` on a {args.prompt}-token "
             "prompt, no compile; files in the page cache. Ratio: against the dense row, this run.",
             f"Command: `PYTHONPATH=src python3 benchmarks/load_first_token.py {' '.join(sys.argv[1:])}`", "",
             "| model | files GB | import + load s | first token s | total s | vs dense |", "|---|---|---|---|---|---|"]
    for label, r in rows:
        gb = info["dense_bytes" if label.startswith("dense") else "packed_bytes"] / 1e9
        lines.append(f"| {label} | {gb:.2f} | {r['load_s']:.2f} | {r['first_token_s']:.2f} | {r['total_s']:.2f} | "
                     f"{r['total_s'] / dense:.2f}x |")
    text = "\n".join(lines) + "\n"
    emit(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
