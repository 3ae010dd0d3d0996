"""Deployment-style generation: static KV cache, torch.compile (CUDA graphs on a GPU), timings; the packed
export through HF's own generate after compiling, on the CPU."""

from __future__ import annotations

import pytest
import torch
from transformers import CompileConfig

import tilesparse as ts
from tilesparse.errors import TilesparseError
from tilesparse.generation import generation_kwargs, resolve_switches, timed_generate


def test_switches_default_on_with_a_gpu_and_off_without():
    assert resolve_switches(True) == {"static_cache": True, "compile": True, "cuda_graphs": True}
    assert resolve_switches(False) == {"static_cache": False, "compile": False, "cuda_graphs": False}
    assert resolve_switches(True, cuda_graphs=False)["compile"] is True
    assert resolve_switches(True, static_cache=False) == {"static_cache": False, "compile": False,
                                                          "cuda_graphs": False}
    assert resolve_switches(False, compile=True) == {"static_cache": True, "compile": True, "cuda_graphs": False}
    with pytest.raises(TilesparseError, match="needs the static KV cache"):
        resolve_switches(True, static_cache=False, compile=True)
    with pytest.raises(TilesparseError, match="CUDA graphs need a GPU"):
        resolve_switches(False, static_cache=True, compile=True, cuda_graphs=True)


@pytest.fixture
def packed_and_masked(tiny_model_dir, text_file, tmp_path):
    """A packed export of a tiny hybrid model, and the same model with its masks applied (the reference)."""
    lm = ts.load_model(str(tiny_model_dir))
    masks = ts.prune(lm, method="wanda", pattern="hybrid", sparsity=0.4, tile=32, calibration=str(text_file),
                     samples=2, seqlen=32, progress=False)
    ts.apply_masks(lm, masks)
    ts.export(lm, masks, tmp_path / "packed")
    return ts.load_model(str(tmp_path / "packed")), lm


def test_packed_export_generates_with_hf_static_cache_after_compile(packed_and_masked):
    packed, masked = packed_and_masked
    ids = torch.randint(3, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    common = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = masked.model.generate(ids, **common)
        cfg = CompileConfig(fullgraph=True, mode="default")
        cfg._compile_all_devices = True  # HF compiles only on accelerators unless told (on a GPU: not needed)
        got = packed.model.generate(ids, cache_implementation="static", compile_config=cfg, **common)
    assert torch.equal(got, want)


def test_timed_generate_reports_speed_and_matches_eager(packed_and_masked):
    packed, masked = packed_and_masked
    ids = torch.randint(3, 60, (1, 6), generator=torch.Generator().manual_seed(1))
    out, speed = timed_generate(packed.model, ids, max_new_tokens=4, pad_token_id=0, static_cache=True)
    ref, _ = timed_generate(masked.model, ids, max_new_tokens=4, pad_token_id=0)
    assert torch.equal(out, ref) and out.shape == (1, 10)
    assert speed.new_tokens == 4 and speed.batch == 1 and speed.prompt_tokens == 6
    assert 0 < speed.ttft_s <= speed.total_s and speed.decode_tokens_per_s > 0
    assert speed.settings == {"static cache": True, "torch.compile": False, "CUDA graphs": False}
    kw, on = generation_kwargs(packed.model)
    assert kw == {"disable_compile": True} and not any(on.values())
