"""Accuracy table: dense, one-shot 2:4, one-shot hybrid, MaskLLM-mode, PATCH-Tile and PATCH-Joint.

Perplexity on Pride and Prejudice and Persuasion (pinned protocol: first ``--eval-windows`` x 512
tokens), measured sparsity over the prunable linears, learning steps and tokens, wall time.

One calibration pass of the prior pruner (``--prior``, SparseGPT by default, masks only) produces the
2:4 mask and the unstructured masks at every target; they are the one-shot rows *and* the priors of all
learned rows (every learned method gets the same prior and the same token budget). One-shot hybrid =
dense tiles chosen globally from the tile density of the unstructured mask at the target (exact
budget), the prior's 2:4 mask in the other tiles.

    PYTHONPATH=src python3 benchmarks/accuracy.py --steps 100 --out benchmarks/results/accuracy_cpu.md
    # GPU, longer budget (bf16):
    PYTHONPATH=src python3 benchmarks/accuracy.py --device cuda --dtype bfloat16 --steps 2000 \\
        --seqlen 1024 --batch 8 --grad-accum 4 --out benchmarks/results/accuracy_cuda.md

Rows are written to a JSON file (``--rows-json``, default in the tilesparse cache) as they finish, and
an existing JSON resumes the table (finished rows are skipped); prior masks are cached too, so a long
run can be continued.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

EVAL_TEXTS = ("prideprejudice", "persuasion")


def parse_list(text: str, cast=str) -> list:
    return [cast(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--rows", default="dense,oneshot,hybrid,maskllm,tile,joint",
                   help="which row groups: dense, oneshot (magnitude/Wanda/SparseGPT 2:4), hybrid (one-shot "
                        "hybrid), maskllm, tile, joint")
    p.add_argument("--oneshot-methods", default="magnitude,wanda,sparsegpt")
    p.add_argument("--sparsities", default="0.25,0.35,0.45")
    p.add_argument("--learn-sparsities", default=None, help="sparsities for tile/joint rows (default --sparsities)")
    p.add_argument("--prior", default="sparsegpt")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=None, help="override the learning rate of every learned row")
    p.add_argument("--tile-lr", type=float, default=None)
    p.add_argument("--eval-texts", default=",".join(EVAL_TEXTS),
                   help="comma-separated perplexity texts (embedded names or files)")
    p.add_argument("--eval-windows", type=int, default=10)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/accuracy_cpu.md")
    p.add_argument("--rows-json", default=None,
                   help="where finished rows are kept to resume the table (default: the tilesparse cache)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from tilesparse.commands.common import quiet_libraries
    from tilesparse.data import load_text, tokenize
    from tilesparse.evaluation import evaluate_text
    from tilesparse.io import apply_masks
    from tilesparse.learning import build_final_maskset, learn_masks, make_config
    from tilesparse.learning.final import LayerFinal
    from tilesparse.learning.priors import OneShotMasks
    from tilesparse.masks.nm import ids_from_mask
    from tilesparse.masks.tiles import TileGrid, tile_density
    from tilesparse.models import find_prunable_linears, load_model
    from tilesparse.pruning import PruneConfig, calibration_ids, prune_model, prune_model_multi

    quiet_libraries()
    progress = not args.no_progress
    rows_wanted = set(parse_list(args.rows))
    sparsities = parse_list(args.sparsities, float)
    learn_sp = parse_list(args.learn_sparsities, float) if args.learn_sparsities else sparsities
    out_md = Path(args.out)
    from tilesparse.paths import cache_dir as _cache_dir

    out_json = Path(args.rows_json) if args.rows_json else _cache_dir() / "accuracy-rows" / f"{out_md.stem}.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    done = json.loads(out_json.read_text()) if out_json.exists() else {"rows": []}
    finished = {r["key"] for r in done["rows"]}

    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    model = loaded.model
    linears = find_prunable_linears(model)
    original = {l.name: l.weight.detach().clone() for l in linears}

    def restore():
        for l in linears:
            l.set_weight(original[l.name])

    def evaluate() -> dict:
        return {t: evaluate_text(loaded, t, seqlen=args.eval_seqlen, max_windows=args.eval_windows,
                                 progress=False).perplexity for t in parse_list(args.eval_texts)}

    def record(key, method, sparsity, ppl, steps=0, tokens=0, seconds=0.0, extra=None):
        row = {"key": key, "method": method, "sparsity": sparsity, "ppl": ppl, "steps": steps, "tokens": tokens,
               "seconds": round(seconds, 1), **(extra or {})}
        done["rows"].append(row)
        finished.add(key)
        out_json.write_text(json.dumps(done, indent=1))
        write_markdown(done, args, loaded.name, out_md)
        print(json.dumps(row), flush=True)

    def measured(ms_or_none) -> float:
        if ms_or_none is None:
            return 0.0
        return ms_or_none.sparsity()

    if "dense" in rows_wanted and "dense" not in finished:
        t0 = time.perf_counter()
        record("dense", "dense", 0.0, evaluate(), seconds=time.perf_counter() - t0)

    calib, _ = calibration_ids(loaded, "austen-train", args.calib_samples, args.calib_seqlen, args.seed)
    need_prior = rows_wanted & {"hybrid", "maskllm", "tile", "joint"} or "oneshot" in rows_wanted
    prior = None
    prior_seconds = 0.0
    if need_prior:
        t0 = time.perf_counter()
        configs = [PruneConfig(method=args.prior, pattern="2:4")]
        configs += [PruneConfig(method=args.prior, pattern="unstructured", sparsity=s)
                    for s in sorted(set(sparsities) | set(learn_sp)) if s > 0]
        # prior masks are cached on disk (keyed by model, method, calibration) so a resumed table skips them
        from tilesparse.io import load_mask_artifact, save_mask_artifact
        from tilesparse.models import weights_fingerprint
        from tilesparse.paths import cache_dir

        tag = f"{weights_fingerprint(model)}-{args.prior}-{args.calib_samples}x{args.calib_seqlen}-s{args.seed}"
        cdir = cache_dir() / "accuracy-priors" / tag
        names = ["2:4"] + [f"u{c.sparsity}" for c in configs[1:]]
        meta_file = cdir / "seconds.json"
        if meta_file.exists() and all((cdir / n / "masks.safetensors").exists() for n in names):
            sets = [load_mask_artifact(cdir / n) for n in names]
            prior_seconds = json.loads(meta_file.read_text())["seconds"]
        else:
            sets = prune_model_multi(model, calib, configs, progress=progress)
            prior_seconds = time.perf_counter() - t0
            for n, ms in zip(names, sets):
                save_mask_artifact(ms, cdir / n)
            meta_file.write_text(json.dumps({"seconds": prior_seconds}))
        two_four = {m.name: m.to_bool() for m in sets[0] if m.pattern == "2:4"}
        unstructured = {c.sparsity: {m.name: m.to_bool() for m in ms} for c, ms in zip(configs[1:], sets[1:])}
        prior = (two_four, unstructured, sets[0])
        print(f"prior masks ({args.prior}, {len(configs)} configs, one pass): {prior_seconds:.0f} s", flush=True)

    if "oneshot" in rows_wanted:
        for method in parse_list(args.oneshot_methods):
            key = f"oneshot-{method}-2:4"
            if key in finished:
                continue
            t0 = time.perf_counter()
            if method == args.prior and prior is not None:
                ms, secs = prior[2], prior_seconds
            else:
                ms = prune_model(model, calib, PruneConfig(method=method, pattern="2:4"), progress=progress)
                secs = time.perf_counter() - t0
            apply_masks(model, ms)
            record(key, f"{method} 2:4 (one-shot, mask only)", ms.sparsity(), evaluate(),
                   seconds=secs + 0.0)
            restore()

    if "hybrid" in rows_wanted:
        for s in sparsities:
            key = f"oneshot-hybrid-{s}"
            if key in finished:
                continue
            two_four, unstructured, _ = prior
            finals = []
            for l in linears:
                g = TileGrid(l.out_features, l.in_features, 128, 128)
                ids = ids_from_mask(two_four[l.name]) if l.name in two_four else None
                finals.append(LayerFinal(l.name, g, ids, tile_density(unstructured[s][l.name], g)))
            ms = build_final_maskset(finals, s)
            apply_masks(model, ms)
            record(key, f"{args.prior} hybrid (one-shot)", ms.sparsity(), evaluate(), seconds=prior_seconds)
            restore()

    train_ids = tokenize(loaded.tokenizer, load_text("austen-train").text)
    jobs = []
    if "maskllm" in rows_wanted:
        jobs.append(("maskllm", 0.5))
    for mode in ("tile", "joint"):
        if mode in rows_wanted:
            jobs += [(mode, s) for s in learn_sp]
    for mode, s in jobs:
        key = f"learn-{mode}-{s}-{args.steps}" + (f"-lr{args.lr}" if args.lr else "") + (
            f"-tlr{args.tile_lr}" if args.tile_lr else "")
        if key in finished:
            continue
        two_four, unstructured, _ = prior
        shots = OneShotMasks(args.prior, unstructured.get(s, {}), two_four)
        cfg = make_config(mode=mode, sparsity=s, steps=args.steps, seqlen=args.seqlen, batch=args.batch,
                          grad_accum=args.grad_accum, prior=args.prior, lr=args.lr, tile_lr=args.tile_lr,
                          seed=args.seed, dtype=args.dtype, checkpoint_every=0)
        res = learn_masks(model, cfg, train_ids, model_name=loaded.name, prior_masks=shots, progress=progress,
                          bos_id=loaded.bos_id)
        apply_masks(model, res.maskset)
        from tilesparse.learning.config import MODE_NAMES

        last = res.history[-1]
        record(key, MODE_NAMES[mode], res.maskset.sparsity(), evaluate(), steps=cfg.steps, tokens=res.tokens,
               seconds=res.seconds + prior_seconds,
               extra={"target": s, "final_ce": last["ce"], "lr": cfg.lr, "tile_lr": cfg.tile_lr or cfg.lr,
                      "per_block_density": res.report["per_block"]})
        restore()
    write_markdown(done, args, loaded.name, out_md)
    print(out_md.read_text())
    return 0


def machine(device: str) -> str:
    """The machine the table ran on, in words (GPU name and torch version, or the CPU threads used)."""
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads"


def write_markdown(done: dict, args, model_name: str, path: Path) -> None:
    texts = list(dict.fromkeys(t for r in done["rows"] for t in r["ppl"]))
    lines = [
        f"# Accuracy ({args.device}, {args.dtype})", "",
        f"Model: {model_name}. Perplexity: first {args.eval_windows} x {args.eval_seqlen}-token windows "
        f"(no BOS). Prior / one-shot: {args.prior} masks from {args.calib_samples} x {args.calib_seqlen} tokens "
        f"of austen-train (weights not updated). Learning: austen-train, seqlen {args.seqlen}, batch "
        f"{args.batch} x accumulation {args.grad_accum}. Machine: {machine(args.device)}.", "",
        "| method | target | measured sparsity | " + " | ".join(f"PPL {t}" for t in texts)
        + " | steps | tokens | lr (2:4 / tile) | wall s |",
        "|---|---|---|" + "---|" * len(texts) + "---|---|---|---|",
    ]
    for r in done["rows"]:
        ppl = r["ppl"]
        if "target" in r:
            target = r["target"]
        elif r["key"].startswith("learn-"):
            target = r["key"].split("-")[2]
        else:
            target = r["key"].split("-")[-1] if "hybrid" in r["key"] else ("0" if r["key"] == "dense" else "2:4")
        lr = f"{r['lr']:g} / {r['tile_lr']:g}" if "lr" in r else "-"
        cells = " | ".join(f"{ppl[t]:.2f}" if t in ppl else "-" for t in texts)
        lines.append(f"| {r['method']} | {target} | {r['sparsity']:.4f} | {cells} | {r['steps']} | {r['tokens']} | "
                     f"{lr} | {r['seconds']:.0f} |")
    lines += ["", "Command: `PYTHONPATH=src python3 benchmarks/accuracy.py " + " ".join(sys.argv[1:]) + "`"]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
