"""Data-parallel learning on CPU: 2 processes, gloo backend, tiny model."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, tmp: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from conftest import make_tiny_model
    from tilesparse.learning import init_distributed_from_env, learn_masks, make_config

    r, w = init_distributed_from_env("cpu")
    assert (r, w) == (rank, world)
    try:
        ids = torch.randint(0, 128, (4000,), generator=torch.Generator().manual_seed(0))
        cfg = make_config(mode="joint", sparsity=0.35, steps=3, seqlen=16, batch=2, tile=(16, 16),
                          prior="magnitude", checkpoint_every=2)
        from tilesparse.learning.priors import OneShotMasks

        # rank 1 starts without the prior (other initial logits): rank 0's logits must be broadcast
        shots = None if rank == 0 else OneShotMasks("magnitude", {}, {})
        model = make_tiny_model("llama")
        seen = []
        res = learn_masks(model, cfg, ids, out_dir=os.path.join(tmp, "run"), progress=False, prior_masks=shots,
                          callback=lambda s, m: seen.append(m["ce"]))
        torch.save({"ces": seen, "logits": res.logits, "kinds": {m.name: m.to_bool() for m in res.maskset},
                    "world": res.config.world_size}, os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_training_agrees_across_ranks(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path), _free_port()), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r0["world"] == r1["world"] == 2
    # each rank saw its own data shard ...
    assert r0["ces"] != r1["ces"]
    # ... but the averaged gradients keep the logits, hence the final masks, identical
    for name, t in r0["logits"].items():
        assert torch.equal(t, r1["logits"][name]), name
    for name, m in r0["kinds"].items():
        assert torch.equal(m, r1["kinds"][name]), name
    from tilesparse.learning import load_checkpoint

    ck = load_checkpoint(tmp_path / "run")
    assert ck["step"] == 3 and len(ck["rng"]) == 2 and ck["config"]["world_size"] == 2
    for name, t in r0["logits"].items():  # rank 0 wrote its (= everyone's) final logits
        assert torch.equal(t, ck["logits"][name]), name
