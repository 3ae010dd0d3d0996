"""How a kernel configuration is chosen for eager calls and for calls captured into a CUDA graph."""

from __future__ import annotations

import torch

from kernels_testutil import random_layer

from tilesparse.kernels import ops
from tilesparse.kernels.ops import KernelConfig


def test_eager_pick_weighs_the_launch_cost():
    a, b, c = KernelConfig("mma"), KernelConfig("stream"), KernelConfig("unpack")
    device = {a: 0.020, b: 0.015, c: 0.050}
    # b is fastest on the device but its launch takes longer than a's kernel: eager calls take a
    assert ops.eager_pick(device, {a: 0.012, b: 0.060}) == a
    # launches shorter than the kernels: the device's choice
    assert ops.eager_pick(device, {a: 0.010, b: 0.010}) == b
    # only candidates with a measured launch are eligible
    assert ops.eager_pick(device, {c: 0.001}) == c


def test_untuned_choice_for_a_captured_call_has_no_split_k():
    p = random_layer(128, 256, (64, 64), 0.5, 0.0, torch.bfloat16)[2]
    x = torch.randn(16, 256).bfloat16()
    eager = ops.choose_config(x, p, None, eager=True)
    assert eager == ops.heuristic_config(16, p) and eager.split > 1  # (the heuristic splits K at 16 tokens)
    captured = ops.choose_config(x, p, None, eager=False)
    assert captured.split == 1 and ops._fit(captured, p) is not None


def test_eager_shortlist_measures_the_best_of_every_path(monkeypatch):
    device = {KernelConfig("stream", bn=b): 0.010 + b * 1e-4 for b in range(8)}
    device[KernelConfig("mma", bn=1)] = 0.030  # 9th on the device, the only one of its path
    measured = []

    def prepared(packed, cfg, M, has_bias):
        return lambda x2, bias: measured.append(cfg)

    def host(fn):  # Triton launches cost 50 us here, the mma launch 10 us
        fn()
        return 0.050 if measured[-1].path == "stream" else 0.010

    monkeypatch.setattr(ops, "_prepared_runner", prepared)
    monkeypatch.setattr(ops, "host_time", host)
    x = torch.zeros(16, 8)
    assert ops.autotune_eager(x, None, None, device) == KernelConfig("mma", bn=1)
    assert len(measured) == ops.EAGER_SHORTLIST + 1


def test_an_eager_call_reuses_the_last_launch_only_when_nothing_changed():
    x = torch.randn(2, 16, 64, dtype=torch.bfloat16)
    bias = torch.zeros(32, dtype=torch.bfloat16)
    here = x.get_device()  # -1 on the CPU: stands for the current device's index
    last = (x.shape, bias, ops._TUNED.gen, x.dtype, here, None)
    assert ops._repeats(last, x, bias, here, capturing=False)
    assert ops._repeats(last, torch.randn(2, 16, 64, dtype=torch.bfloat16), bias, here, False)
    assert not ops._repeats(last, x, bias, here, capturing=True)  # captured calls have their own choice
    assert not ops._repeats(last, x, bias, here + 1, False)  # another current device
    assert not ops._repeats(last, x, bias.clone(), here, False)  # another bias
    assert not ops._repeats(last, x, None, here, False)
    assert not ops._repeats(last, x[:, :8], bias, here, False)  # other token count
    assert not ops._repeats(last, x.half(), bias, here, False)
    assert not ops._repeats((*last[:2], last[2] - 1, *last[3:]), x, bias, here, False)  # tuned since


def test_tuning_shows_progress_over_every_candidate(monkeypatch):
    import tqdm.auto

    p = random_layer(128, 256, (64, 64), 0.5, 0.0, torch.bfloat16)[2]
    x = torch.randn(16, 256).bfloat16()
    bars = []

    def bar(iterable, **kw):
        bars.append(kw)
        return iterable

    timed = []
    monkeypatch.setattr(tqdm.auto, "tqdm", bar)
    monkeypatch.setattr(ops, "run_config", lambda *a: None)
    monkeypatch.setattr(ops, "time_cold", lambda fn, device: timed.append(1) or 0.01 * len(timed))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    best, times = ops.autotune(x, p, None)
    assert len(bars) == 1 and "128x256 for 16 tokens" in bars[0]["desc"] and bars[0]["disable"] is None
    assert len(times) == len(ops.candidate_configs(16, p)) > 1 and best == next(iter(times))
