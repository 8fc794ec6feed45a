import pytest

from ecomtrain.data import build
from ecomtrain.data.importers import DataError
from ecomtrain.data.stream import ShardStream, balance_shards
from ecomtrain.tasks.next_item import NextItemTask


def _task(m):
    return NextItemTask(m["num_items"], max_history=10)


def test_train_batches_equal_across_ranks_and_deterministic(tiny_dataset):
    m = build.load_manifest(tiny_dataset)
    t = _task(m)
    streams = [
        ShardStream(tiny_dataset, "train", m, t.collate_train, 8, mode="train", rank=r, world_size=2, shuffle_buffer=20, seed=1)
        for r in range(2)
    ]
    counts = [sum(1 for _ in s) for s in streams]
    assert counts[0] == counts[1] == m["splits"]["train"]["num_samples"] // 16
    a = [b["items"].tolist() for b in streams[0]]
    b = [b["items"].tolist() for b in streams[0]]
    assert a == b  # same epoch, same order
    streams[0].set_epoch(1)
    assert [x["items"].tolist() for x in streams[0]] != a


def test_skip_batches_resumes_mid_epoch(tiny_dataset):
    m = build.load_manifest(tiny_dataset)
    t = _task(m)
    mk = lambda: ShardStream(tiny_dataset, "train", m, t.collate_train, 8, mode="train", shuffle_buffer=20, seed=2)
    full = [b["items"].tolist() for b in mk()]
    s = mk()
    s.load_state_dict({"epoch": 0, "skip": 3})
    assert [b["items"].tolist() for b in s] == full[3:]


def test_eval_sees_every_sample_once_with_padding(tiny_dataset):
    m = build.load_manifest(tiny_dataset)
    t = _task(m)
    n = m["splits"]["test"]["num_samples"]
    seen, batches = [], []
    for r in range(3):
        s = ShardStream(tiny_dataset, "test", m, t.collate_eval, 32, mode="eval", rank=r, world_size=3, pad_sample=t.pad_sample)
        bs = list(s)
        batches.append(len(bs))
        for b in bs:
            seen.append(int(b["weight"].sum()))
    assert len(set(batches)) == 1
    assert sum(seen) == n


def test_balance_shards():
    shards = [{"name": "a", "num_samples": 100}, {"name": "b", "num_samples": 37}, {"name": "c", "num_samples": 0}]
    assert [[s["name"] for s in b] for b in balance_shards(shards, 2)] == [["a"], ["b"]]


@pytest.mark.parametrize("world,workers", [(2, 1), (3, 2)])
def test_fewer_shards_than_readers_splits_samples(tmp_path_factory, synth_raw, world, workers):
    """One train shard (the default shard size on a small dataset) and 2+ ranks: the reader splits by
    sample. Every rank gets the same number of batches, no sample reaches two ranks, and together
    they cover the split."""
    import json
    from collections import Counter

    from ecomtrain.data import importers

    ds = tmp_path_factory.mktemp("one_shard")
    build.build(importers.load("synth", synth_raw), ds, shard_max_samples=100_000, log=lambda *_: None)
    m = build.load_manifest(ds)
    assert sum(1 for s in m["splits"]["train"]["shards"] if s["num_samples"]) == 1
    key = lambda s: json.dumps(s, sort_keys=True)  # noqa: E731
    everything = Counter()
    from ecomtrain.data.shardio import _iter_shard

    for sh in m["splits"]["train"]["shards"]:
        everything.update(key(s) for s in _iter_shard(ds / sh["name"]))
    n, batch = m["splits"]["train"]["num_samples"], 4
    per_rank = []
    for rank in range(world):
        s = ShardStream(ds, "train", m, lambda b: b, batch, mode="train", rank=rank, world_size=world,
                        num_workers=workers, shuffle_buffer=10, seed=1)
        # read as the DataLoader's workers would: each worker id plays its own share
        got = []
        for wid in range(workers):
            got += [x for b in s._iterate(wid, workers, 0) for x in b]
        per_rank.append(Counter(key(x) for x in got))
        assert len(got) == (n // (world * batch)) * batch  # equal batches on every rank
    ranks_holding = Counter(k for c in per_rank for k in c)  # on how many ranks each sample shows up
    assert all(ranks_holding[k] <= everything[k] for k in ranks_holding), "a sample reached two ranks"
    assert set(ranks_holding) <= set(everything)
    assert len(ranks_holding) >= 0.9 * len(everything)  # and the ranks together cover the split


def test_pickle_members_are_refused(tmp_path):
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "train-000000.tar")) as w:
        w.write({"__key__": "s0", "pyd": {"items": [1, 2]}})
    m = {"splits": {"train": {"num_samples": 1, "shards": [{"name": "train-000000.tar", "num_samples": 1}]}}}
    s = ShardStream(tmp_path, "train", m, lambda b: b, 1, mode="train")
    with pytest.raises(DataError, match="pickle is refused"):
        list(s)


def test_corrupt_shard_skipped_then_fails(tiny_dataset, tmp_path):
    import shutil

    m = build.load_manifest(tiny_dataset)
    for sh in m["splits"]["val"]["shards"]:
        shutil.copy(tiny_dataset / sh["name"], tmp_path / sh["name"])
    victim = m["splits"]["val"]["shards"][0]
    data = (tmp_path / victim["name"]).read_bytes()
    (tmp_path / victim["name"]).write_bytes(data[: len(data) // 3] + b"garbage" * 100)
    t = _task(m)
    mk = lambda frac: ShardStream(tmp_path, "val", m, t.collate_eval, 16, mode="eval", max_corrupt_fraction=frac, pad_sample=t.pad_sample)
    with pytest.raises(DataError, match=victim["name"]):
        list(mk(0.0))
    got = sum(int(b["weight"].sum()) for b in mk(0.5))
    assert 0 < got < m["splits"]["val"]["num_samples"]
