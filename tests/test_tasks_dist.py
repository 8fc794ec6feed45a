"""GAUC and AUC under DDP: 2 gloo ranks, each holding part of the impressions (a user's split
across ranks too), give exactly the single-process values."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ecomtrain.metrics_pointwise import BinaryMetrics

pytestmark = pytest.mark.distributed


def _data():
    g = torch.Generator().manual_seed(0)
    n = 400
    groups = torch.randint(0, 40, (n,), generator=g)
    labels = (torch.rand(n, generator=g) < 0.3).long()
    scores = (torch.rand(n, generator=g) + 0.3 * labels).clamp(0, 1)
    return scores, labels, groups


def _rank(rank: int, world: int, port: int, q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    s, y, g = _data()
    m = BinaryMetrics()
    m.update(s[rank::world], y[rank::world], g[rank::world])  # every user's impressions end up on both ranks
    out = {k: float(v) for k, v in m.compute().items()}
    if rank == 0:
        q.put(out)
    dist.destroy_process_group()


def test_gauc_two_ranks_equal_single_process():
    s, y, g = _data()
    single = BinaryMetrics()
    single.update(s, y, g)
    ref = {k: float(v) for k, v in single.compute().items()}
    # per-rank GAUC averaged would differ: the check below has teeth
    halves = []
    for r in range(2):
        m = BinaryMetrics()
        m.update(s[r::2], y[r::2], g[r::2])
        halves.append(float(m.compute()["gauc"]))
    assert abs(sum(halves) / 2 - ref["gauc"]) > 1e-4
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=_rank, args=(r, 2, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = q.get(timeout=400)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for k in ("auc", "gauc", "logloss", "ece"):
        assert got[k] == pytest.approx(ref[k], abs=1e-6), k
