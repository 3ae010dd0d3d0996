"""Report plots (matplotlib, Agg backend): trade-off curve, per-block density, tile maps, speed.

Pure plotting: every function takes plain numbers/tensors and a path, and writes one PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402


def _finish(fig, ax, path: Path, *, legend: bool = True) -> Path:
    """Common tail of the line plots: grid, legend, layout, write the PNG, free the figure."""
    ax.grid(True, which="both", alpha=0.3)
    if legend:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_tradeoff(points: Mapping[str, Sequence[tuple[float, float]]], text: str, path: Path,
                  dense_ppl: float | None = None) -> Path:
    """Perplexity vs measured sparsity, one series per method (``{method: [(sparsity, ppl), ...]}``)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method, pts in points.items():
        pts = sorted(pts)
        xs = [100 * p[0] for p in pts]
        ys = [p[1] for p in pts]
        style = "o-" if len(pts) > 1 else "s"
        ax.plot(xs, ys, style, label=method, markersize=6)
    if dense_ppl is not None:
        ax.axhline(dense_ppl, color="gray", ls="--", lw=1, label=f"dense ({dense_ppl:.1f})")
    ax.set_xlim(-2, 52)  # the whole 0-50 % range, so runs of different recipes compare by eye
    ax.set_xlabel("sparsity of the pruned linears (%)")
    ax.set_ylabel(f"perplexity ({text})")
    ax.set_yscale("log")
    ax.set_title(f"Perplexity vs sparsity: {text}")
    return _finish(fig, ax, path)


def plot_block_density(series: Mapping[str, Sequence[float]], path: Path, target: Mapping[str, float] | None = None
                       ) -> Path:
    """Density (kept fraction) per decoder block, one line per learned run."""
    fig, ax = plt.subplots(figsize=(7.2, 4.0))
    for name, dens in series.items():
        ax.plot(range(len(dens)), [100 * d for d in dens], "o-", markersize=3, label=name)
        if target and name in target:
            ax.axhline(100 * target[name], ls=":", lw=1, color=ax.lines[-1].get_color())
    ax.set_xlabel("decoder block")
    ax.set_ylabel("density of the block's linears (%)")
    ax.set_title("Learned allocation: density per block (dotted: global target)")
    return _finish(fig, ax, path)


def plot_tile_maps(maps: Mapping[str, "object"], path: Path, title: str) -> Path:
    """Tile maps (int8 ``[rows, cols]``: 0 = 2:4, 1 = dense, 2 = zero) of a few layers side by side."""
    n = len(maps)
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n + 0.6, 3.4), squeeze=False)
    cmap = ListedColormap(["#4c72b0", "#dd8452", "#222222"])
    for ax, (name, kinds) in zip(axes[0], maps.items()):
        k = kinds.numpy() if hasattr(kinds, "numpy") else kinds
        ax.imshow(k, cmap=cmap, vmin=0, vmax=2, interpolation="nearest", aspect="auto")
        dense = 100 * float((k == 1).mean())
        ax.set_title(f"{name}\n{dense:.0f} % tiles dense", fontsize=8)
        ax.set_xlabel("tile column (in)", fontsize=7)
        ax.set_ylabel("tile row (out)", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.suptitle(f"{title}   (orange = dense tile, blue = 2:4 tile)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_speed(points: Mapping[str, Sequence[tuple[float, float]]], path: Path, title: str) -> Path:
    """Speed-up over dense vs sparsity (``{series: [(sparsity, speedup), ...]}``)."""
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for name, pts in points.items():
        pts = sorted(pts)
        ax.plot([100 * p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
    ax.axhline(1.0, color="gray", ls="--", lw=1)
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("speed-up over dense")
    ax.set_title(title)
    return _finish(fig, ax, path)
