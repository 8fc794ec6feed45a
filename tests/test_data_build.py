"""Cleaning, splits, leakage check, pseudonymisation, partitions and inspect on real shards."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from data_helpers import by_user, cli, decode, read_split

from ecomtrain.config import BuildConfig
from ecomtrain.data import build, importers, synth
from ecomtrain.data.importers import DataError
from ecomtrain.data.samples import check_leakage, make_records, split_points

BEAUTY = Path(__file__).resolve().parents[2] / "shared" / "data" / "amazon-beauty" / "sequential_data.txt"  # ../shared


def _table(tmp_path, rows, name="ev.csv"):
    f = tmp_path / name
    pl.DataFrame(rows, schema=["user", "item", "ts"], orient="row").write_csv(f)
    return importers.load("table", f)


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    synth.write(d, num_users=200, num_items=80)
    return d


def test_kcore_is_iterative(tmp_path):
    # k=3: item r (2 events) goes; user c falls to 2 events and goes; that leaves item s
    # with 2 events, so it goes in round 2, and then user d (s, s, z) falls to 1.
    rows = [("a", i, t) for t, i in enumerate("xyzx")] + [("b", i, t) for t, i in enumerate("xyzy")]
    rows += [("c", i, t) for t, i in enumerate(["x", "s", "r"])] + [("d", i, t) for t, i in enumerate(["s", "s", "z"])]
    rows += [("e", i, t) for t, i in enumerate(["r", "x", "y", "z"])]
    m = build.build(_table(tmp_path, rows), tmp_path / "o", kcore_users=3, kcore_items=3, collapse_repeats=False, log=lambda *_: None)
    users = {s["user"] for s in read_split(tmp_path / "o", "test")}
    assert users == {"a", "b", "e"} and m["num_items"] == 3  # r, s gone; e keeps x, y, z


def test_temporal_split_is_global_and_leak_free(tmp_path, raw):
    out = tmp_path / "t"
    m = build.build(importers.load("synth", raw), out, split="temporal", temporal_val_fraction=0.15, temporal_test_fraction=0.15, log=lambda *_: None)
    tv, tt = m["split"]["val_from_ts"], m["split"]["test_from_ts"]
    assert tv < tt
    train, val, test = (read_split(out, s) for s in ("train", "val", "test"))
    assert all(max(s["ts"]) < tv for s in train)
    assert all(tv <= s["target_ts"] < tt and max(s["ts"]) < tv for s in val)
    assert all(s["target_ts"] >= tt and max(s["ts"]) < tt for s in test)
    assert len(val) > 20 and len(test) > 20


def test_leakage_check_catches_planted_leak():
    import dataclasses

    import numpy as np

    from ecomtrain.data.seqs import Seqs

    n = 5
    s = Seqs(pl.Series(["u"]), np.array([0, n]), np.arange(1, n + 1, dtype=np.int32), np.zeros(n, np.int32), np.zeros(n, np.int32),
             np.arange(1, n + 1, dtype=np.int64), np.full(n, np.nan), None)
    T, V, S = split_points(s, "leave_one_out", None, None)
    recs = make_records(T, V, S, 10, np.arange(1))
    check_leakage(recs, s, T)  # the real split passes
    leaky = dict(recs, train=dataclasses.replace(recs["train"], end=np.array([5])))
    with pytest.raises(DataError, match="training input contains the (val|test) target"):
        check_leakage(leaky, s, T)
    bad_eval = dict(recs, test=dataclasses.replace(recs["test"], end=recs["test"].tgt + 1))
    with pytest.raises(DataError, match="history includes the target"):
        check_leakage(bad_eval, s, T)
    late = dataclasses.replace(s, ts=np.array([1, 2, 9, 4, 5]))  # a training event after the val target's time
    with pytest.raises(DataError, match="training events later than their val target"):
        check_leakage(recs, late, T)


def test_pseudonymised_ids_appear_nowhere(tmp_path, monkeypatch, capfd):
    rows = [(f"RAWUSER{u:03d}", f"it{(u + t) % 7}", t) for u in range(20) for t in range(5)]
    imp = _table(tmp_path, rows)
    monkeypatch.delenv("ECOMTRAIN_PSEUDONYM_KEY", raising=False)
    with pytest.raises(DataError, match="ECOMTRAIN_PSEUDONYM_KEY"):
        build.build(imp, tmp_path / "o", pseudonymise_users=True)
    monkeypatch.setenv("ECOMTRAIN_PSEUDONYM_KEY", "s3cret-key")
    logs: list[str] = []
    out = tmp_path / "o"
    m = build.build(imp, out, pseudonymise_users=True, partition_events=30, log=lambda *a: logs.append(" ".join(map(str, a))))
    assert m["privacy"]["user_ids"] == "hmac-sha256" and m["num_users"] == 20
    files = [p for p in out.rglob("*") if p.is_file()]
    assert not (out / ".work").exists() and len(files) >= 5
    for p in files:
        assert b"RAWUSER" not in p.read_bytes(), p
        assert b"s3cret-key" not in p.read_bytes(), p
    cap = capfd.readouterr()
    assert "RAWUSER" not in "\n".join(logs) + cap.out + cap.err
    # keyed and deterministic: same key -> same pseudonyms, other key -> others
    first = {s["user"] for s in read_split(out, "test")}
    build.build(imp, tmp_path / "o2", pseudonymise_users=True, log=lambda *_: None)
    assert {s["user"] for s in read_split(tmp_path / "o2", "test")} == first
    monkeypatch.setenv("ECOMTRAIN_PSEUDONYM_KEY", "other")
    build.build(imp, tmp_path / "o3", pseudonymise_users=True, log=lambda *_: None)
    assert not first & {s["user"] for s in read_split(tmp_path / "o3", "test")}


def test_sessions_and_history_windows(tmp_path):
    ts = [0, 10, 20, 5000, 5010, 9000, 9005, 9010, 9020, 9030]
    rows = [("u", f"i{k}", t) for k, t in enumerate(ts)]
    out = tmp_path / "o"
    build.build(_table(tmp_path, rows), out, session_gap=1000, max_history=3, log=lambda *_: None)
    (test,) = read_split(out, "test")
    # sessions: [0, 10, 20] 0, [5000, 5010] 1, [9000 ...] 2; test history = last 3 of 9 positions
    assert test["sessions"] == [2, 2, 2] and test["ts"] == [9005, 9010, 9020] and test["target_ts"] == 9030
    windows = sorted((s["ts"][0], s["ts"][-1]) for s in read_split(out, "train"))
    # training input = positions 0..7 in windows of <= 3 ending at 8, 5, 2
    assert windows == [(0, 10), (20, 5010), (9000, 9010)]
    assert [s["sessions"] for s in sorted(read_split(out, "train"), key=lambda s: s["ts"][0])][0] == [0, 0]


def test_partitions_do_not_change_samples(tmp_path, raw):
    def content(out):
        return {s: sorted(json.dumps(x, sort_keys=True) for x in read_split(out, s)) for s in ("train", "val", "test")}

    one = build.build(importers.load("synth", raw), tmp_path / "one", log=lambda *_: None)
    many = build.build(importers.load("synth", raw), tmp_path / "many", partition_events=1000, shard_max_samples=40, log=lambda *_: None)
    assert many["stats"]["partitions"] > 4 and len(many["splits"]["train"]["shards"]) > 4
    assert content(tmp_path / "one") == content(tmp_path / "many")
    assert one["stats"]["history_length"] == many["stats"]["history_length"]


def test_inspect_validates_and_fails_on_mismatch(tmp_path, raw):
    out = tmp_path / "o"
    build.build(importers.load("synth", raw), out, shard_max_samples=50, log=lambda *_: None)
    r = cli("data", "inspect", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    for word in ("users", "events by type", "events by channel", "history length", "p50", "train", "OK"):
        assert word in r.stdout
    victim = out / "train-000001.tar"
    data = bytearray(victim.read_bytes())
    data[600] ^= 0xFF
    victim.write_bytes(bytes(data))
    r = cli("data", "inspect", str(out))
    assert r.returncode == 2 and "train-000001.tar: sha256 differs" in r.stdout
    assert r.stderr.startswith("error: ") and "train-000001.tar" in r.stderr and r.stderr.count("\n") == 1
    m = json.loads((out / "manifest.json").read_text())
    m["splits"]["val"]["shards"][0]["num_samples"] += 1
    (out / "manifest.json").write_text(json.dumps(m))
    r = cli("data", "inspect", str(out))
    assert r.returncode == 2 and "val-000000.tar" in r.stdout and "manifest.json says" in r.stdout


def test_build_options_have_one_definition():
    """Every BuildConfig field is a `data build` flag with the schema's help and default, and build() validates through it."""
    from ecomtrain.cli import _build_config, parser

    b = parser()._subparsers._group_actions[0].choices["data"]._subparsers._group_actions[0].choices["build"]
    actions = {a.dest: a for a in b._actions}
    for name, field in BuildConfig.model_fields.items():
        if name == "synth":
            continue
        assert name in actions, name
        assert field.description.rstrip(".")[:30] in actions[name].help.replace("%%", "%"), name
    # nothing but --out and --help beyond the schema
    assert set(actions) - set(BuildConfig.model_fields) == {"out", "help"}
    # unset flags give exactly the schema's defaults; set ones are converted by the schema
    a = b.parse_args(["--out", "x", "--min-user-events", "5", "--no-collapse-repeats", "--event-weights", "cart=2",
                      "--event-types", "view,cart", "--split", "temporal"])
    got = _build_config(a)
    assert got == BuildConfig(min_user_events=5, collapse_repeats=False, event_weights={"cart": 2.0},
                              event_types=["view", "cart"], split="temporal")
    assert _build_config(b.parse_args(["--out", "x"])) == BuildConfig()
    # build() takes the validated config: a bad value is refused before any work
    with pytest.raises(DataError, match="max_history"):
        build.build(None, "never-written", max_history=0)
    assert not Path("never-written").exists()


@pytest.mark.skipif(not BEAUTY.is_file(), reason="shared Amazon Beauty file not present")
def test_amazon_beauty_acceptance(tmp_path):
    out = tmp_path / "beauty"
    r = cli("data", "build", "--source", "seq", "--input", str(BEAUTY), "--out", str(out))
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert (m["num_users"], m["num_items"], m["splits"]["test"]["num_samples"]) == (22363, 12101, 22363)
    assert cli("data", "inspect", str(out)).returncode == 0
    # the standard protocol: test target = last item of the line, val = second to last
    first = BEAUTY.read_text().splitlines()[0].split()
    t = by_user(read_split(out, "test"))[first[0]]
    assert decode(out, [t["target"]]) == [first[-1]] and decode(out, t["items"]) == first[1:-1][-200:]
