"""The streaming reader on real shards: pickle refusal, corrupt/truncated shards,
fewer shards than readers (split by sample), mid-epoch resume, eval coverage, and a 2-process gloo run over
shards of 100, 37 and 0 samples."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from data_helpers import write_shard

from ecomtrain.data.build import sha256_file
from ecomtrain.data.importers import DataError
from ecomtrain.data.stream import EpochLoader, ShardStream


def collate(batch: list[dict]) -> dict:
    return {"ids": torch.tensor([s["id"] for s in batch])}


def make_shards(root: Path, sizes: list[int], split: str = "train") -> dict:
    root.mkdir(parents=True, exist_ok=True)
    shards, start = [], 0
    for k, n in enumerate(sizes):
        name = f"{split}-{k:06d}.tar"
        write_shard(root / name, [{"id": start + i, "items": [1, 2]} for i in range(n)])
        shards.append({"name": name, "num_samples": n, "bytes": (root / name).stat().st_size, "sha256": sha256_file(root / name)})
        start += n
    return {"splits": {split: {"num_samples": start, "shards": shards}}}


def ids(loader) -> list[list[int]]:
    return [b["ids"].tolist() for b in loader]


def test_refuses_pickle_members(tmp_path):
    write_shard(tmp_path / "train-000000.tar", [{"id": 0}], extra_members={"s000000.pyd": b"\x80\x04K\x01."})
    m = {"splits": {"train": {"num_samples": 1, "shards": [{"name": "train-000000.tar", "num_samples": 1}]}}}
    st = ShardStream(tmp_path, "train", m, collate, 1, max_corrupt_fraction=1.0)
    with pytest.raises(DataError, match=r"s000000.pyd.*pickle is refused"):
        list(st)


def test_truncated_shard_skipped_and_counted_then_fails_naming_it(tmp_path):
    m = make_shards(tmp_path, [20, 20, 20])
    victim = tmp_path / "train-000001.tar"
    victim.write_bytes(victim.read_bytes()[:3000])  # cut at a member boundary: tar itself reads "fine"
    st = ShardStream(tmp_path, "train", m, collate, 5, max_corrupt_fraction=0.34)
    got = [i for b in ids(st) for i in b]
    assert len(got) == 60 // 5 * 5 and st.corrupt_shards == ["train-000001.tar"]
    assert not set(got) & set(range(22, 40))  # nothing past the cut
    st = ShardStream(tmp_path, "train", m, collate, 5, max_corrupt_fraction=0.0)
    with pytest.raises(DataError, match=r"train-000001.tar: unreadable shard .*truncated"):
        list(st)
    # garbage in place of a shard
    victim.write_bytes(b"not a tar at all" * 10)
    m["splits"]["train"]["shards"][1].pop("bytes")
    with pytest.raises(DataError, match="train-000001.tar"):
        list(ShardStream(tmp_path, "train", m, collate, 5))


def test_fewer_shards_than_readers_splits_by_sample(tmp_path):
    """2 non-empty shards, 2 ranks x 2 DataLoader workers = 4 readers: the reader splits by sample
    (it used to refuse). Each rank gets the same number of batches; the 4 readers' shares are
    disjoint and together are the whole split."""
    m = make_shards(tmp_path, [12, 12, 0])  # 6 samples per reader = its 3 batches of 2: one exact pass
    per_rank = []
    for rank in range(2):
        st = ShardStream(tmp_path, "train", m, collate, 2, rank=rank, world_size=2, num_workers=2, seed=5)
        got = ids(EpochLoader(st, num_workers=2))
        assert len(got) == len(st) == 24 // (2 * 2)
        per_rank.append([i for b in got for i in b])
    a, b = per_rank
    assert not set(a) & set(b) and len(set(a)) == len(a) and len(set(b)) == len(b)
    assert sorted(a + b) == list(range(24))


@pytest.mark.parametrize("workers", [0, 2])
def test_mid_epoch_resume_and_determinism(tmp_path, workers):
    m = make_shards(tmp_path, [30, 25, 20, 15])

    def loader():
        st = ShardStream(tmp_path, "train", m, collate, 4, num_workers=workers, shuffle_buffer=8, seed=3)
        return EpochLoader(st, num_workers=workers)

    a = loader()
    full0, full1 = ids(a), ids(a)
    assert len(full0) == len(a) == 90 // 4 and full0 != full1  # each epoch reshuffles
    assert ids(loader()) == full0  # same seed, same order
    b = loader()
    it = iter(b)
    head = [next(it)["ids"].tolist() for _ in range(7)]
    state = b.position()
    assert state == {"epoch": 0, "batches": 7, "seed": 3} and head == full0[:7]
    c = loader()
    c.seek(state)
    assert ids(c) == full0[7:]  # the rest of epoch 0
    assert c.position()["batches"] == len(full0)
    assert ids(c) == full1  # then epoch 1 as usual
    d = loader()
    d.seek({"epoch": 0, "batches": len(full0), "seed": 3})  # saved at the end of epoch 0
    assert ids(d) == full1


def test_eval_every_sample_once_equal_batches(tmp_path):
    m = make_shards(tmp_path, [100, 37, 0], split="val")
    seen, nb = [], []
    for rank in (0, 1):
        st = ShardStream(tmp_path, "val", m, collate, 16, mode="eval", rank=rank, world_size=2, pad_sample={"id": -1})
        batches = list(st)
        nb.append(len(batches))
        for b in batches:
            seen += [i for i, w in zip(b["ids"].tolist(), b["weight"].tolist()) if w > 0]
    assert nb[0] == nb[1] == len(st) and sorted(seen) == list(range(137))


def _ddp_worker(rank: int, root: str, port: int, result_dir: str) -> None:
    import torch.distributed as dist

    from datetime import timedelta

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    import json

    m = json.loads((Path(root) / "m.json").read_text())
    counts = {}
    for split, mode in (("train", "train"), ("val", "eval")):
        st = ShardStream(root, split, m, collate, 8, mode=mode, rank=rank, world_size=2, shuffle_buffer=16, pad_sample={"id": -1})
        n, mine = 0, []
        for b in EpochLoader(st):
            t = torch.ones(1)
            dist.all_reduce(t)  # a rank with fewer batches would leave the other waiting here
            n += 1
            mine += b["ids"].tolist() if mode == "train" else [i for i, w in zip(b["ids"].tolist(), b["weight"].tolist()) if w > 0]
        counts[split] = {"batches": n, "ids": mine}
    dist.barrier()
    (Path(result_dir) / f"rank{rank}.json").write_text(json.dumps(counts))
    dist.destroy_process_group()


@pytest.mark.distributed
def test_two_process_gloo_uneven_and_empty_shards(tmp_path):
    import json
    import socket

    import torch.multiprocessing as mp

    m = make_shards(tmp_path, [100, 37, 0])
    m["splits"].update(make_shards(tmp_path, [100, 37, 0], split="val")["splits"])
    (tmp_path / "m.json").write_text(json.dumps(m))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_ddp_worker, args=(str(tmp_path), port, str(tmp_path)), nprocs=2, join=False, start_method="spawn")
    deadline = time.time() + 120  # the fixed bound: a hang fails here instead of blocking CI
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("2-process reader did not finish within 120 s (a rank hung)")
    r = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1)]
    assert r[0]["train"]["batches"] == r[1]["train"]["batches"] == 137 // 16
    assert r[0]["val"]["batches"] == r[1]["val"]["batches"]
    assert sorted(r[0]["val"]["ids"] + r[1]["val"]["ids"]) == list(range(137))
    # train shards are split by rank: the 100-sample shard on one rank, the 37 on the other
    assert set(r[0]["train"]["ids"]).isdisjoint(r[1]["train"]["ids"])
