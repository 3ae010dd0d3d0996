"""Generation the way a deployer runs it: a static KV cache, ``torch.compile`` and CUDA graphs, with timings.

HF's own ``model.generate`` does the work: with ``cache_implementation="static"`` and a ``CompileConfig`` it
compiles the decoding step (mode ``reduce-overhead``: CUDA graphs) once per shape. Hybrid layers are one
``torch.ops.tilesparse.hybrid_linear`` node each (:mod:`tilesparse.kernels.library`), so a packed export
compiles like a dense model. :func:`timed_generate` measures time to first token and decode tokens/s with a
streamer (each new token reaches the host before it is counted).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


@dataclass
class GenerationSpeed:
    """Tokens generated and how fast: ``ttft_s`` (prompt in to first new token out, prefill included) and
    the decode rate over the tokens after the first, per sequence and over the batch."""

    new_tokens: int
    batch: int
    prompt_tokens: int
    ttft_s: float
    total_s: float
    settings: dict = field(default_factory=dict)

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Decode steps per second after the first token (per sequence); None with a single new token."""
        steps = self.new_tokens - 1
        return steps / (self.total_s - self.ttft_s) if steps > 0 and self.total_s > self.ttft_s else None

    def __str__(self) -> str:
        rate = self.decode_tokens_per_s
        dec = "-" if rate is None else f"{rate:.1f} tokens/s per sequence, {rate * self.batch:.1f} tokens/s in all"
        on = ", ".join(k for k, v in self.settings.items() if v) or "eager"
        return (f"batch {self.batch}, prompt {self.prompt_tokens} tokens, {self.new_tokens} new: time to first token "
                f"{self.ttft_s * 1e3:.1f} ms, decode {dec} ({on})")


class _Clock:
    """A ``generate`` streamer that notes when each chunk of new tokens arrives (the prompt comes first)."""

    def __init__(self):
        self.times: list[float] = []
        self.calls = 0

    def put(self, value) -> None:
        self.calls += 1
        if self.calls > 1:  # the first call carries the prompt
            self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def resolve_switches(gpu: bool, *, static_cache: bool | None = None, compile: bool | None = None,
                     cuda_graphs: bool | None = None) -> dict[str, bool]:
    """The deployment switches with their defaults filled in (each on with a GPU, off elsewhere); a
    combination that cannot run is a one-line :class:`~tilesparse.errors.TilesparseError`."""
    from .errors import TilesparseError

    static_cache = (gpu or bool(compile)) if static_cache is None else static_cache
    compile = gpu and static_cache if compile is None else compile
    cuda_graphs = gpu and compile if cuda_graphs is None else cuda_graphs
    if compile and not static_cache:
        raise TilesparseError("compiled generation needs the static KV cache (drop --no-static-cache)")
    if cuda_graphs and not (gpu and compile):
        raise TilesparseError("CUDA graphs need a GPU and compiled generation")
    return {"static_cache": static_cache, "compile": compile, "cuda_graphs": cuda_graphs}


def generation_kwargs(model, *, fullgraph: bool = True, **switches) -> tuple[dict, dict[str, bool]]:
    """``generate`` keywords for a deployment-style run (:func:`resolve_switches` for the model's device):
    ``static_cache`` gives ``cache_implementation="static"``, ``compile`` lets HF compile the decoding step
    (``fullgraph``), ``cuda_graphs`` picks compile mode ``reduce-overhead`` (else
    ``max-autotune-no-cudagraphs``). Compiling on a CPU runs when asked (slow to start; for tests).
    Returns the keywords and the resolved switches."""
    from transformers import CompileConfig

    gpu = next(model.parameters()).is_cuda
    on = resolve_switches(gpu, **switches)
    kw: dict = {}
    if on["static_cache"]:
        kw["cache_implementation"] = "static"
    if on["compile"]:
        mode = ("reduce-overhead" if on["cuda_graphs"] else "max-autotune-no-cudagraphs") if gpu else "default"
        cfg = CompileConfig(fullgraph=fullgraph, mode=mode)
        if not gpu:
            cfg._compile_all_devices = True  # HF compiles only on accelerators unless told
        kw["compile_config"] = cfg
    else:
        kw["disable_compile"] = True
    return kw, on


def timed_generate(model, input_ids: torch.Tensor, *, max_new_tokens: int, pad_token_id: int | None = None,
                   do_sample: bool = False, temperature: float | None = None, exact: bool = True, **switches
                   ) -> tuple[torch.Tensor, GenerationSpeed]:
    """``model.generate`` with :func:`generation_kwargs` (``switches``) and a clock: returns the output ids
    ``[batch, prompt + new]`` and a :class:`GenerationSpeed`. With ``exact`` every sequence generates
    ``max_new_tokens`` (no stop at the end-of-text token), so timed runs compare like for like."""
    kw, on = generation_kwargs(model, **switches)
    settings = {"static cache": on["static_cache"], "torch.compile": on["compile"], "CUDA graphs": on["cuda_graphs"]}
    clock = _Clock()
    if input_ids.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens if exact else None,
                             do_sample=do_sample,
                             temperature=temperature if do_sample else None, top_p=None, top_k=None,
                             pad_token_id=pad_token_id, streamer=clock, **kw)
    if input_ids.is_cuda:
        torch.cuda.synchronize()
    total = time.perf_counter() - t0
    new = out.shape[1] - input_ids.shape[1]
    ttft = (clock.times[0] - t0) if clock.times else total
    return out, GenerationSpeed(new, input_ids.shape[0], input_ids.shape[1], ttft, total, settings)


__all__ = ["GenerationSpeed", "resolve_switches", "generation_kwargs", "timed_generate"]
