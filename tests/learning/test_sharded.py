"""Sharded learning (FSDP2) on CPU: 2 processes, gloo backend, tiny models.

One spawn of two processes runs every multi-process case (startup dominates); the single-process halves
(a run that the two processes resume, resumes of theirs on one process) run in the test process.
"""

import os
import shutil
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import make_tiny_model

TILE = (24, 16)  # 3 tile rows over 64: uneven shards and partial tiles
JOINT = dict(grad_checkpointing=True, density_estimate="expected")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(tied: bool = False):
    """A tiny LLaMA whose MLP width (99) is odd: gate/up pattern logits shard along the candidates and their
    tile rows unevenly, down_proj (in = 99) stays dense and unwrapped."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=99, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, vocab_size=128,
                         tie_word_embeddings=tied)
    return tf.LlamaForCausalLM(cfg).eval()


def _ids():
    return torch.randint(0, 128, (4000,), generator=torch.Generator().manual_seed(0))


def _cfg(**kw):
    from tilesparse.learning import make_config

    base = dict(mode="joint", sparsity=0.35, steps=4, seqlen=16, batch=2, tile=TILE, prior="magnitude",
                checkpoint_every=2)
    base.update(kw)
    return make_config(**base)


def _stop_at(n):
    from tilesparse.learning import StopRequested

    def cb(step, _metrics):
        if step == n:
            raise StopRequested

    return cb


def _worker(rank: int, world: int, tmp: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from tilesparse.learning import StopRequested, init_distributed_from_env, learn_masks

    init_distributed_from_env("cpu")
    try:
        got = {}
        for name, shard, kw in (("ddp", False, JOINT), ("fsdp", True, JOINT),
                                ("tile-ddp", False, dict(mode="tile", loss="ce", grad_accum=2, steps=2)),
                                ("tile-fsdp", True, dict(mode="tile", loss="ce", grad_accum=2, steps=2))):
            res = learn_masks(_model(tied=name.startswith("tile")), _cfg(shard=shard, **kw), _ids(),
                              out_dir=os.path.join(tmp, name), progress=False)
            got[name] = {"logits": res.logits, "loss": [h["loss"] for h in res.history], "sharded": res.sharded,
                         "kinds": {m.name: m.to_bool() for m in res.maskset}}
        # interrupted after the step-2 checkpoint, resumed on the same two processes
        cut = os.path.join(tmp, "cut")
        with pytest.raises(StopRequested):
            learn_masks(_model(), _cfg(shard=True, **JOINT), _ids(), out_dir=cut, progress=False,
                        callback=_stop_at(3))
        dist.barrier()
        if rank == 0:
            shutil.copytree(cut, os.path.join(tmp, "cut-for-one"))
        dist.barrier()
        res = learn_masks(_model(), _cfg(shard=True, **JOINT), _ids(), out_dir=cut, resume=True, progress=False)
        got["resumed"] = {"logits": res.logits, "loss": [h["loss"] for h in res.history]}
        # a checkpoint written by one process (test process), resumed here on two with the same global batch
        res = learn_masks(_model(), _cfg(shard=True, batch=1), _ids(), out_dir=os.path.join(tmp, "from-one"),
                          resume=True, progress=False)
        got["from-one"] = {"loss": [h["loss"] for h in res.history], "sharded": res.sharded,
                           "world": res.config.world_size, "sparsity": res.maskset.sparsity()}
        torch.save(got, os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from tilesparse.learning import StopRequested, learn_masks

    tmp = tmp_path_factory.mktemp("sharded")
    # one process, sharded layout: interrupted after its step-2 checkpoint, resumed by the two processes
    with pytest.raises(StopRequested):
        learn_masks(_model(), _cfg(shard=True), _ids(), out_dir=tmp / "from-one", progress=False,
                    callback=_stop_at(3))
    one = torch.load(tmp / "from-one" / "checkpoint.dcp" / "meta.pt", weights_only=False)
    mp.spawn(_worker, args=(2, str(tmp), _free_port()), nprocs=2, join=True)
    return tmp, one, [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def _equal_logits(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sharded_step_equals_the_unsharded_step(runs):
    _, _, (r0, r1) = runs
    assert r0["fsdp"]["sharded"] and not r0["ddp"]["sharded"]
    assert r1["fsdp"]["logits"] == {}  # gathered on rank 0 only
    _equal_logits(r0["ddp"]["logits"], r0["fsdp"]["logits"])
    assert r0["ddp"]["loss"] == r0["fsdp"]["loss"] and r1["ddp"]["loss"] == r1["fsdp"]["loss"]
    for name, kinds in r0["ddp"]["kinds"].items():
        assert torch.equal(kinds, r0["fsdp"]["kinds"][name]) and torch.equal(kinds, r1["fsdp"]["kinds"][name])
    # with accumulation FSDP reduces every micro-batch (DDP once per step): equal up to rounding
    a, b = r0["tile-ddp"]["logits"], r0["tile-fsdp"]["logits"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-5, atol=1e-7), k


def test_sharded_resume_on_the_same_processes_is_bit_identical(runs):
    _, _, (r0, r1) = runs
    _equal_logits(r0["fsdp"]["logits"], r0["resumed"]["logits"])
    assert r0["resumed"]["loss"] == r0["fsdp"]["loss"]  # the saved history is rank 0's
    assert r1["resumed"]["loss"][2:] == r1["fsdp"]["loss"][2:]  # rank 1's steps after the resume


def test_sharded_checkpoint_resumes_on_another_number_of_processes(runs):
    from tilesparse.learning import learn_masks, load_checkpoint

    tmp, one, (r0, _) = runs
    # one process -> two: the two processes restored the history and finished with the same global batch
    got = r0["from-one"]
    assert got["sharded"] and got["world"] == 2
    assert got["loss"][:2] == [h["loss"] for h in one["history"]]
    assert abs(got["sparsity"] - 0.35) < 0.05
    # two processes -> one: the step-2 checkpoint of the interrupted sharded run
    res = learn_masks(_model(), _cfg(shard=True, batch=4, **JOINT), _ids(), out_dir=tmp / "cut-for-one",
                      resume=True, progress=False)
    assert res.config.world_size == 1 and len(res.history) == 4
    assert [h["loss"] for h in res.history[:2]] == r0["fsdp"]["loss"][:2]
    ck = load_checkpoint(tmp / "cut-for-one")
    assert ck["layout"] == "sharded" and ck["step"] == 4 and ck["config"]["world_size"] == 1
    # the global batch must stay
    with pytest.raises(Exception, match="sequences per step"):
        learn_masks(_model(), _cfg(shard=True, batch=2, **JOINT), _ids(), out_dir=tmp / "cut-for-one", resume=True,
                    progress=False)
    # a finished two-process run reloaded on one process gives back its logits exactly
    fin = learn_masks(_model(), _cfg(shard=True, batch=4, **JOINT), _ids(), out_dir=tmp / "fsdp", resume=True,
                      progress=False)
    _equal_logits(r0["fsdp"]["logits"], fin.logits)


def test_resharded_optimizer_state_is_the_saved_one(runs, tmp_path):
    """AdamW's state written by two processes, loaded by one: equal to the whole tensors in the checkpoint."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from tilesparse.learning import MaskedModel
    from tilesparse.learning.sharded_checkpoint import load_sharded_checkpoint

    tmp, _, _ = runs
    dcp_to_torch_save(tmp / "cut" / "checkpoint.dcp", tmp_path / "whole.pt")  # the resumed two-process run
    whole = torch.load(tmp_path / "whole.pt", weights_only=False)
    model = _model()
    masked = MaskedModel(model, "joint", tile=TILE)
    groups = [{"params": masked.pattern_parameters(), "lr": 1.0, "base_lr": 1.0, "name": "pattern"},
              {"params": masked.tile_parameters(), "lr": 1.0, "base_lr": 1.0, "name": "tile"}]
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.0)
    load_sharded_checkpoint(tmp / "cut", {k: t.detach() for k, t in masked.logit_tensors().items()}, opt, model)
    names = {id(p): n for n, p in model.named_parameters()}
    checked = 0
    for p, st in opt.state.items():
        saved = whole["optimizer"]["state"][names[id(p)]]
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(st[key], saved[key]), (names[id(p)], key)
            checked += 1
    assert checked == 3 * len(masked.parameters())
    for key, t in masked.logits_state().items():
        assert torch.equal(t, whole["logits"][key]), key


def test_final_mask_from_shards_equals_the_single_process_one(runs):
    from tilesparse.io import load_mask_artifact
    from tilesparse.learning import MaskedModel

    tmp, _, (r0, _) = runs
    logits = r0["fsdp"]["logits"]
    model = _model()
    masked = MaskedModel(model, "joint", tile=TILE)
    masked.load_logits_state(logits)
    ref = masked.final_maskset(0.35)
    art = load_mask_artifact(tmp / "fsdp")
    assert [m.name for m in ref] == [m.name for m in art]
    for a, b in zip(ref, art):
        assert a.pattern == b.pattern, a.name
        assert torch.equal(a.to_bool(), b.to_bool()), a.name
        if a.pattern == "hybrid":
            assert torch.equal(a.tile_kinds(), b.tile_kinds()) and torch.equal(a.ids, b.ids), a.name
    assert art.meta["dense_tiles"] == ref.meta["dense_tiles"]
    assert art.sparsity() == ref.sparsity()


def test_elastic_resume_rule_and_memory_estimate():
    from tilesparse.errors import TilesparseError
    from tilesparse.learning.config import check_resumable
    from tilesparse.learning.sharded import learning_bytes, resolve_shard
    from tilesparse.models import find_prunable_linears

    saved = _cfg(batch=2).model_copy(update={"world_size": 2}).to_dict()
    check_resumable(saved, _cfg(batch=4), elastic=True)
    check_resumable(saved, _cfg(batch=1, grad_accum=2).model_copy(update={"world_size": 2}), elastic=True)
    with pytest.raises(TilesparseError, match="4 sequences per step.*this run has 2"):
        check_resumable(saved, _cfg(batch=2), elastic=True)
    with pytest.raises(TilesparseError, match="made with batch=2, this run has batch=4"):  # not elastic
        check_resumable(saved, _cfg(batch=4))
    with pytest.raises(TilesparseError, match="sparsity"):
        check_resumable(saved, _cfg(batch=4, sparsity=0.25), elastic=True)
    model = make_tiny_model("llama")  # every pruned dimension a multiple of 16, fp32
    joint = learning_bytes(model, "joint", (16, 16))
    weights = sum(p.numel() * 4 for p in model.parameters())
    pruned = sum(l.numel for l in find_prunable_linears(model))
    assert joint["weights"] == weights
    assert joint["logits"] == 4 * (pruned * 6 // 4 + pruned // 256)
    assert joint["total"] == weights + 4 * joint["logits"]
    tile = learning_bytes(model, "tile", (16, 16))
    assert tile["ids"] == pruned // 4 and tile["logits"] == 4 * pruned // 256
    # one process never shards; on the CPU nothing is sharded unless asked
    assert resolve_shard(True, 1, model, "joint", (16, 16), torch.device("cpu")) is False
    assert resolve_shard(None, 1, model, "joint", (16, 16), torch.device("cpu")) is False
