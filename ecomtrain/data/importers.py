"""Importers: raw logs of many shapes -> one normalised, lazy events table.

Every importer returns an :class:`Imported` holding a polars LazyFrame with
the columns

    user: str   item: str   ts: i64   event: str   channel: str|null
    value: f64|null   _row: u32 (position in the input, keeps ties stable)

and, when the source has them, an item-attribute frame (item, title,
category, brand, price). Nothing here materialises the events in Python
objects: the build decides when to collect.

Add an importer with ``@register("name")``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import polars as pl

EVENT_COLUMNS = ("user", "item", "ts", "event", "channel", "value")


class DataError(ValueError):
    """Bad input data; the message names the file and the field."""


@dataclass
class Imported:
    events: pl.LazyFrame
    items: Optional[pl.DataFrame] = None
    description: str = ""


_IMPORTERS: dict[str, Callable[..., Imported]] = {}


def register(name: str):
    def deco(fn):
        _IMPORTERS[name] = fn
        return fn

    return deco


def names() -> list[str]:
    return sorted(_IMPORTERS)


def load(source: str, input: str | Path, **options) -> Imported:
    if source not in _IMPORTERS:
        import difflib

        guess = difflib.get_close_matches(source, names(), n=1)
        hint = f"; did you mean '{guess[0]}'?" if guess else ""
        raise DataError(f"unknown data source '{source}'{hint} (known: {', '.join(names())})")
    path = Path(input)
    if not path.exists():
        raise DataError(f"{source}: input not found: {path}")
    return _IMPORTERS[source](path, **options)


def _normalise(lf: pl.LazyFrame) -> pl.LazyFrame:
    """Cast to the common schema; absent optional columns become nulls."""
    exprs = []
    names_ = lf.collect_schema().names()
    for col, dtype in (("user", pl.Utf8), ("item", pl.Utf8), ("ts", pl.Int64), ("event", pl.Utf8), ("channel", pl.Utf8), ("value", pl.Float64)):
        if col in names_:
            exprs.append(pl.col(col).cast(dtype, strict=True).alias(col))
        elif col == "event":
            exprs.append(pl.lit("interaction", dtype=pl.Utf8).alias(col))
        else:
            exprs.append(pl.lit(None, dtype=dtype).alias(col))
    return lf.with_row_index("_row").select([*exprs, pl.col("_row")])


def _read_table(path: Path) -> pl.LazyFrame:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return pl.scan_parquet(path)
    if suffix in (".csv", ".tsv"):
        return pl.scan_csv(path, separator="\t" if suffix == ".tsv" else ",", infer_schema_length=10000)
    if suffix in (".jsonl", ".ndjson", ".json"):
        return pl.scan_ndjson(path)
    raise DataError(f"{path}: unsupported table format '{suffix}' (use .parquet, .csv, .tsv or .jsonl)")


@register("synth")
def import_synth(path: Path, **_) -> Imported:
    """The folder written by ``ecomtrain data synth``."""
    ev = path / "events.parquet"
    if not ev.is_file():
        raise DataError(f"synth: {ev} not found (run `ecomtrain data synth --out {path}` first)")
    lf = pl.scan_parquet(ev).rename(
        {"user_id": "user", "item_id": "item", "timestamp": "ts", "event_type": "event"}
    )
    items = None
    if (path / "items.parquet").is_file():
        items = pl.read_parquet(path / "items.parquet").rename({"item_id": "item"})
    return Imported(_normalise(lf), items, f"synth folder {path}")


@register("seq")
def import_seq(path: Path, **_) -> Imported:
    """One user per line: ``user item item ...`` in chronological order (CRLF ok).

    There are no timestamps: the position in the line is the time, so ties can
    never reorder a user's history.
    """
    lines = pl.scan_csv(
        path, has_header=False, separator="\x1f", quote_char=None, new_columns=["line"], schema_overrides={"line": pl.Utf8}
    )
    toks = (
        lines.with_columns(pl.col("line").str.strip_chars().str.split(" "))
        .filter(pl.col("line").list.len() > 0)
        .with_row_index("_line")
        .with_columns(user=pl.col("line").list.first(), items=pl.col("line").list.slice(1))
        .filter(pl.col("items").list.len() > 0)
        .select("user", "items", "_line")
        .explode("items")
        .filter(pl.col("items") != "")
        .with_columns(ts=pl.int_range(pl.len()).over("_line").cast(pl.Int64))
        .rename({"items": "item"})
        .select("user", "item", "ts")
    )
    return Imported(_normalise(toks), None, f"sequence file {path}")
