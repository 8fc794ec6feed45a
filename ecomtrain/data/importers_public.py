"""Importers for public data sets, in their published file formats.

- ``movielens``: ML-1M/10M ``ratings.dat`` (``u::i::r::t``) + ``movies.dat``;
  ML-100K ``u.data`` (tab) + ``u.item`` (``|``, 19 genre flags); ML-latest
  ``ratings.csv`` + ``movies.csv``. Input: the folder or the ratings file.
- ``amazon-reviews``: Amazon Reviews 2023 review JSONL (user_id, parent_asin,
  rating, timestamp ms) + ``meta_*.jsonl`` (title, main_category, store, price).
- ``retailrocket``: ``events.csv`` (timestamp ms, visitorid, event, itemid,
  transactionid) + optional ``item_properties_part*.csv`` (categoryid).
- ``taobao``: ``UserBehavior.csv`` (user, item, category, behavior, ts; no header).

Event names are mapped onto the funnel vocabulary (view, click, cart,
purchase, fav); timestamps stay in the unit the data set uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import polars as pl

from .importers import DataError, Imported, imported, register, scan_table

_ML_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
    "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
]


def _find(path: Path, *names: str) -> Optional[Path]:
    for n in names:
        if (path / n).is_file():
            return path / n
    return None


def _split_lines(path: Path, sep: str, cols: list[str]) -> pl.LazyFrame:
    """Lines split on a multi-byte separator (polars' CSV reader takes one byte)."""
    lines = pl.scan_csv(path, has_header=False, separator="\x1f", quote_char=None, new_columns=["line"],
                        schema_overrides={"line": pl.Utf8}, encoding="utf8-lossy")
    parts = pl.col("line").str.strip_chars().str.split(sep)
    return lines.select([parts.list.get(i, null_on_oob=True).alias(c) for i, c in enumerate(cols)])


def _read_latin1(path: Path) -> list[str]:
    # MovieLens title files are ISO-8859-1 (e.g. "Misérables")
    return path.read_text(encoding="latin-1").splitlines()


@register("movielens")
def import_movielens(path: Path, **_) -> Imported:
    folder = path if path.is_dir() else path.parent
    ratings = path if path.is_file() else _find(folder, "ratings.dat", "u.data", "ratings.csv")
    if ratings is None:
        raise DataError(f"movielens: no ratings.dat, u.data or ratings.csv in {folder}")
    if ratings.stat().st_size == 0:
        raise DataError(f"{ratings}: empty file")
    name = ratings.name
    if name.endswith(".dat"):
        lf = _split_lines(ratings, "::", ["user", "item", "value", "ts"])
    elif name == "u.data" or name.endswith(".data"):
        lf = pl.scan_csv(ratings, has_header=False, separator="\t", new_columns=["user", "item", "value", "ts"], infer_schema=False)
    else:
        lf = pl.scan_csv(ratings, infer_schema=False).rename(
            {"userId": "user", "movieId": "item", "rating": "value", "timestamp": "ts"}, strict=False)
    lf = lf.with_columns(event=pl.lit("rating"))
    items = None
    movies = _find(folder, "movies.dat", "u.item", "movies.csv")
    if movies is not None:
        rows = []
        if movies.name == "movies.dat":
            for line in _read_latin1(movies):
                if line.strip():
                    mid, title, genres = (line.split("::") + ["", ""])[:3]
                    rows.append((mid, title, genres.replace("|", ", ")))
        elif movies.name == "u.item":
            for line in _read_latin1(movies):
                f = line.split("|")
                if len(f) >= 24:
                    genres = [g for g, flag in zip(_ML_GENRES, f[5:24]) if flag == "1"]
                    rows.append((f[0], f[1], ", ".join(genres)))
        else:
            df = pl.read_csv(movies, schema_overrides={"movieId": pl.Utf8})
            rows = list(zip(df["movieId"], df["title"], df["genres"].str.replace_all(r"\|", ", ")))
        items = pl.DataFrame(rows, schema={"item": pl.Utf8, "title": pl.Utf8, "category": pl.Utf8}, orient="row")
    return imported(lf, str(ratings), items, f"movielens {ratings}")


@register("amazon-reviews")
def import_amazon_reviews(path: Path, items: Optional[str] = None, **_) -> Imported:
    """Amazon Reviews 2023: ``<Category>.jsonl`` reviews and ``meta_<Category>.jsonl``.

    The item is ``parent_asin`` (the 2023 benchmark's item id); each review is
    an event 'review' with the star rating as value, timestamp in ms.
    """
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        cands = sorted(p for p in path.glob("*.jsonl") if not p.name.startswith("meta_"))
        if not cands:
            raise DataError(f"amazon-reviews: no review .jsonl file in {path}")
        path = cands[0]
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file")
    lf = pl.scan_ndjson(path, infer_schema_length=1000)
    names_ = lf.collect_schema().names()
    item_col = "parent_asin" if "parent_asin" in names_ else "asin"
    for need in ("user_id", item_col, "timestamp"):
        if need not in names_:
            raise DataError(f"{path}: missing field '{need}' (Amazon Reviews 2023 reviews have user_id, parent_asin, rating, timestamp)")
    ev = lf.select(
        pl.col("user_id").alias("user"), pl.col(item_col).alias("item"), pl.col("timestamp").alias("ts"),
        pl.lit("review").alias("event"),
        (pl.col("rating") if "rating" in names_ else pl.lit(None, dtype=pl.Float64)).alias("value"),
    )
    meta = Path(items) if items else None
    if meta is None:
        stem = path.stem
        meta = next(iter(sorted(folder.glob(f"meta_{stem}.jsonl")) or sorted(folder.glob("meta_*.jsonl"))), None)
    item_df = None
    if meta is not None:
        if not meta.is_file():
            raise DataError(f"amazon-reviews: item metadata not found: {meta}")
        m = pl.scan_ndjson(meta, infer_schema_length=1000)
        mn = m.collect_schema().names()
        mid = "parent_asin" if "parent_asin" in mn else "asin"
        cols = [pl.col(mid).cast(pl.Utf8).alias("item")]
        if "title" in mn:
            cols.append(pl.col("title").cast(pl.Utf8))
        if "main_category" in mn:
            cols.append(pl.col("main_category").cast(pl.Utf8).alias("category"))
        if "store" in mn:
            cols.append(pl.col("store").cast(pl.Utf8).alias("brand"))
        if "price" in mn:  # a number, null, or strings like "None" / "$12.99"
            cols.append(pl.col("price").cast(pl.Utf8).str.replace_all(r"[$,]", "").cast(pl.Float64, strict=False).alias("price"))
        item_df = m.select(cols)
    return imported(ev, str(path), item_df, f"amazon reviews {path}", items_origin=str(meta) if meta is not None else None)


_RR_EVENTS = {"view": "view", "addtocart": "cart", "transaction": "purchase"}


@register("retailrocket")
def import_retailrocket(path: Path, **_) -> Imported:
    folder = path if path.is_dir() else path.parent
    events = path if path.is_file() else _find(path, "events.csv")
    if events is None:
        raise DataError(f"retailrocket: no events.csv in {path}")
    lf = scan_table(events)
    names_ = lf.collect_schema().names()
    for need in ("timestamp", "visitorid", "event", "itemid"):
        if need not in names_:
            raise DataError(f"{events}: missing column '{need}' (RetailRocket events.csv has timestamp,visitorid,event,itemid,transactionid)")
    ev = lf.select(
        pl.col("visitorid").cast(pl.Utf8).alias("user"), pl.col("itemid").cast(pl.Utf8).alias("item"),
        pl.col("timestamp").alias("ts"),
        pl.col("event").replace_strict(_RR_EVENTS, default=pl.col("event")).alias("event"),
    )
    props = sorted(folder.glob("item_properties_part*.csv"))
    items = None
    if props:
        # properties change over time; keep each item's latest categoryid
        items = (
            pl.concat([pl.scan_csv(p, schema_overrides={"itemid": pl.Utf8, "value": pl.Utf8}) for p in props])
            .filter(pl.col("property") == "categoryid")
            .sort("timestamp")
            .group_by("itemid")
            .agg(pl.col("value").last().alias("category"))
            .rename({"itemid": "item"})
        )
    return imported(ev, str(events), items, f"retailrocket {events}")


_TAOBAO_EVENTS = {"pv": "view", "cart": "cart", "buy": "purchase", "fav": "fav"}


@register("taobao")
def import_taobao(path: Path, **_) -> Imported:
    """Tianchi UserBehavior.csv: user,item,category,behavior,timestamp (seconds), no header."""
    f = path if path.is_file() else _find(path, "UserBehavior.csv")
    if f is None:
        raise DataError(f"taobao: no UserBehavior.csv in {path}")
    cols = ["user", "item", "category", "behavior", "ts"]
    if f.stat().st_size == 0:
        raise DataError(f"{f}: empty file")
    try:
        width = pl.read_csv(f, has_header=False, n_rows=1, infer_schema=False, encoding="utf8-lossy").width
    except pl.exceptions.PolarsError as exc:
        raise DataError(f"{f}: not a readable CSV file ({exc})") from None
    if width != 5:
        raise DataError(f"{f}: expected 5 columns ({','.join(cols)}), got {width}")
    lf = scan_table(f, has_header=False, new_columns=cols)
    ev = lf.select(
        pl.col("user").cast(pl.Utf8), pl.col("item").cast(pl.Utf8), pl.col("ts"),
        pl.col("behavior").replace_strict(_TAOBAO_EVENTS, default=pl.col("behavior")).alias("event"),
    )
    # the category rides on every event; the catalog keeps the first seen per item
    items = lf.select(pl.col("item").cast(pl.Utf8), pl.col("category").cast(pl.Utf8)).unique("item", keep="any")
    return imported(ev, str(f), items, f"taobao {f}")
