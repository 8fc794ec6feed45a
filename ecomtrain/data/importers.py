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

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import polars as pl

EVENT_COLUMNS = ("user", "item", "ts", "event", "channel", "value")
_DTYPES = {"user": pl.Utf8, "item": pl.Utf8, "ts": pl.Int64, "event": pl.Utf8, "channel": pl.Utf8, "value": pl.Float64}
# rows checked eagerly for a readable error before the lazy build runs
_PROBE_ROWS = 10_000


class DataError(ValueError):
    """Bad input data; the message names the file and the field.

    Always one line: the CLI prints ``error: <message>`` and exits 2, so a
    multi-line message from a library (polars adds hints on new lines) is
    folded here, once, rather than at every raise.
    """

    def __init__(self, message: object = ""):
        super().__init__(re.sub(r"\s*\n\s*", " ", str(message)).strip())


@dataclass
class Imported:
    events: pl.LazyFrame
    items: Optional[Union[pl.DataFrame, pl.LazyFrame]] = None
    description: str = ""
    # for error messages raised later, when the lazy events are collected
    origin: str = ""                       # the events file
    raw: Optional[pl.LazyFrame] = None     # events before the casts of normalise()
    timestamp_format: Optional[str] = None
    items_origin: Optional[str] = None     # the catalog file, when one was given


def imported(lf: pl.LazyFrame, origin: str, items=None, description: str = "", *, timestamp_format: Optional[str] = None,
             items_origin: Optional[str] = None, default_event: str = "interaction") -> Imported:
    """``normalise(lf)`` wrapped with what later error messages need."""
    imp = Imported(lf, items, description, origin=origin, raw=lf, timestamp_format=timestamp_format, items_origin=items_origin)
    try:
        imp.events = normalise(lf, origin, timestamp_format=timestamp_format, default_event=default_event)
    except pl.exceptions.NoDataError:
        raise DataError(f"{origin}: empty file (no rows)") from None
    except pl.exceptions.PolarsError as exc:  # met while probing the first rows
        raise translate(exc, origin, imp) from None
    return imp


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
    except pl.exceptions.PolarsError as exc:  # unreadable bytes met while probing the first rows
        raise translate(exc, str(path)) from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


def _bad_utf8_line(path: Path) -> Optional[tuple[int, int]]:
    """(line, byte offset) of the first invalid UTF-8 sequence in ``path`` (a file), or None."""
    import codecs

    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    for f in files:
        dec = codecs.getincrementaldecoder("utf-8")()
        line, offset = 1, 0
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                try:
                    dec.decode(chunk)
                except UnicodeDecodeError as exc:
                    pos = exc.start
                    return line + chunk[:pos].count(b"\n"), offset + pos
                line += chunk.count(b"\n")
                offset += len(chunk)
    return None


def translate(exc: BaseException, origin: str, imp: Optional[Imported] = None) -> DataError:
    """A polars error met while reading ``origin`` -> one DataError naming the file and, when found, column and row."""
    msg = str(exc)
    low = msg.lower()
    path = Path(origin)
    if "utf-8" in low or "utf8" in low:
        where = _bad_utf8_line(path) if path.exists() and not path.suffix.lower() == ".parquet" else None
        at = f" at line {where[0]} (byte {where[1]})" if where else ""
        return DataError(f"{origin}: not valid UTF-8 text{at}; re-encode it as UTF-8 (e.g. iconv -f latin1 -t utf-8)")
    if imp is not None and imp.raw is not None:
        found = _find_bad_value(imp)
        if found:
            return DataError(found)
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json") and path.is_file():
        n = _bad_json_line(path)
        if n is not None:
            return DataError(f"{origin}: line {n} is not valid JSON ({_first_line(exc)})")
    m = _PARSE.search(msg)
    if m:  # the reader met a value its inferred type cannot hold
        return DataError(f"{origin}: column '{m.group(3)}': value {m.group(1)!r} is not a valid {m.group(2)} (found past the first rows)")
    return DataError(f"{origin}: could not read events: {type(exc).__name__}: {_first_line(exc)}")


def _bad_json_line(path: Path) -> Optional[int]:
    """Line number of the first line of a JSON-lines file that does not parse."""
    import json

    with open(path, "rb") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    json.loads(line)
                except ValueError:
                    return n
    return None


_PARSE = re.compile(r"could not parse `(.*?)` as dtype `(\w+)` at column '([^']*)'")


def _find_bad_value(imp: Imported) -> Optional[str]:
    """The first row whose value fails the strict casts of normalise() (one streaming pass per column)."""
    raw = imp.raw
    try:
        schema = raw.collect_schema()
        for col, dtype in _DTYPES.items():
            if col not in schema or schema[col] == dtype or schema[col].is_temporal():
                continue
            c = pl.col(col)
            if col == "ts" and imp.timestamp_format and schema[col] == pl.Utf8:
                parsed = c.str.strptime(pl.Datetime("us"), imp.timestamp_format, strict=False)
                what = f"does not match --timestamp-format {imp.timestamp_format!r}"
            else:
                parsed = c.cast(pl.Float64 if col in ("ts", "value") else dtype, strict=False)
                what = "is not a number"
            bad = (
                raw.with_row_index("_i").filter(c.is_not_null() & parsed.is_null()).select("_i", c.cast(pl.Utf8))
                .head(1).collect(engine="streaming")
            )
            if bad.height:
                return f"{imp.origin}: column '{col}' row {bad['_i'][0] + 1}: value {bad[col][0]!r} {what}"
    except pl.exceptions.PolarsError:
        return None
    return None


def check_ids(imp: Imported, ev: Optional[pl.LazyFrame] = None) -> int:
    """Number of events in ``ev`` (default: all); fails naming the file, column and row of an empty
    user, item or timestamp cell. One streaming pass: the build's event count and this check share it."""
    ev = imp.events if ev is None else ev
    empty = lambda c: pl.col(c).is_null() | (pl.col(c).str.len_bytes() == 0)  # noqa: E731
    counts = ev.select(n=pl.len(), u=empty("user").sum(), i=empty("item").sum(), t=pl.col("ts").is_null().sum()).collect(engine="streaming")
    for col, n in (("user", counts["u"][0]), ("item", counts["i"][0]), ("ts", counts["t"][0])):
        if n:
            bad = pl.col("ts").is_null() if col == "ts" else empty(col)
            row = ev.filter(bad).select("_row").head(1).collect(engine="streaming")["_row"][0]
            need = "a timestamp (or no ts column: file order is then time)" if col == "ts" else "a user and an item id"
            raise DataError(f"{imp.origin or imp.description}: column '{col}' row {row + 1} is empty ({n} empty {col} cell(s)); every event needs {need}")
    return int(counts["n"][0])


def _ts_expr(col: str, dtype: pl.DataType, fmt: Optional[str]) -> pl.Expr:
    """Epoch seconds (or ms: whatever the file holds) as i64; strings parse with ``fmt``."""
    c = pl.col(col)
    if dtype.is_temporal():
        return c.cast(pl.Datetime("us")).dt.epoch("s")
    if dtype == pl.Utf8 and fmt:
        return c.str.strptime(pl.Datetime("us"), fmt, strict=True).dt.epoch("s")
    if dtype == pl.Utf8:  # CSV columns are read as text: integers exactly, "1.5e9" through a float
        return pl.coalesce(c.cast(pl.Int64, strict=False), c.cast(pl.Float64, strict=True).cast(pl.Int64))
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
    for col in ("user", "item"):  # the rest of the file is checked by check_ids() during the build
        v = head[col].cast(pl.Utf8, strict=False)
        bad = v.is_null() | (v.str.len_bytes() == 0)
        if bad.any():
            raise DataError(f"{origin}: column '{col}' row {int(bad.arg_max()) + 1} is empty; every event needs a user and an item id")
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
        # every column as text: normalise() casts it and names the row of a bad value
        # (a type inferred from the first rows would fail later inside the reader)
        return pl.scan_csv(target, separator=sep, has_header=has_header, new_columns=new_columns, infer_schema=False)
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
    for ours, theirs in mapping.items():
        if ours != "item" and theirs not in names_ and columns and ours in columns:
            raise DataError(f"{p}: column '{theirs}' (mapped to {ours}) not found; columns are {', '.join(names_)}")
    for col in names_:  # other columns travel too: an item-text template may name them
        if col not in keep and col not in keep.values():
            keep[col] = col
    out = lf.select([pl.col(k).alias(v) for k, v in keep.items()]).with_columns(pl.col("item").cast(pl.Utf8))
    if "price" in keep.values():
        out = out.with_columns(pl.col("price").cast(pl.Float64, strict=False))
    check_catalog(out, str(p))
    return out


def check_catalog(items: Union[pl.DataFrame, pl.LazyFrame], origin: str) -> None:
    """A catalog names each item once and has no empty id (the build would otherwise pick one row silently)."""
    try:
        ids = items.lazy().select(pl.col("item").cast(pl.Utf8)).with_row_index("_r").collect(engine="streaming")
    except pl.exceptions.PolarsError as exc:
        raise translate(exc, origin) from None
    empty = ids["item"].is_null() | (ids["item"].str.len_bytes() == 0)
    if empty.any():
        raise DataError(f"{origin}: item catalog row {int(empty.arg_max()) + 1}: empty item id")
    dup = ids.filter(pl.col("item").is_duplicated())
    if dup.height:
        first = dup["item"][0]
        rows = dup.filter(pl.col("item") == first)["_r"].to_list()
        n = dup["item"].n_unique()
        raise DataError(f"{origin}: item catalog has duplicate item id {first!r} (rows {', '.join(str(r + 1) for r in rows[:5])})"
                        + (f" and {n - 1} more duplicated id(s)" if n > 1 else ""))


# ---------------------------------------------------------------- importers
@register("synth")
def import_synth(path: Path, **_) -> Imported:
    """The folder written by ``ecomtrain data synth``."""
    ev = path / "events.parquet"
    if not ev.is_file():
        raise DataError(f"synth: {ev} not found (run `ecomtrain data synth --out {path}` first)")
    try:
        names_ = pl.scan_parquet(ev).collect_schema().names()
    except pl.exceptions.PolarsError as exc:
        raise DataError(f"{ev}: not a readable Parquet file ({_first_line(exc)})") from None
    need = ("user_id", "item_id", "timestamp", "event_type")
    for col in need:
        if col not in names_:
            raise DataError(f"{ev}: missing column '{col}' (a synth events.parquet has {', '.join(need)}, channel, value; it has {', '.join(names_)})")
    lf = pl.scan_parquet(ev).rename({"user_id": "user", "item_id": "item", "timestamp": "ts", "event_type": "event"})
    items, items_origin = None, None
    if (path / "items.parquet").is_file():
        items_origin = str(path / "items.parquet")
        try:
            items = pl.read_parquet(path / "items.parquet")
        except pl.exceptions.PolarsError as exc:
            raise DataError(f"{items_origin}: not a readable Parquet file ({_first_line(exc)})") from None
        if "item_id" not in items.columns:
            raise DataError(f"{items_origin}: missing column 'item_id' (it has {', '.join(items.columns)})")
        items = items.rename({"item_id": "item"})
        check_catalog(items, items_origin)
    return imported(lf, str(ev), items, f"synth folder {path}", items_origin=items_origin)


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
    return imported(lf, str(path), _items_frame(items, item_columns), f"table {path}", timestamp_format=timestamp_format,
                    items_origin=str(items) if items else None)


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
    return imported(toks, str(path), _items_frame(items), f"sequence file {path}", items_origin=items)


from . import importers_public  # noqa: E402,F401  (registers movielens, amazon-reviews, retailrocket, taobao)
