import polars as pl

from ecomtrain.data import synth


def test_deterministic_and_seed_sensitive():
    a, ia = synth.generate(num_users=60, num_items=40, seed=3)
    b, ib = synth.generate(num_users=60, num_items=40, seed=3)
    c, _ = synth.generate(num_users=60, num_items=40, seed=4)
    assert a.equals(b) and ia.equals(ib)
    assert not a.equals(c)


def test_realistic_shape():
    ev, items = synth.generate(num_users=400, num_items=120, seed=0)
    assert set(items.columns) >= {"item_id", "title", "category", "brand", "price"}
    assert items["price"].min() > 0 and items["title"].n_unique() > 100
    counts = dict(ev.group_by("event_type").len().iter_rows())
    # funnel: each stage is rarer than the one before
    assert counts["view"] > counts["click"] > counts["cart"] > counts["purchase"] > 0
    assert ev["channel"].n_unique() >= 2
    # timestamps are chronological within each user's log
    assert ev.group_by("user_id").agg(ok=pl.col("timestamp").diff().drop_nulls().min() >= 0)["ok"].all()
    # repeat purchases: some (user, item) pairs are bought more than once
    buys = ev.filter(pl.col("event_type") == "purchase").group_by("user_id", "item_id").len()
    assert buys.filter(pl.col("len") > 1).height > 0
    # Zipf-like popularity: the top 10% of items get far more than 10% of views
    views = ev.filter(pl.col("event_type") == "view").group_by("item_id").len().sort("len", descending=True)
    top = views.head(len(views) // 10)["len"].sum() / views["len"].sum()
    assert top > 0.3


def test_write(tmp_path):
    s = synth.write(tmp_path, num_users=30, num_items=20, seed=0)
    assert (tmp_path / "events.parquet").is_file() and (tmp_path / "items.parquet").is_file()
    assert s["users"] == 30 and s["items"] == 20
