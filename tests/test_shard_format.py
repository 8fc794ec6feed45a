"""Shard formats: schema 2 (.npy blocks, the default) and schema 1 (one JSON member per sample).

Both formats of one dataset decode to the same samples and give the training path the same
batches; schema-1 datasets stay readable; any other schema version fails with a "rebuild"
error naming the version found and the one expected; .npy members never unpickle.
"""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from data_helpers import read_split

from ecomtrain.data import build, importers, synth
from ecomtrain.data.importers import DataError
from ecomtrain.data.shardio import SCHEMA_VERSION, ShardFormatError, _iter_shard
from ecomtrain.data.stream import ShardStream

OPTIONS = dict(shard_max_samples=40, partition_events=3000, event_weights={"view": 1, "cart": 2.5, "purchase": 0.3333333},
               session_gap=3600, cold_items=0.1, max_history=12, log=lambda *_: None)


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """One rich synthetic input (ratings, sessions, weights, cold items, several partitions) built in both formats."""
    root = tmp_path_factory.mktemp("formats")
    synth.write(root / "raw", num_users=250, num_items=90, seed=5, behaviour_signal=True, channel_signal=True, ratings=True)
    for fmt in ("npy", "json"):
        build.build(importers.load("synth", root / "raw"), root / fmt, shard_format=fmt, **OPTIONS)
    return root / "npy", root / "json"


def _manifest(d):
    return json.loads((d / "manifest.json").read_text())


def test_both_formats_decode_to_the_same_samples(both):
    npy, js = both
    mn, mj = _manifest(npy), _manifest(js)
    assert (mn["schema_version"], mn["shard_format"]) == (SCHEMA_VERSION, "npy") == (2, "npy")
    assert (mj["schema_version"], mj["shard_format"]) == (1, "json")
    assert mn["sample_fields"] == mj["sample_fields"] == ["user", "items", "events", "channels", "ts", "sessions", "weights", "ratings"]
    assert mn["build"]["fingerprint"] == mj["build"]["fingerprint"]  # the format is not part of the dataset's identity
    for split in ("train", "val", "test"):
        a, b = read_split(npy, split), read_split(js, split)
        assert len(a) == len(b) == mn["splits"][split]["num_samples"] > 20
        assert a == b  # every sample, in shard order: every field, value and type
        assert [s["num_samples"] for s in mn["splits"][split]["shards"]] == [s["num_samples"] for s in mj["splits"][split]["shards"]]
        assert {type(x) for s in a for x in s["items"]} == {int} and isinstance(a[0]["user"], str)
    val = read_split(npy, "val")
    assert any(r is None for s in val for r in s["ratings"]) and any(isinstance(r, float) for s in val for r in s["ratings"])
    assert {w for s in val for w in s["weights"]} == {1.0, 2.5, 0.3333333}  # float32 weights, as a JSON writer prints them
    assert {"target", "target_event", "target_ts", "target_channel", "target_weight", "target_rating"} <= set(val[0])
    nbytes = lambda m: sum(sh["bytes"] for s in m["splits"].values() for sh in s["shards"])  # noqa: E731
    # smaller even at 40 samples a shard (tar headers dominate there; bench/data_build.py measures real sizes)
    assert nbytes(mn) < 0.7 * nbytes(mj)


def _same(x, y, where: str) -> None:
    if isinstance(x, dict):  # a batch, or its side inputs
        assert x.keys() == y.keys(), where
        for k in x:
            _same(x[k], y[k], f"{where}.{k}")
    elif isinstance(x, torch.Tensor):
        assert torch.equal(x, y), where
    else:
        assert x == y, where


def _equal_batches(a, b):
    assert len(a) == len(b) > 10
    for i, (x, y) in enumerate(zip(a, b)):
        _same(x, y, f"batch {i}")


# the npy reader decodes only the fields the task's collate_train reads (Task.train_fields), the JSON
# reader every field: equal batches also prove the projection drops nothing the batches need
@pytest.mark.parametrize("inputs", [{}, {"event_types": True, "channels": True, "time_gaps": True}], ids=["ids", "side_inputs"])
def test_training_batches_are_identical(both, inputs):
    from ecomtrain.config import validate_tree
    from ecomtrain.train.datamodule import ShardDataModule
    from ecomtrain.train.module import make_task

    def batches(root):
        tree = {"data": {"path": str(root), "max_history": 10, "batch_size": 8, "eval_batch_size": 16, "shuffle_buffer": 30},
                "model": {"backbone": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}, "inputs": inputs},
                "trainer": {"accelerator": "cpu", "max_epochs": 1}}
        cfg = validate_tree(tree)
        m = build.load_manifest(root)
        task = make_task(cfg, m)
        assert task.train_fields() == {"items"} | ({"events", "channels", "ts"} if inputs else set())
        dm = ShardDataModule(cfg, task, m)
        out = [b for _ in range(2) for b in dm.train_dataloader()]
        assert dm._train.fields == task.train_fields()
        assert ("side" in out[0]) == bool(inputs)
        return out + list(dm.val_dataloader())

    _equal_batches(batches(both[0]), batches(both[1]))


def test_field_projection_keeps_exactly_the_asked_fields(both):
    """decode_block(fields=...) gives each sample the asked keys with the same values, and still
    checks every array of the block (a damaged unread list is an error, not skipped)."""
    m = _manifest(both[0])
    path = both[0] / m["splits"]["val"]["shards"][0]["name"]
    full = list(_iter_shard(path))
    some = list(_iter_shard(path, fields=frozenset({"items", "ts", "target"})))
    assert some == [{k: s[k] for k in ("items", "ts", "target")} for s in full]
    assert list(_iter_shard(path, fields=None)) == full
    assert list(_iter_shard(path, fields=frozenset({"user"}))) == [{"user": s["user"]} for s in full]
    # a block whose unread `events` array is cut short is still refused when only `items` is asked for
    from ecomtrain.data.shardio import decode_block

    with tarfile.open(path) as tar:
        first = tar.getmembers()[0].name.rsplit("/", 1)[-1].partition(".")[0]
        members = {m.name.rsplit("/", 1)[-1].partition(".")[2]: tar.extractfile(m).read()
                   for m in tar.getmembers() if m.name.rsplit("/", 1)[-1].partition(".")[0] == first}
    assert len(list(decode_block(members, "ok", frozenset({"items"})))) > 0
    buf = io.BytesIO()
    np.save(buf, np.load(io.BytesIO(members["events.npy"]))[:-1], allow_pickle=False)
    with pytest.raises(ValueError, match="array lengths disagree"):
        list(decode_block({**members, "events.npy": buf.getvalue()}, "cut", frozenset({"items"})))


def test_tasks_declare_their_training_fields():
    """A task that does not declare its fields gets whole samples; a multi-task run reads the union."""
    from ecomtrain.tasks.base import MultiTask, Task
    from ecomtrain.tasks.next_item import NextItemTask

    nxt = NextItemTask(num_items=10, max_history=5)
    assert Task.train_fields(nxt) is None and nxt.train_fields() == {"items"}
    nxt.flags = {"channels": True}
    assert nxt.train_fields() == {"items", "channels"}

    class Undeclared(NextItemTask):
        def train_fields(self):
            return None

    multi = MultiTask.__new__(MultiTask)
    multi.tasks = [nxt, NextItemTask(num_items=10, max_history=5)]
    assert multi.train_fields() == {"items", "channels"}
    multi.tasks = [nxt, Undeclared(num_items=10, max_history=5)]
    assert multi.train_fields() is None


def test_schema_1_is_read_and_other_versions_ask_for_a_rebuild(both, tmp_path):
    import shutil

    _, js = both
    old = tmp_path / "old"
    shutil.copytree(js, old)
    m = build.load_manifest(old)  # accept path: a schema-1 (JSON) dataset still loads and trains
    assert m["schema_version"] == 1
    t = ShardStream(old, "train", m, lambda b: b, 8, mode="train")
    assert sum(1 for _ in t) == m["splits"]["train"]["num_samples"] // 8
    for v in (3, 0):
        mf = json.loads((old / "manifest.json").read_text())
        mf["schema_version"] = v
        (old / "manifest.json").write_text(json.dumps(mf))
        with pytest.raises(DataError, match=rf"manifest\.json: schema_version {v} is not supported \(this ecomtrain reads 1 and 2, writes 2\); rebuild"):
            build.load_manifest(old)


def _rewrite_member(src, dst, edit) -> None:
    """Copy tar ``src`` to ``dst`` with ``edit(name, data) -> data`` applied to each member."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w", format=tarfile.USTAR_FORMAT) as tout:
        for mem in tin:
            data = edit(mem.name, tin.extractfile(mem).read())
            mem.size = len(data)
            tout.addfile(mem, io.BytesIO(data))


def test_block_of_another_schema_is_a_rebuild_error_never_skipped(both, tmp_path):
    npy, _ = both
    m = build.load_manifest(npy)
    sh = m["splits"]["train"]["shards"][0]
    bad = tmp_path / sh["name"]

    def future(name, data):
        if name.endswith(".meta.json"):
            meta = json.loads(data)
            meta["schema_version"] = 3
            return json.dumps(meta).encode()
        return data

    _rewrite_member(npy / sh["name"], bad, future)
    with pytest.raises(ShardFormatError, match=r"block 's0000000000': schema_version 3 is not supported .*writes 2\); rebuild"):
        list(_iter_shard(bad))
    # the reader stops on it even when damaged shards may be skipped: skipping would lose the whole dataset quietly
    ds = tmp_path / "ds"
    ds.mkdir()
    bad.rename(ds / sh["name"])
    m1 = dict(m, splits={"train": {"num_samples": sh["num_samples"], "shards": [dict(sh, bytes=None, sha256=None)]}})
    with pytest.raises(ShardFormatError, match="rebuild"):
        list(ShardStream(ds, "train", m1, lambda b: b, 4, mode="train", max_corrupt_fraction=1.0))


def test_npy_member_holding_a_pickle_is_not_unpickled(both, tmp_path):
    npy, _ = both
    sh = build.load_manifest(npy)["splits"]["val"]["shards"][0]
    marker = tmp_path / "ran"

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    def evil(name, data):
        if name.endswith(".items.npy"):
            buf = io.BytesIO()
            np.save(buf, np.array([Boom()], dtype=object), allow_pickle=True)
            return buf.getvalue()
        return data

    _rewrite_member(npy / sh["name"], tmp_path / "evil.tar", evil)
    with pytest.raises(ValueError, match="allow_pickle"):
        list(_iter_shard(tmp_path / "evil.tar"))
    assert not marker.exists()


def test_npy_shards_respect_the_byte_limit(tmp_path, synth_raw):
    m = build.build(importers.load("synth", synth_raw), tmp_path / "o", shard_max_bytes=40_000, log=lambda *_: None)
    shards = [sh for s in m["splits"].values() for sh in s["shards"]]
    assert len(shards) > 6 and all(sh["bytes"] <= 40_000 for sh in shards if sh["num_samples"] > 1)
    assert {sh["bytes"] for sh in shards} == {(tmp_path / "o" / sh["name"]).stat().st_size for sh in shards}


def test_empty_timestamp_is_an_error_naming_the_row(tmp_path):
    f = tmp_path / "ev.csv"
    f.write_text("user,item,ts\n" + "".join(f"u{k % 3},i{k},{k}\n" for k in range(12)) + "u1,i9,\n")
    with pytest.raises(DataError, match=r"ev\.csv: column 'ts' row 13 is empty \(1 empty ts cell\(s\)\)"):
        build.build(importers.load("table", f), tmp_path / "o", log=lambda *_: None)


def test_task_and_inspect_readers_see_every_sample_of_both_formats(both):
    """The task code's own readers (baselines fitted on train, the field check before training,
    `data inspect --task` samples) decode npy blocks as well as JSON members: a reader that only
    looked for .json members would fit baselines on nothing."""
    from ecomtrain.tasks.base import _peek_fields
    from ecomtrain.tasks.common import iter_train_samples
    from ecomtrain.tasks.inspect import _val_samples

    for d in both:
        m = _manifest(d)
        train = list(iter_train_samples(str(d), m))
        assert len(train) == m["splits"]["train"]["num_samples"] > 20
        assert train == read_split(d, "train")
        assert set(_peek_fields(str(d), m)) >= {"user", "items", "events", "channels", "target"}
        assert _val_samples(d, m, 5) == read_split(d, "val")[:5]
