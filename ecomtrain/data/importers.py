"""Importers: raw logs of many shapes -> one normalised, lazy events table.

    ecomtrain data build --source table --input events.csv --columns user=visitor,item=sku,ts=time

Every importer returns an :class:`Imported` holding a polars LazyFrame with

    user: str   item: str   ts: i64   event: str   channel: str|null
    value: f64|null   _row: u32 (position in the input, keeps ties stable)

and, when the source has them, item attributes (item, title, category, brand,
price) as a (Lazy)DataFrame. Nothing here materialises the events in Python
objects: the build decides when to collect. Sources: ``synth``, ``table``
(CSV/TSV/Parquet/JSONL + column mapping), ``seq``, ``movielens``,
``amazon-reviews``, ``retailrocket``, ``taobao``. Add one with
``@register("name")``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import polars as pl

EVENT_COLUMNS = ("user", "item", "ts", "event", "channel", "value")
_DTYPES = {"user": pl.Utf8, "item": pl.Utf8, "ts": pl.Int64, "event": pl.Utf8, "channel": pl.Utf8, "value": pl.Float64}
# rows checked eagerly for a readable error before the lazy build runs
_PROBE_ROWS = 10_000


class DataError(ValueError):
    """Bad input data; the message names the file and the field."""


@dataclass
class Imported:
    events: pl.LazyFrame
    items: Optional[Union[pl.DataFrame, pl.LazyFrame]] = None
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
    """Importer ``source`` on ``input``; options: columns, items, timestamp_format."""
    if source not in _IMPORTERS:
        import difflib

        guess = difflib.get_close_matches(source, names(), n=1)
        hint = f"; did you mean '{guess[0]}'?" if guess else ""
        raise DataError(f"unknown data source '{source}'{hint} (known: {', '.join(names())})")
    path = Path(input)
    if not path.exists() and not any(ch in str(input) for ch in "*?["):
        raise DataError(f"{source}: input not found: {path}")
    options = {k: v for k, v in options.items() if v is not None}
    try:
        return _IMPORTERS[source](path, **options)
    except pl.exceptions.NoDataError:
        raise DataError(f"{source}: {path} is empty (no rows)") from None


def _ts_expr(col: str, dtype: pl.DataType, fmt: Optional[str]) -> pl.Expr:
    """Epoch seconds (or ms: whatever the file holds) as i64; strings parse with ``fmt``."""
    c = pl.col(col)
    if dtype.is_temporal():
        return c.cast(pl.Datetime("us")).dt.epoch("s")
    if dtype == pl.Utf8 and fmt:
        return c.str.strptime(pl.Datetime("us"), fmt, strict=True).dt.epoch("s")
    if dtype.is_float():
        return c.cast(pl.Int64, strict=True)
    return c.cast(pl.Int64, strict=True)


def normalise(lf: pl.LazyFrame, origin: str, *, timestamp_format: Optional[str] = None, default_event: str = "interaction") -> pl.LazyFrame:
    """Cast to the common schema; absent optional columns become nulls.

    ``origin`` (file name) goes into every error. The first rows are probed
    eagerly so a non-numeric timestamp or item fails here naming the column,
    the row and the value rather than deep inside the build.
    """
    schema = lf.collect_schema()
    for req in ("user", "item"):
        if req not in schema:
            raise DataError(f"{origin}: no '{req}' column (columns: {', '.join(schema.names())}); map one with --columns {req}=NAME")
    exprs = []
    for col, dtype in _DTYPES.items():
        if col == "ts" and col in schema:
            exprs.append(_ts_expr("ts", schema["ts"], timestamp_format).alias("ts"))
        elif col in schema:
            exprs.append(pl.col(col).cast(dtype, strict=True).alias(col))
        elif col == "event":
            exprs.append(pl.lit(default_event, dtype=pl.Utf8).alias(col))
        elif col == "ts":  # no timestamps: file order is time
            exprs.append(pl.col("_row").cast(pl.Int64).alias("ts"))
        else:
            exprs.append(pl.lit(None, dtype=dtype).alias(col))
    out = lf.with_row_index("_row").select([*exprs, pl.col("_row")])
    _probe(lf, schema, origin, timestamp_format)
    return out


def _probe(lf: pl.LazyFrame, schema, origin: str, fmt: Optional[str]) -> None:
    head = lf.head(_PROBE_ROWS).collect()
    if head.height == 0:
        raise DataError(f"{origin}: empty input (no events)")
    for col in ("ts", "value"):
        if col not in schema or schema[col].is_temporal() or (col == "ts" and fmt):
            continue
        if schema[col] == pl.Utf8:
            raw = head[col]
            num = raw.cast(pl.Float64, strict=False)
            bad = raw.is_not_null() & num.is_null()
            if bad.any():
                i = int(bad.arg_max())
                hint = " (give --timestamp-format, e.g. %Y-%m-%d %H:%M:%S)" if col == "ts" else ""
                raise DataError(f"{origin}: column '{col}' row {i + 1}: value {raw[i]!r} is not a number{hint}")
    if fmt and "ts" in schema and schema["ts"] == pl.Utf8:
        try:
            head.select(pl.col("ts").str.strptime(pl.Datetime("us"), fmt, strict=True))
        except pl.exceptions.PolarsError as exc:
            raise DataError(f"{origin}: column 'ts' does not match --timestamp-format {fmt!r}: {exc}") from None


def scan_table(path: Path, separator: Optional[str] = None, has_header: bool = True, new_columns=None) -> pl.LazyFrame:
    """Lazy scan of CSV / TSV / Parquet / JSONL (a file, a folder of them, or a glob)."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".parquet", ".csv", ".tsv", ".jsonl", ".ndjson"))
        if not files:
            raise DataError(f"{path}: folder holds no .parquet/.csv/.tsv/.jsonl files")
        suffix = files[0].suffix.lower()
        target = str(path / f"*{suffix}")
    else:
        suffix = path.suffix.lower()
        target = str(path)
        if path.is_file() and path.stat().st_size == 0:
            raise DataError(f"{path}: empty file")
    if suffix == ".parquet":
        return pl.scan_parquet(target)
    if suffix in (".csv", ".tsv", ".txt", ".dat", ".data"):
        sep = separator or ("\t" if suffix == ".tsv" else ",")
        return pl.scan_csv(
            target, separator=sep, has_header=has_header, new_columns=new_columns, infer_schema_length=10000,
            schema_overrides={c: pl.Utf8 for c in (new_columns or [])[:2]} or None,
        )
    if suffix in (".jsonl", ".ndjson", ".json"):
        return pl.scan_ndjson(target, infer_schema_length=10000)
    raise DataError(f"{path}: unsupported table format '{suffix}' (use .parquet, .csv, .tsv or .jsonl)")


def _items_frame(path: Optional[str], columns: Optional[dict] = None) -> Optional[pl.LazyFrame]:
    """An optional item catalog table (item, title, category, brand, price)."""
    if path is None:
        return None
    p = Path(path)
    if not p.exists():
        raise DataError(f"item catalog not found: {p}")
    lf = scan_table(p)
    names_ = lf.collect_schema().names()
    mapping = dict(columns or {})
    for ours, theirs in (("item", ("item", "item_id", "itemid", "sku", "asin", "parent_asin")),):
        if ours not in mapping:
            mapping[ours] = next((c for c in theirs if c in names_), ours)
    if mapping["item"] not in names_:
        raise DataError(f"{p}: no item column (columns: {', '.join(names_)})")
    keep = {mapping["item"]: "item"}
    for attr in ("title", "category", "brand", "price"):
        src = mapping.get(attr, attr)
        if src in names_:
            keep[src] = attr
    for col in names_:  # other columns travel too: an item-text template may name them
        if col not in keep and col not in keep.values():
            keep[col] = col
    return lf.select([pl.col(k).alias(v) for k, v in keep.items()]).with_columns(pl.col("item").cast(pl.Utf8))


# ---------------------------------------------------------------- importers
@register("synth")
def import_synth(path: Path, **_) -> Imported:
    """The folder written by ``ecomtrain data synth``."""
    ev = path / "events.parquet"
    if not ev.is_file():
        raise DataError(f"synth: {ev} not found (run `ecomtrain data synth --out {path}` first)")
    lf = pl.scan_parquet(ev).rename({"user_id": "user", "item_id": "item", "timestamp": "ts", "event_type": "event"})
    items = None
    if (path / "items.parquet").is_file():
        items = pl.read_parquet(path / "items.parquet").rename({"item_id": "item"})
    return Imported(normalise(lf, str(ev)), items, f"synth folder {path}")


# default source column names tried for each field when --columns does not say
_TABLE_DEFAULTS = {
    "user": ("user", "user_id", "userid", "visitorid", "customer_id"),
    "item": ("item", "item_id", "itemid", "sku", "product_id", "asin"),
    "ts": ("ts", "timestamp", "time", "event_time", "datetime"),
    "event": ("event", "event_type", "behavior", "action"),
    "channel": ("channel", "platform", "source"),
    "value": ("value", "rating", "price", "amount"),
}


@register("table")
def import_table(
    path: Path, columns: Optional[dict] = None, items: Optional[str] = None, timestamp_format: Optional[str] = None,
    separator: Optional[str] = None, item_columns: Optional[dict] = None, **_,
) -> Imported:
    """Generic event table: CSV / TSV / Parquet / JSONL with a column mapping.

    ``columns`` maps our fields (user, item, ts, event, channel, value) to the
    file's column names; unmapped fields try common names, optional ones may
    be absent (no ts: file order is time; no event: 'interaction').
    """
    lf = scan_table(path, separator)
    names_ = lf.collect_schema().names()
    columns = dict(columns or {})
    unknown = set(columns) - set(_TABLE_DEFAULTS)
    if unknown:
        raise DataError(f"--columns: unknown field(s) {sorted(unknown)}; fields are {', '.join(_TABLE_DEFAULTS)}")
    select = {}
    for ours, guesses in _TABLE_DEFAULTS.items():
        if ours in columns:
            if columns[ours] not in names_:
                raise DataError(f"{path}: column '{columns[ours]}' (mapped to {ours}) not found; columns are {', '.join(names_)}")
            select[ours] = columns[ours]
        else:
            hit = next((g for g in guesses if g in names_), None)
            if hit is not None:
                select[ours] = hit
    for req in ("user", "item"):
        if req not in select:
            raise DataError(f"{path}: no {req} column found (columns: {', '.join(names_)}); map one with --columns {req}=NAME")
    lf = lf.select([pl.col(src).alias(ours) for ours, src in select.items()])
    return Imported(normalise(lf, str(path), timestamp_format=timestamp_format), _items_frame(items, item_columns), f"table {path}")


@register("seq")
def import_seq(path: Path, items: Optional[str] = None, **_) -> Imported:
    """One user per line: ``user item item ...`` in chronological order (CRLF ok); ``items``: an
    optional catalog table (item, title, brand, category, price, ...) keyed by the same ids.

    There are no timestamps: the position in the line is the time, so ties can
    never reorder a user's history.
    """
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(f"{path}: empty file")
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
    return Imported(normalise(toks, str(path)), _items_frame(items), f"sequence file {path}")


from . import importers_public  # noqa: E402,F401  (registers movielens, amazon-reviews, retailrocket, taobao)
