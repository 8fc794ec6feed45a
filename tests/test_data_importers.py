"""Each importer on small files written here in that source's exact format, and bad input."""

from __future__ import annotations

import json

import polars as pl
import pytest
from data_helpers import by_user, catalog, cli, decode, read_split

from ecomtrain.data import build, importers
from ecomtrain.data.importers import DataError


def _build(tmp_path, source, path, **kw):
    imp = importers.load(source, path, **{k: kw.pop(k) for k in ("columns", "items", "timestamp_format", "separator") if k in kw})
    out = tmp_path / f"out-{source}"
    m = build.build(imp, out, log=lambda *_: None, **kw)
    return out, m


def _test_targets(out) -> dict:
    return {u: decode(out, [s["target"]])[0] for u, s in by_user(read_split(out, "test")).items()}


# ------------------------------------------------------------------ seq
def test_seq_crlf_leave_one_out(tmp_path):
    f = tmp_path / "sequential_data.txt"
    f.write_bytes(b"1 5 6 7 8\r\n2 6 7 9\r\n3 5 9 10 11 12\r\n4 5 6\r\n")
    out, m = _build(tmp_path, "seq", f)
    assert (m["num_users"], m["num_items"]) == (3, 8)  # user 4 has 2 items: dropped
    test, val = by_user(read_split(out, "test")), by_user(read_split(out, "val"))
    assert decode(out, [test["3"]["target"]]) == ["12"] and decode(out, test["3"]["items"]) == ["5", "9", "10", "11"]
    assert decode(out, [val["3"]["target"]]) == ["11"] and decode(out, val["3"]["items"]) == ["5", "9", "10"]
    train = by_user(read_split(out, "train"))
    assert decode(out, train["3"]["items"]) == ["5", "9", "10"]
    # numeric ids keep numeric order: index i is item "i" when ids are 5..12
    assert decode(out, list(range(1, 9))) == ["5", "6", "7", "8", "9", "10", "11", "12"]


# ---------------------------------------------------------------- table
_ROWS = [  # visitor, sku, time, kind, app, amount -- ties at t=100 in file order Z, A
    ("u1", "Z", 100, "view", "app", None), ("u1", "A", 100, "view", "app", None),
    ("u1", "A", 100, "view", "app", None),  # exact duplicate: dropped
    ("u1", "B", 200, "cart", "web", 9.5), ("u1", "C", 300, "purchase", "web", 9.5),
    ("u2", "A", 50, "view", None, None), ("u2", "B", 60, "view", "app", None), ("u2", "C", 70, "view", "app", None),
    ("u2", "D", 80, "click", "app", None),
]
_COLS = ["visitor", "sku", "time", "kind", "app", "amount"]
_MAP = {"user": "visitor", "item": "sku", "ts": "time", "event": "kind", "channel": "app", "value": "amount"}


def _frame():
    return pl.DataFrame(_ROWS, schema=dict(zip(_COLS, [pl.Utf8, pl.Utf8, pl.Int64, pl.Utf8, pl.Utf8, pl.Float64])), orient="row")


@pytest.mark.parametrize("fmt", ["csv", "tsv", "parquet", "jsonl"])
def test_table_formats_mapping_ties_and_dedupe(tmp_path, fmt):
    df = _frame()
    f = tmp_path / f"events.{fmt}"
    {"csv": lambda: df.write_csv(f), "tsv": lambda: df.write_csv(f, separator="\t"),
     "parquet": lambda: df.write_parquet(f), "jsonl": lambda: df.write_ndjson(f)}[fmt]()
    out, m = _build(tmp_path, "table", f, columns=_MAP, collapse_repeats=False)
    assert m["stats"]["duplicates_dropped"] == 1
    test = by_user(read_split(out, "test"))
    # ties at t=100 stay in file order (Z before A), never sorted by item id
    assert decode(out, test["u1"]["items"]) == ["Z", "A", "B"] and decode(out, [test["u1"]["target"]]) == ["C"]
    assert m["stats"]["events_by_channel"]["app"] == 5 and m["channels"] == ["app", "web"]
    assert test["u1"]["channels"][:2] == [0, 0] and test["u2"]["channels"][0] == -1  # null channel -> -1
    assert m["event_types"][:2] == ["view", "click"]


def test_table_event_types_and_weights(tmp_path):
    f = tmp_path / "ev.csv"
    _frame().write_csv(f)
    out, m = _build(tmp_path, "table", f, columns=_MAP, event_types=["view", "click"], event_weights={"click": 3.0}, min_user_events=3)
    assert m["num_users"] == 1  # u1 keeps only 2 view positions (Z, A): dropped; u2 stays
    (s,) = read_split(out, "test")
    assert m["event_types"] == ["view", "click"] and s["target_event"] == 1 and s["target_weight"] == 3.0
    assert s["user"] == "u2" and s["weights"] == [1.0, 1.0, 1.0]


def test_table_datetime_strings(tmp_path):
    f = tmp_path / "ev.csv"
    f.write_text("user_id,item_id,timestamp\na,x,2024-01-01 10:00:00\na,y,2024-01-01 09:00:00\na,z,2024-01-02 00:00:00\n")
    out, _ = _build(tmp_path, "table", f, timestamp_format="%Y-%m-%d %H:%M:%S")
    (s,) = read_split(out, "test")
    assert decode(out, s["items"]) == ["y", "x"] and s["ts"][0] == 1704099600


# ----------------------------------------------------------- movielens
def test_movielens_1m_dat(tmp_path):
    (tmp_path / "ratings.dat").write_text("1::10::5::978300760\n1::20::3::978300761\n1::30::4::978300762\n2::20::4::978300000\n2::10::2::978300001\n2::30::5::978300002\n")
    (tmp_path / "movies.dat").write_bytes("10::Les Misérables (1995)::Drama|Musical\n20::Toy Story (1995)::Animation\n30::Heat (1995)::Action\n".encode("latin-1"))
    out, m = _build(tmp_path, "movielens", tmp_path)
    assert (m["num_users"], m["num_items"]) == (2, 3)
    assert _test_targets(out) == {"1": "30", "2": "30"}
    cat = catalog(out)
    assert cat["10"]["title"] == "Les Misérables (1995)" and cat["10"]["category"] == "Drama, Musical"
    assert read_split(out, "test")[0]["events"] == [0, 0] and m["event_types"] == ["rating"]


def test_movielens_100k(tmp_path):
    (tmp_path / "u.data").write_text("7\t1\t5\t881250949\n7\t2\t3\t881250950\n7\t3\t1\t881250951\n")
    flags = "|".join(["0"] * 19)
    (tmp_path / "u.item").write_text(f"1|Toy Story (1995)|01-Jan-1995||http://x|{flags[:-1]}1\n2|GoldenEye (1995)|01-Jan-1995||http://x|0|1{flags[3:]}\n3|Heat (1995)|01-Jan-1995||http://x|{flags}\n", encoding="latin-1")
    out, m = _build(tmp_path, "movielens", tmp_path / "u.data")
    assert _test_targets(out) == {"7": "3"}
    cat = catalog(out)
    assert cat["1"]["title"] == "Toy Story (1995)" and cat["1"]["category"] == "Western" and cat["2"]["category"] == "Action"


# ------------------------------------------------------ amazon reviews
def test_amazon_reviews_2023(tmp_path):
    rows = [
        {"rating": 5.0, "title": "ok", "text": "t", "images": [], "asin": "B1", "parent_asin": "P1", "user_id": "AG1", "timestamp": 1588687728923, "helpful_vote": 0, "verified_purchase": True},
        {"rating": 4.0, "title": "ok", "text": "t", "images": [], "asin": "B2", "parent_asin": "P2", "user_id": "AG1", "timestamp": 1588687728924, "helpful_vote": 1, "verified_purchase": True},
        {"rating": 3.0, "title": "ok", "text": "t", "images": [], "asin": "B3", "parent_asin": "P3", "user_id": "AG1", "timestamp": 1588687728925, "helpful_vote": 0, "verified_purchase": False},
    ]
    (tmp_path / "All_Beauty.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    meta = [
        {"main_category": "All Beauty", "title": "Lip Balm", "average_rating": 4.1, "rating_number": 10, "features": [], "description": [], "price": 12.99, "images": [], "videos": [], "store": "Acme", "categories": [], "details": {}, "parent_asin": "P1", "bought_together": None},
        {"main_category": "All Beauty", "title": "Mascara", "average_rating": 4.0, "rating_number": 3, "features": [], "description": [], "price": None, "images": [], "videos": [], "store": "Zed", "categories": [], "details": {}, "parent_asin": "P3", "bought_together": None},
    ]
    (tmp_path / "meta_All_Beauty.jsonl").write_text("".join(json.dumps(r) + "\n" for r in meta))
    out, m = _build(tmp_path, "amazon-reviews", tmp_path / "All_Beauty.jsonl")
    assert _test_targets(out) == {"AG1": "P3"}
    cat = catalog(out)
    assert (cat["P1"]["title"], cat["P1"]["brand"], cat["P1"]["price"], cat["P1"]["category"]) == ("Lip Balm", "Acme", 12.99, "All Beauty")
    assert cat["P3"]["price"] is None and cat["P2"]["title"] is None


# ------------------------------------------------------- retailrocket
def test_retailrocket(tmp_path):
    (tmp_path / "events.csv").write_text(
        "timestamp,visitorid,event,itemid,transactionid\n"
        "1433221332117,257597,view,355908,\n1433224214164,257597,addtocart,248676,\n"
        "1433221999827,257597,view,248676,\n1433223236124,257597,transaction,111,4000\n"
    )
    (tmp_path / "item_properties_part1.csv").write_text(
        "timestamp,itemid,property,value\n1435460400000,355908,categoryid,1173\n1439089200000,355908,categoryid,999\n1441508400000,248676,790,n5.000\n"
    )
    out, m = _build(tmp_path, "retailrocket", tmp_path, collapse_repeats=False)
    (s,) = read_split(out, "test")
    assert decode(out, s["items"]) == ["355908", "248676", "111"] and decode(out, [s["target"]]) == ["248676"]
    assert m["event_types"] == ["view", "cart", "purchase"] and s["target_event"] == 1
    assert catalog(out)["355908"]["category"] == "999"  # latest categoryid wins


# ------------------------------------------------------------- taobao
def test_taobao(tmp_path):
    (tmp_path / "UserBehavior.csv").write_text("1,2268318,2520377,pv,1511544070\n1,2333346,2520771,pv,1511561733\n1,2576651,149192,fav,1511572885\n1,3830808,4181361,buy,1511593493\n")
    out, m = _build(tmp_path, "taobao", tmp_path / "UserBehavior.csv")
    assert _test_targets(out) == {"1": "3830808"}
    assert m["event_types"] == ["view", "fav", "purchase"]
    assert catalog(out)["2576651"]["category"] == "149192"


# ------------------------------------------------------------- errors
def test_unknown_source_missing_file_cli(tmp_path):
    r = cli("data", "build", "--source", "movielen", "--input", str(tmp_path), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "unknown data source 'movielen'" in r.stderr and "did you mean 'movielens'" in r.stderr
    r = cli("data", "build", "--source", "table", "--input", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "input not found" in r.stderr and "nope.csv" in r.stderr


def test_missing_column(tmp_path):
    f = tmp_path / "ev.csv"
    f.write_text("visitor,sku\na,b\n")
    with pytest.raises(DataError, match=r"column 'when' \(mapped to ts\) not found"):
        importers.load("table", f, columns={"user": "visitor", "item": "sku", "ts": "when"})
    with pytest.raises(DataError, match="no user column found"):
        importers.load("table", f, columns={"item": "sku"})
    (tmp_path / "events.csv").write_text("timestamp,visitorid,itemid\n1,2,3\n")
    with pytest.raises(DataError, match="missing column 'event'"):
        importers.load("retailrocket", tmp_path / "events.csv")


def test_non_numeric_timestamp(tmp_path):
    f = tmp_path / "ev.csv"
    f.write_text("user,item,ts\na,x,10\na,y,yesterday\n")
    with pytest.raises(DataError, match=r"ev.csv: column 'ts' row 2: value 'yesterday' is not a number"):
        importers.load("table", f)
    r = cli("data", "build", "--source", "table", "--input", str(f), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "'yesterday' is not a number" in r.stderr


def test_empty_inputs(tmp_path):
    for name in ("empty.csv", "seq.txt"):
        (tmp_path / name).write_text("")
    with pytest.raises(DataError, match="empty"):
        importers.load("table", tmp_path / "empty.csv")
    with pytest.raises(DataError, match="empty"):
        importers.load("seq", tmp_path / "seq.txt")
    (tmp_path / "header.csv").write_text("user,item,ts\n")
    with pytest.raises(DataError, match="empty input"):
        importers.load("table", tmp_path / "header.csv")
    # events exist but no user has enough of them
    (tmp_path / "short.csv").write_text("user,item,ts\na,x,1\nb,y,2\n")
    imp = importers.load("table", tmp_path / "short.csv")
    with pytest.raises(DataError, match="no user has 3 or more events"):
        build.build(imp, tmp_path / "o", log=lambda *_: None)


def test_cli_flags_and_recipe_reach_the_build(tmp_path):
    f = tmp_path / "ev.tsv"
    _frame().write_csv(f, separator="\t")
    out = tmp_path / "cli"
    r = cli("data", "build", "--source", "table", "--input", str(f), "--out", str(out), "--columns",
            "user=visitor,item=sku,ts=time,event=kind,channel=app,value=amount", "--event-weights", "cart=2,purchase=4",
            "--session-gap", "1000", "--max-history", "10", "--no-collapse-repeats")
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["split"]["event_weights"] == {"cart": 2.0, "purchase": 4.0} and m["split"]["session_gap"] == 1000
    r = cli("data", "build", "--source", "table", "--input", str(f), "--out", str(out), "--columns", "user")
    assert r.returncode == 2 and "not KEY=VALUE" in r.stderr
    # the same options from a recipe, through the trainer's ensure_dataset
    from ecomtrain.config import Recipe
    from ecomtrain.train.runner import ensure_dataset

    cfg = Recipe.model_validate({"data": {"path": str(tmp_path / "rec"), "build": {
        "source": "table", "input": str(f), "columns": _MAP, "split": "temporal", "session_gap": 1000, "kcore_items": 1}}})
    m = ensure_dataset(cfg, log=lambda *_: None)
    assert m["split"]["method"] == "temporal" and m["split"]["session_gap"] == 1000 and m["source"]["source"] == "table"
