import json
import math

import pytest
import torch

from conftest import make_tiny_model
from tilesparse.errors import TilesparseError
from tilesparse.learning import StopRequested, learn_masks, load_checkpoint, make_config
from tilesparse.learning.trainer import WindowSampler, lr_factor, warmup_steps

TILE = (16, 16)


def _ids(n=6000, seed=0):
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed))


def _cfg(**kw):
    base = dict(mode="joint", sparsity=0.35, steps=6, seqlen=16, batch=2, tile=TILE, prior="magnitude",
                checkpoint_every=2)
    base.update(kw)
    return make_config(**base)


def test_lr_schedule_warmup_then_cosine():
    assert [round(lr_factor(s, 10, 2), 3) for s in (0, 1)] == [0.5, 1.0]
    vals = [lr_factor(s, 10, 2) for s in range(2, 10)]
    assert vals[0] == 1.0 and all(a > b for a, b in zip(vals, vals[1:])) and vals[-1] > 0
    assert warmup_steps(_cfg(warmup=0.05, steps=100)) == 5
    assert warmup_steps(_cfg(warmup=3, steps=100)) == 3


def test_window_sampler_is_a_pure_function_of_position():
    s = WindowSampler(torch.arange(100), 10, seed=3)
    a = s.batch(7, 5)
    b = WindowSampler(torch.arange(100), 10, seed=3).batch(7, 5)
    assert torch.equal(a, b)
    epoch0 = s.batch(0, 10)
    assert sorted(epoch0[:, 0].tolist()) == list(range(0, 100, 10))  # every window once per epoch


def test_defaults_follow_design_per_mode():
    j = make_config(mode="joint", sparsity=0.45)
    assert (j.tile_k, j.tile_tau, j.pattern_k, j.pattern_tau) == ((25, 350), (4, 0.05), (100, 500), (4, 0.05))
    assert (j.l1, j.l2, j.lr) == (7.0, 10.0, 1e-3)
    assert make_config(mode="joint", sparsity=0.25).tile_tau == (2.0, 0.05)
    t = make_config(mode="tile", sparsity=0.35)
    assert (t.tile_k, t.tile_tau, t.l1, t.l2, t.lr) == ((100, 500), (2, 0.05), 3.0, 0.1, 1e-3)
    assert make_config(mode="maskllm", sparsity=0.3).sparsity == 0.5


@pytest.mark.parametrize("bad", [dict(sparsity=0.6), dict(sparsity=-0.1), dict(steps=0), dict(mode="x"),
                                 dict(batch=0), dict(prior="bogus"), dict(mode="tile", prior="none")])
def test_bad_config_is_a_user_error(bad):
    with pytest.raises(TilesparseError):
        _cfg(**bad)


@pytest.mark.parametrize("mode,accum", [("joint", 1), ("tile", 2)])
def test_interrupt_and_resume_equals_uninterrupted(tmp_path, mode, accum):
    full = learn_masks(make_tiny_model("llama"), _cfg(mode=mode, grad_accum=accum), _ids(),
                       out_dir=tmp_path / "full", progress=False)
    ref = load_checkpoint(tmp_path / "full")

    def crash(step, _metrics):
        if step == 5:  # after the step-4 checkpoint, before the end
            raise StopRequested

    with pytest.raises(StopRequested):
        learn_masks(make_tiny_model("llama"), _cfg(mode=mode, grad_accum=accum), _ids(),
                    out_dir=tmp_path / "cut", progress=False, callback=crash)
    assert load_checkpoint(tmp_path / "cut")["step"] == 4
    resumed = learn_masks(make_tiny_model("llama"), _cfg(mode=mode, grad_accum=accum), _ids(),
                          out_dir=tmp_path / "cut", resume=True, progress=False)
    got = load_checkpoint(tmp_path / "cut")
    assert got["step"] == ref["step"] == 6
    for k, v in ref["logits"].items():
        assert torch.equal(v, got["logits"][k]), k
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    for a, b in zip(full.maskset, resumed.maskset):
        assert torch.equal(a.to_bool(), b.to_bool())


def test_resume_refuses_other_config_and_other_model(tmp_path):
    learn_masks(make_tiny_model("llama"), _cfg(steps=2), _ids(), out_dir=tmp_path, progress=False)
    with pytest.raises(TilesparseError, match="sparsity"):
        learn_masks(make_tiny_model("llama"), _cfg(steps=2, sparsity=0.25), _ids(), out_dir=tmp_path,
                    resume=True, progress=False)
    with pytest.raises(TilesparseError, match="another model"):
        learn_masks(make_tiny_model("llama", seed=1), _cfg(steps=2), _ids(), out_dir=tmp_path, resume=True,
                    progress=False)
    with pytest.raises(TilesparseError, match="no learning checkpoint"):
        learn_masks(make_tiny_model("llama"), _cfg(steps=2), _ids(), out_dir=tmp_path / "nothing", resume=True,
                    progress=False)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    import tilesparse.learning.trainer as tr

    real = tr.density_penalty
    calls = {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        v = real(*a, **k)
        return v * float("nan") if calls["n"] == 3 else v

    monkeypatch.setattr(tr, "density_penalty", poisoned)
    with pytest.raises(TilesparseError, match=r"NaN.*step 3.*step 2"):
        learn_masks(make_tiny_model("llama"), _cfg(), _ids(), out_dir=tmp_path, progress=False)
    ck = load_checkpoint(tmp_path)
    assert ck["step"] == 2
    assert all(torch.isfinite(v.float()).all() for v in ck["logits"].values())


def test_result_hits_target_and_writes_artifact_and_report(tmp_path):
    from tilesparse.io import load_mask_artifact

    model = make_tiny_model("llama")
    res = learn_masks(model, _cfg(steps=3, sparsity=0.45, density_scope="block", density_estimate="expected"),
                      _ids(), out_dir=tmp_path, progress=False)
    back = load_mask_artifact(tmp_path, model)
    assert back.sparsity() == pytest.approx(res.maskset.sparsity())
    assert abs(res.maskset.sparsity() - 0.45) < 0.03  # tiles of 16x16 over 64-wide layers
    rep = json.loads((tmp_path / "report.json").read_text())
    assert len(rep["history"]) == 3 and set(rep["report"]["per_block"]) == {"0", "1"}
    assert all(math.isfinite(h["loss"]) for h in rep["history"])
    assert not any("Masked" in type(m).__name__ for m in model.modules())  # wrappers removed


def test_learning_lowers_the_loss_on_a_learnable_signal():
    # a model whose next-token signal lives in its weights: masks that keep the right weights win
    torch.manual_seed(0)
    model = make_tiny_model("llama")
    ids = torch.arange(128).repeat(60)  # deterministic successor sequence
    cfg = _cfg(mode="maskllm", steps=12, seqlen=16, batch=4, lr=0.05, l2=0.0)
    res = learn_masks(model, cfg, ids, progress=False)
    first = sum(h["ce"] for h in res.history[:3]) / 3
    last = sum(h["ce"] for h in res.history[-3:]) / 3
    assert last < first


def test_distillation_loss_is_the_kl_divergence():
    from tilesparse.learning.regularizers import distillation_loss

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    ps, pt = torch.softmax(s.double() / 2, -1), torch.softmax(t.double() / 2, -1)
    ref = (pt * (pt.log() - ps.log())).sum(-1).mean() * 4
    assert float(distillation_loss(s, t, temperature=2.0)) == pytest.approx(float(ref), rel=1e-5)
    assert float(distillation_loss(t, t)) == pytest.approx(0.0, abs=1e-6)


def test_the_unmasked_model_is_the_dense_teacher():
    from tilesparse.learning import MaskedModel

    model = make_tiny_model("llama")
    x = _ids(32).view(2, 16)
    with torch.no_grad():
        dense = model(input_ids=x).logits
        masked = MaskedModel(model, "maskllm", tile=TILE)
        with masked.unmasked():
            teacher = model(input_ids=x).logits
        student = model(input_ids=x).logits
    assert torch.equal(teacher, dense) and not torch.allclose(student, dense)
    assert masked.state.bypass is False


@pytest.mark.parametrize("loss", ["kd", "kd+ce"])
def test_distillation_learns_and_resumes(tmp_path, loss):
    full = learn_masks(make_tiny_model("llama"), _cfg(loss=loss, l2=0.0), _ids(), out_dir=tmp_path / "full",
                       progress=False)
    for h in full.history:  # the loss is the task term plus the (non-negative) density regulariser
        assert h["kd"] > 0
        task = h["kd"] if loss == "kd" else h["kd"] + h["ce"]
        assert task - 1e-5 <= h["loss"] < task + 0.5 * h["ce"]
    ref = load_checkpoint(tmp_path / "full")

    def crash(step, _metrics):
        if step == 3:
            raise StopRequested

    with pytest.raises(StopRequested):
        learn_masks(make_tiny_model("llama"), _cfg(loss=loss, l2=0.0), _ids(), out_dir=tmp_path / "cut", progress=False,
                    callback=crash)
    learn_masks(make_tiny_model("llama"), _cfg(loss=loss, l2=0.0), _ids(), out_dir=tmp_path / "cut", resume=True,
                progress=False)
    got = load_checkpoint(tmp_path / "cut")
    for k, v in ref["logits"].items():
        assert torch.equal(v, got["logits"][k]), k
    with pytest.raises(TilesparseError, match="loss"):
        learn_masks(make_tiny_model("llama"), _cfg(loss="ce", l2=0.0), _ids(), out_dir=tmp_path / "cut", resume=True,
                    progress=False)


def test_a_checkpoint_without_a_loss_field_resumes_as_cross_entropy(tmp_path):
    from tilesparse.learning.config import LearnConfig, check_resumable

    saved = _cfg().to_dict()
    del saved["loss"]
    check_resumable(saved, _cfg(loss="ce"))
    with pytest.raises(TilesparseError, match="loss"):
        check_resumable(saved, _cfg(loss="kd"))
    assert LearnConfig.from_dict(saved).loss == "ce"


def test_window_sampler_starts_windows_with_bos():
    s = WindowSampler(torch.arange(100, 200), 10, seed=0, bos_id=7)
    assert len(s) == 100 // 9
    b = s.batch(0, len(s))
    assert b.shape == (len(s), 10) and (b[:, 0] == 7).all()
    body = b[:, 1:]
    assert sorted(body[:, 0].tolist()) == list(range(100, 100 + 9 * len(s), 9))  # stream tokens, no overlap
    with pytest.raises(TilesparseError, match="fewer than one window"):
        WindowSampler(torch.arange(8), 10, seed=0, bos_id=7)


def test_column_shared_tile_maps_learn_whole_tile_columns(tmp_path):
    from tilesparse.learning import MaskedModel

    model = make_tiny_model("llama")
    res = learn_masks(model, _cfg(steps=3, sparsity=0.3, tile_map="columns"), _ids(), out_dir=tmp_path,
                      progress=False)
    assert res.maskset.meta["tile_map"] == "columns" and res.prior.meta["tile_map"] == "columns"
    for ms in (res.maskset, res.prior):
        kinds = [lm.kinds for lm in ms.layers.values() if lm.pattern == "hybrid"]
        assert kinds and all(bool((k == k[:1]).all()) for k in kinds)  # every tile-column one kind
        assert any(bool((k == 1).any()) for k in kinds) and abs(ms.sparsity() - 0.3) < 0.05
    ck = load_checkpoint(tmp_path)
    tiles = {k: v for k, v in ck["logits"].items() if k.endswith(":tile")}
    assert tiles and all(v.shape[0] == 1 for v in tiles.values())  # one logit per tile-column
    with pytest.raises(TilesparseError, match="tile_map"):  # resuming with free maps is another run
        learn_masks(model, _cfg(steps=3, sparsity=0.3), _ids(), out_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(TilesparseError, match="columns"):
        _cfg(tile_map="columns", shard=True)
    # one sampled value per tile-column, repeated down the tile-rows; the gradient reaches the shared logit
    masked = MaskedModel(make_tiny_model("llama"), "joint", tile=TILE, tile_map="columns")
    layer = masked.layers[0]
    assert tuple(layer.tile_logits.shape) == (1, layer.grid.n_cols)
    t = layer.tile_values()
    assert t.shape == layer.grid.shape and torch.equal(t, t[:1].expand_as(t))
    t.sum().backward()
    assert layer.tile_logits.grad is not None and bool((layer.tile_logits.grad != 0).all())
    with pytest.raises(ValueError, match="do not match"):
        MaskedModel(make_tiny_model("llama"), "joint", tile=TILE, tile_map="columns",
                    tile_init={layer.layer_name: torch.zeros(layer.grid.shape)})
