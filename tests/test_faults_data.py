"""Fault matrix, data rows: one bad input per row and its exact outcome.

    .venv/bin/python -m pytest tests/test_faults_data.py -q

Every row runs the real CLI in a subprocess (`python -m ecomtrain.cli`) on real
files and asserts the contract of docs/reliability.md ("Data inputs"): exit
status 2, stderr is exactly one line starting with "error:" that names the
file / column / shard, no traceback, and nothing previously written is lost:
DIR (a good dataset plus a user's unrelated files) is byte-identical afterwards
and no OUT.tmp-* / OUT.old-* folder is left beside it.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle  # noqa: S403 - only to *write* a hostile shard member; nothing here unpickles
import shutil
import tarfile
from pathlib import Path

import polars as pl
import pytest
from data_helpers import cli

from ecomtrain.data import build, importers, synth

# rows past the importers' eager probe (10,000 rows): the error must come from the build itself
N_BIG = 12_000


def _tree(d: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under d."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A good dataset (2 train shards) to copy into each row's DIR."""
    root = tmp_path_factory.mktemp("good")
    synth.write(root / "raw", num_users=60, num_items=30, num_categories=3, num_brands=5, seed=3)
    build.build(importers.load("synth", root / "raw"), root / "ds", shard_max_samples=40, log=lambda *_: None)
    return root / "ds"


def _big_rows(bad_at: int | None = None, bad: tuple = ()) -> list[tuple]:
    rows = [(f"u{n % 400}", f"i{n % 97}", str(1000 + n)) for n in range(N_BIG)]
    if bad_at is not None:
        rows[bad_at - 1] = bad
    return rows


def _csv(path: Path, header: str, rows: list[tuple], sep: str = ",") -> Path:
    path.write_text(header + "\n" + "".join(sep.join(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------ inputs
# Each maker gets a scratch folder (not DIR's parent) and returns (argv after --out DIR, names stderr must hold).
def bad_utf8_csv(t):
    f = t / "events.csv"
    f.write_bytes(b"user,item,ts\nu1,caf\xe9,1\nu1,b,2\n")
    return ["--source", "table", "--input", str(f)], ["events.csv", "UTF-8", "line 2"]


def bad_utf8_csv_late(t):
    f = _csv(t / "events.csv", "user,item,ts", _big_rows())
    f.write_bytes(f.read_bytes() + b"u1,\xff\xfe,99\n")
    return ["--source", "table", "--input", str(f)], ["events.csv", "UTF-8", f"line {N_BIG + 2}"]


def bad_utf8_tsv(t):
    f = t / "events.tsv"
    f.write_bytes(b"user\titem\tts\nu1\ta\t1\nu\xc3\x28\tb\t2\n")
    return ["--source", "table", "--input", str(f)], ["events.tsv", "UTF-8"]


def bad_utf8_jsonl(t):
    f = t / "events.jsonl"
    f.write_bytes(b'{"user": "u1", "item": "a", "ts": 1}\n{"user": "u\xff", "item": "b", "ts": 2}\n')
    return ["--source", "table", "--input", str(f)], ["events.jsonl", "UTF-8"]


def bad_ts_late(t):
    f = _csv(t / "events.csv", "user,item,ts", _big_rows(N_BIG - 7, ("u1", "i1", "yesterday")))
    return ["--source", "table", "--input", str(f)], ["events.csv", "column 'ts'", f"row {N_BIG - 7}", "yesterday"]


def bad_ts_format_late(t):
    rows = [(u, i, f"2024-01-01 00:00:{int(ts) % 60:02d}") for u, i, ts in _big_rows()]
    rows[N_BIG - 3] = ("u1", "i1", "01/02/2024")
    f = _csv(t / "events.csv", "user,item,ts", rows)
    return ["--source", "table", "--input", str(f), "--timestamp-format", "%Y-%m-%d %H:%M:%S"], \
        ["events.csv", "column 'ts'", f"row {N_BIG - 2}", "01/02/2024"]


def empty_item_cell(t):
    f = _csv(t / "events.csv", "user,item,ts", [("u1", "a", "1"), ("u1", "", "2"), ("u1", "c", "3")])
    return ["--source", "table", "--input", str(f)], ["events.csv", "column 'item' row 2", "empty"]


def empty_item_cell_late(t):
    f = _csv(t / "events.csv", "user,item,ts", _big_rows(N_BIG - 1, ("u1", "", "5")))
    return ["--source", "table", "--input", str(f)], ["events.csv", "column 'item'", f"row {N_BIG - 1}", "empty"]


def table_no_user_column(t):
    f = _csv(t / "events.csv", "who,item,ts", [("u1", "a", "1")])
    return ["--source", "table", "--input", str(f)], ["events.csv", "no user column"]


def table_mapped_column_missing(t):
    f = _csv(t / "events.csv", "user,item,ts", [("u1", "a", "1")])
    return ["--source", "table", "--input", str(f), "--columns", "user=visitor"], ["events.csv", "'visitor'"]


def jsonl_broken_line(t):
    f = t / "events.jsonl"
    f.write_text("".join(json.dumps({"user": f"u{n % 50}", "item": f"i{n % 9}", "ts": n}) + "\n" for n in range(200)) + '{"user": "u1", "item": \n')
    return ["--source", "table", "--input", str(f)], ["events.jsonl", "line 201", "not valid JSON"]


def synth_missing_column(t):
    d = t / "raw"
    synth.write(d, num_users=40, num_items=20, num_categories=3, num_brands=5, seed=0)
    pl.read_parquet(d / "events.parquet").drop("timestamp").write_parquet(d / "events.parquet")
    return ["--source", "synth", "--input", str(d)], ["events.parquet", "missing column 'timestamp'"]


def synth_no_events(t):
    (t / "raw").mkdir()
    return ["--source", "synth", "--input", str(t / "raw")], ["events.parquet", "not found"]


def seq_bad_utf8(t):
    f = t / "seq.txt"
    f.write_bytes(b"u1 a b c\nu2 a \xff c\n")
    return ["--source", "seq", "--input", str(f)], ["seq.txt", "UTF-8", "line 2"]


def seq_empty(t):
    (t / "seq.txt").write_text("")
    return ["--source", "seq", "--input", str(t / "seq.txt")], ["seq.txt", "empty"]


def movielens_bad_rating_late(t):
    rows = [f"{n % 300 + 1}::{n % 77 + 1}::4::{978300000 + n}" for n in range(N_BIG)]
    rows[N_BIG - 10] = "5::6::five::978300001"
    (t / "ratings.dat").write_text("\n".join(rows) + "\n")
    return ["--source", "movielens", "--input", str(t)], ["ratings.dat", "column 'value'", f"row {N_BIG - 9}", "five"]


def movielens_csv_no_movie_column(t):
    _csv(t / "ratings.csv", "userId,film,rating,timestamp", [("1", "2", "4", "9")])
    return ["--source", "movielens", "--input", str(t)], ["ratings.csv", "'item'"]


def amazon_missing_timestamp(t):
    f = t / "All_Beauty.jsonl"
    f.write_text(json.dumps({"user_id": "A", "parent_asin": "P", "rating": 5.0}) + "\n")
    return ["--source", "amazon-reviews", "--input", str(f)], ["All_Beauty.jsonl", "'timestamp'"]


def amazon_broken_json(t):
    f = t / "All_Beauty.jsonl"
    good = "".join(json.dumps({"user_id": f"A{n % 40}", "parent_asin": f"P{n % 7}", "rating": 5.0, "timestamp": n}) + "\n" for n in range(300))
    f.write_text(good + '{"user_id": "A1", "parent_asin": "P1", "rating": 5.0, "timestamp": \n')
    return ["--source", "amazon-reviews", "--input", str(f)], ["All_Beauty.jsonl", "line 301", "not valid JSON"]


def retailrocket_missing_column(t):
    _csv(t / "events.csv", "timestamp,visitorid,event", [("1", "2", "view")])
    return ["--source", "retailrocket", "--input", str(t)], ["events.csv", "'itemid'"]


def retailrocket_bad_timestamp_late(t):
    rows = [(str(1433221332117 + n), str(n % 300), "view", str(n % 50), "") for n in range(N_BIG)]
    rows[N_BIG - 5] = ("noon", "7", "view", "3", "")
    _csv(t / "events.csv", "timestamp,visitorid,event,itemid,transactionid", rows)
    return ["--source", "retailrocket", "--input", str(t)], ["events.csv", "column 'ts'", f"row {N_BIG - 4}", "noon"]


def taobao_four_columns(t):
    (t / "UserBehavior.csv").write_text("1,2,3,pv\n1,3,3,pv\n")
    return ["--source", "taobao", "--input", str(t)], ["UserBehavior.csv", "expected 5 columns"]


def taobao_bad_utf8(t):
    (t / "UserBehavior.csv").write_bytes(b"1,2,3,pv,1511544070\n1,\xe9,3,pv,1511544071\n")
    return ["--source", "taobao", "--input", str(t)], ["UserBehavior.csv", "UTF-8", "line 2"]


# ----------------------------------------------------------------- catalogs
def _events_csv(t: Path) -> Path:
    return _csv(t / "events.csv", "user,item,ts", [(f"u{u}", f"i{(u + k) % 6}", str(k)) for u in range(10) for k in range(4)])


def catalog_duplicate_id(t):
    ev = _events_csv(t)
    _csv(t / "catalog.csv", "item,title", [("i0", "a"), ("i1", "b"), ("i0", "c")])
    return ["--source", "table", "--input", str(ev), "--items", str(t / "catalog.csv")], \
        ["catalog.csv", "duplicate item id 'i0'", "rows 1, 3"]


def catalog_no_item_column(t):
    ev = _events_csv(t)
    _csv(t / "catalog.csv", "name,title", [("i0", "a")])
    return ["--source", "table", "--input", str(ev), "--items", str(t / "catalog.csv")], ["catalog.csv", "no item column"]


def catalog_unknown_ids(t):
    ev = _events_csv(t)
    _csv(t / "catalog.csv", "item,title", [("sku-9", "a"), ("sku-8", "b")])
    return ["--source", "table", "--input", str(ev), "--items", str(t / "catalog.csv")], \
        ["catalog.csv", "none of the catalog's item ids occur in the events"]


def catalog_empty_id(t):
    ev = _events_csv(t)
    _csv(t / "catalog.csv", "item,title", [("i0", "a"), ("", "b")])
    return ["--source", "table", "--input", str(ev), "--items", str(t / "catalog.csv")], ["catalog.csv", "row 2", "empty item id"]


def catalog_missing_file(t):
    ev = _events_csv(t)
    return ["--source", "table", "--input", str(ev), "--items", str(t / "nope.csv")], ["nope.csv", "not found"]


def synth_catalog_duplicate(t):
    d = t / "raw"
    synth.write(d, num_users=40, num_items=20, num_categories=3, num_brands=5, seed=0)
    cat = pl.read_parquet(d / "items.parquet")
    pl.concat([cat, cat.head(1)]).write_parquet(d / "items.parquet")
    return ["--source", "synth", "--input", str(d)], ["items.parquet", "duplicate item id"]


# ----------------------------------------------------------------- options / DIR
def bad_option_value(t):
    return ["--source", "seq", "--input", str(t), "--max-history", "0"], ["max_history", "greater than 1"]


def foreign_shard_named_file(t):
    # DIR gets a user's archive named like a shard that manifest.json does not list
    return ["--source", "synth", "--input", str(t), "FOREIGN"], ["train-000099.tar", "not part of the dataset"]


BUILD_ROWS = [
    bad_utf8_csv, bad_utf8_csv_late, bad_utf8_tsv, bad_utf8_jsonl, bad_ts_late, bad_ts_format_late, empty_item_cell,
    empty_item_cell_late, table_no_user_column, table_mapped_column_missing, jsonl_broken_line, synth_missing_column,
    synth_no_events, seq_bad_utf8, seq_empty, movielens_bad_rating_late, movielens_csv_no_movie_column,
    amazon_missing_timestamp, amazon_broken_json, retailrocket_missing_column, retailrocket_bad_timestamp_late,
    taobao_four_columns, taobao_bad_utf8, catalog_duplicate_id, catalog_no_item_column, catalog_unknown_ids,
    catalog_empty_id, catalog_missing_file, synth_catalog_duplicate, bad_option_value, foreign_shard_named_file,
]


def _assert_one_line_error(r, names: list[str]) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in names:
        assert n in lines[0], (n, lines[0])


def _dir_with_user_files(good: Path, parent: Path) -> Path:
    d = parent / "ds"
    shutil.copytree(good, d)
    (d / "notes.txt").write_text("a user's file next to the dataset\n")
    with tarfile.open(d / "backup.tar", "w") as tar:  # a user's unrelated archive
        ti = tarfile.TarInfo("x.txt")
        ti.size = 3
        tar.addfile(ti, io.BytesIO(b"abc"))
    return d


@pytest.mark.parametrize("row", BUILD_ROWS, ids=lambda f: f.__name__)
def test_build_fault(row, good, tmp_path):
    scratch = tmp_path / "in"
    scratch.mkdir()
    args, names = row(scratch)
    parent = tmp_path / "data"
    parent.mkdir()
    d = _dir_with_user_files(good, parent)
    if "FOREIGN" in args:
        args = [a for a in args if a != "FOREIGN"]
        synth.write(scratch, num_users=40, num_items=20, num_categories=3, num_brands=5, seed=0)
        (d / "train-000099.tar").write_bytes((d / "backup.tar").read_bytes())
    before = _tree(d)
    r = cli("data", "build", "--out", str(d), *args, env={"ECOMTRAIN_PSEUDONYM_KEY": ""})
    _assert_one_line_error(r, names)
    assert _tree(d) == before, "a failed build changed DIR"
    assert sorted(p.name for p in parent.iterdir()) == ["ds"], "a failed build left folders beside DIR"
    assert cli("data", "inspect", str(d)).returncode == 0


# ------------------------------------------------------------------- shards
def _manifest(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


def _first_shard(d: Path, split: str = "train") -> Path:
    return d / _manifest(d)["splits"][split]["shards"][0]["name"]


def shard_truncated(d):
    p = _first_shard(d)
    p.write_bytes(p.read_bytes()[:700])
    return [], [p.name, "700 bytes", "truncated"]


def shard_wrong_sha256(d):
    p = _first_shard(d, "val")
    data = bytearray(p.read_bytes())
    data[600] ^= 0x01  # one bit inside the first JSON member
    p.write_bytes(bytes(data))
    return [], [p.name, "sha256 differs"]


class _Boom:
    def __reduce__(self):
        return (Path("PWNED").touch, ())


def shard_pickle_member(d):
    # a hostile shard whose manifest entry is consistent (right sha256, size, count): only the member type gives it away
    p = _first_shard(d)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in (("s0.pickle", pickle.dumps(_Boom())), ("s0.json", b'{"items": [1, 2]}')):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    p.write_bytes(buf.getvalue())
    m = _manifest(d)
    sh = m["splits"]["train"]["shards"][0]
    sh.update(sha256=hashlib.sha256(p.read_bytes()).hexdigest(), bytes=p.stat().st_size)
    (d / "manifest.json").write_text(json.dumps(m))
    return [], [p.name, "pickle is refused"]


def shard_missing(d):
    p = _first_shard(d, "test")
    p.unlink()
    return [], [p.name, "missing"]


def split_empty_for_one_rank(d):
    m = _manifest(d)
    n = m["splits"]["train"]["num_samples"]
    return ["--ranks", str(n + 1)], ["split 'train' is empty", f"{n} sample(s)"]


def manifest_not_json(d):
    (d / "manifest.json").write_text('{"schema_version": 1, ')
    return [], ["manifest.json", "not valid JSON"]


def no_manifest(d):
    (d / "manifest.json").unlink()
    return [], ["no manifest.json", str(d)]


SHARD_ROWS = [shard_truncated, shard_wrong_sha256, shard_pickle_member, shard_missing, split_empty_for_one_rank,
              manifest_not_json, no_manifest]


@pytest.mark.parametrize("row", SHARD_ROWS, ids=lambda f: f.__name__)
def test_shard_fault(row, good, tmp_path):
    d = _dir_with_user_files(good, tmp_path)
    extra, names = row(d)
    before = _tree(d)
    r = cli("data", "inspect", str(d), *extra)
    _assert_one_line_error(r, names)
    assert _tree(d) == before
    assert not Path("PWNED").exists()


def test_stream_refuses_pickle_and_names_missing_shard(good, tmp_path):
    """The training reader (ShardStream) gives the same refusals as `data inspect`."""
    from ecomtrain.data.importers import DataError
    from ecomtrain.data.stream import ShardStream

    d = _dir_with_user_files(good, tmp_path)
    shard_pickle_member(d)
    s = ShardStream(d, "train", _manifest(d), collate=lambda b: b, batch_size=2, max_corrupt_fraction=1.0)
    with pytest.raises(DataError, match=r"train-000000\.tar: member 's0\.pickle'.*pickle is refused"):
        list(s)
    assert not Path("PWNED").exists()
    name = shard_missing(d)[1][0]
    with pytest.raises(DataError, match=f"shard '{name}' listed in manifest.json is missing"):
        ShardStream(d, "test", _manifest(d), collate=lambda b: b, batch_size=2, mode="eval")


def test_matrix_size():
    assert len(BUILD_ROWS) + len(SHARD_ROWS) >= 20


def shard_digit_altered(d):
    """One item id inside a sample changed: still a valid .npy and tar, same size; only the sha256 tells."""
    p = _first_shard(d, "val")
    data = bytearray(p.read_bytes())
    at = data.index(b"\x93NUMPY", data.index(b".items.npy"))  # the items array of the first block
    i = at + 10 + int.from_bytes(data[at + 8:at + 10], "little")  # first value, after the .npy header
    data[i] ^= 1
    p.write_bytes(bytes(data))
    return [], [p.name, "sha256 differs"]


@pytest.mark.parametrize("row", [shard_truncated, shard_digit_altered], ids=lambda f: f.__name__)
def test_stream_names_a_damaged_shard(row, good, tmp_path):
    """The training reader fails on a truncated or altered shard with one line naming it (default max_corrupt_fraction=0)."""
    from ecomtrain.data.importers import DataError
    from ecomtrain.data.stream import ShardStream

    d = _dir_with_user_files(good, tmp_path)
    split = "val" if row is shard_digit_altered else "train"
    names = row(d)[1]
    s = ShardStream(d, split, _manifest(d), collate=lambda b: {"n": len(b)}, batch_size=4, mode="eval")
    with pytest.raises(DataError) as e:
        list(s)
    msg = str(e.value)
    assert names[0] in msg and "\n" not in msg and ("sha256 differs" in msg if row is shard_digit_altered else "truncated" in msg), msg
