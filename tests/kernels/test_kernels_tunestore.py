"""Tuned kernel choices kept on disk (``ops.TuneStore``): round trip, versions, damaged files."""

from __future__ import annotations

import dataclasses

from tilesparse.kernels.ops import KernelConfig, TuneStore

KEY = (4096, 4096, 128, 128, 2, 16, "torch.bfloat16", "cuda:1", False, False)
V = {"tilesparse": "1", "torch": "2", "triton": "3"}


def test_round_trip_across_processes_and_devices(tmp_path):
    path = tmp_path / "autotune" / "H100-sm90.json"
    cfg = KernelConfig("mma", mode=9, bm=16, bn=64, split=1, warps=4, ts=3, nit=4)
    TuneStore(path, V).put(KEY, cfg)
    again = TuneStore(path, V)  # what a new process reads
    assert again.get(KEY) == cfg
    assert again.get((*KEY[:7], "cuda:0", *KEY[8:])) == cfg  # another card of the same model
    assert again.get((*KEY[:5], 32, *KEY[6:])) is None  # another token bucket


def test_other_versions_or_damaged_files_start_afresh(tmp_path):
    path = tmp_path / "t.json"
    TuneStore(path, V).put(KEY, KernelConfig("stream", mode=0, bm=1, bn=8))
    assert TuneStore(path, {**V, "triton": "4"}).get(KEY) is None
    path.write_text("{not json")
    store = TuneStore(path, V)
    assert store.get(KEY) is None
    store.put(KEY, KernelConfig("unpack"))
    assert TuneStore(path, V).get(KEY) == KernelConfig("unpack")


def test_entries_of_another_config_layout_are_ignored(tmp_path):
    path = tmp_path / "t.json"
    store = TuneStore(path, V)
    store.entries[store._key(KEY)] = {"path": "flat", "ctas": 2}
    assert store.get(KEY) is None
    # a stream-kernel choice stored with fields that KernelConfig lacks (bk, stages) is ignored as a whole
    cfg = KernelConfig("stream", mode=0, bm=1, bn=8, ts=8, td=4, xt=1)
    store.entries[store._key(KEY)] = {**dataclasses.asdict(cfg), "bk": 0, "stages": 1}
    assert store.get(KEY) is None
    store.entries[store._key(KEY)] = dataclasses.asdict(cfg)
    assert store.get(KEY) == cfg

