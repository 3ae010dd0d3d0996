"""Build and read PATCH ``mask.npz`` files by hand with numpy, the way the authors' release scripts do.

Kept independent of :mod:`tilesparse.io.patch_format` so the tests check it against the layout itself.
"""

from __future__ import annotations

import json

import numpy as np

TINY_LLAMA_SHAPES = {  # [out, in] of the prunable linears of one tiny LLaMA block (conftest.make_tiny_model)
    "self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64),
    "self_attn.o_proj": (64, 64), "mlp.gate_proj": (128, 64), "mlp.up_proj": (128, 64),
    "mlp.down_proj": (64, 128),
}


def tiny_llama_weights(layers: int = 2, prefix: str = "model.layers") -> dict[str, tuple[int, int]]:
    """``{parameter name: shape}`` of every prunable weight of the tiny LLaMA."""
    return {f"{prefix}.{i}.{short}.weight": shape for i in range(layers) for short, shape in TINY_LLAMA_SHAPES.items()}


def random_24(rng: np.random.Generator, out: int, inp: int) -> np.ndarray:
    """A random boolean ``[out, in]`` mask keeping two of every four along ``in``."""
    order = np.argsort(rng.random((out, inp // 4, 4)), axis=-1)[..., :2]
    keep = np.zeros((out, inp // 4, 4), dtype=bool)
    np.put_along_axis(keep, order, True, axis=-1)
    return keep.reshape(out, inp)


def dense_tiles(rng: np.random.Generator, out: int, inp: int, tile: tuple[int, int], p: float) -> np.ndarray:
    """Random per-tile dense flags ``[n_rows, n_cols]`` (edge tiles partial)."""
    return rng.random((-(-out // tile[0]), -(-inp // tile[1]))) < p


def expand(per_tile: np.ndarray, out: int, inp: int, tile: tuple[int, int]) -> np.ndarray:
    return np.repeat(np.repeat(per_tile, tile[0], 0), tile[1], 1)[:out, :inp]


def random_hybrid(rng: np.random.Generator, out: int, inp: int, tile: tuple[int, int], p: float = 0.4):
    """``(keep [out, in], dense flags per tile)``: dense tiles keep all, the others are 2:4."""
    dense = dense_tiles(rng, out, inp, tile, p)
    return random_24(rng, out, inp) | expand(dense, out, inp, tile), dense


def save_their_npz(path, masks: dict[str, np.ndarray], meta: dict | None = None) -> None:
    """Write ``{parameter name: bool mask}`` in their layout (packbits, shape entries, ``__meta__``)."""
    arrays = {"__meta__": np.array(json.dumps(meta if meta is not None else {"base_model": "tiny", "sparsity": "45%"}))}
    for name, m in masks.items():
        arrays[name] = np.packbits(m.reshape(-1))
        arrays[f"{name}.__shape__"] = np.array(m.shape, dtype=np.int64)
    np.savez_compressed(path, **arrays)


def load_their_npz(path) -> tuple[dict[str, np.ndarray], dict]:
    """Read a file the way their loader does: ``({parameter name: bool mask}, meta)``."""
    data = np.load(path, allow_pickle=False)
    meta = json.loads(str(data["__meta__"])) if "__meta__" in data else {}
    masks = {}
    for key in data.files:
        if key == "__meta__" or key.endswith(".__shape__"):
            continue
        shape = tuple(int(x) for x in data[f"{key}.__shape__"])
        masks[key] = np.unpackbits(data[key], count=int(np.prod(shape))).astype(bool).reshape(shape)
    return masks, meta
