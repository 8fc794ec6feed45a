import json

import polars as pl
import pytest

from ecomtrain.data import build, importers
from ecomtrain.data.stream import _iter_shard


def _samples(root, split, manifest):
    out = []
    for sh in manifest["splits"][split]["shards"]:
        out.extend(_iter_shard(root / sh["name"]))
    return out


def test_manifest_contract(tiny_dataset):
    m = json.loads((tiny_dataset / "manifest.json").read_text())
    assert m["schema_version"] == build.SCHEMA_VERSION
    assert m["num_users"] > 0 and m["num_items"] > 0
    for split in ("train", "val", "test"):
        info = m["splits"][split]
        assert info["num_samples"] == sum(s["num_samples"] for s in info["shards"])
        for sh in info["shards"]:
            assert build.sha256_file(tiny_dataset / sh["name"]) == sh["sha256"]
    assert m["splits"]["test"]["num_samples"] == m["num_users"] == m["splits"]["val"]["num_samples"]
    items = pl.read_parquet(tiny_dataset / "items.parquet")
    assert items["idx"].to_list() == list(range(1, m["num_items"] + 1))
    assert {"title", "category", "brand", "price", "train_count"} <= set(items.columns)


def test_leave_one_out_is_consistent(tiny_dataset):
    m = build.load_manifest(tiny_dataset)
    val = {s["user"]: s for s in _samples(tiny_dataset, "val", m)}
    test = {s["user"]: s for s in _samples(tiny_dataset, "test", m)}
    train = {}
    for s in _samples(tiny_dataset, "train", m):
        train.setdefault(s["user"], []).append(s)
    assert set(val) == set(test)
    for u, t in test.items():
        v = val[u]
        # test input = val input + val target; targets never inside the training input
        assert t["items"][-len(v["items"]) - 1 : -1] == v["items"][-len(t["items"]) + 1 :] or len(v["items"]) == 0
        assert t["items"][-1] == v["target"]
        for s in train.get(u, []):
            assert s["ts"][-1] <= v["target_ts"] <= t["target_ts"]
            assert s["items"] == v["items"][-len(s["items"]):]


def test_seq_importer_crlf_and_order(tmp_path):
    f = tmp_path / "seq.txt"
    f.write_bytes(b"u1 5 3 9 3\r\nu2 7 8 9\r\nu3 1 2\r\n")
    m = build.build(importers.load("seq", f), tmp_path / "out", log=lambda *_: None)
    assert m["num_users"] == 2  # u3 has 2 items: too short for leave-one-out
    items = pl.read_parquet(tmp_path / "out" / "items.parquet")
    idx = dict(zip(items["item"], items["idx"]))
    test = {s["user"]: s for s in _samples(tmp_path / "out", "test", m)}
    assert test["u1"]["items"] == [idx["5"], idx["3"], idx["9"]] and test["u1"]["target"] == idx["3"]


def test_bad_inputs_have_clear_errors(tmp_path):
    with pytest.raises(importers.DataError, match="unknown data source 'sqe'; did you mean 'seq'"):
        importers.load("sqe", tmp_path)
    with pytest.raises(importers.DataError, match="input not found"):
        importers.load("seq", tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("u1 1\n")
    with pytest.raises(importers.DataError, match="nothing to build"):
        build.build(importers.load("seq", empty), tmp_path / "o", log=lambda *_: None)
    with pytest.raises(importers.DataError, match="no manifest.json"):
        build.load_manifest(tmp_path / "nowhere")
