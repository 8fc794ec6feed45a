"""Item catalog: checks at build time and the item-text template.

    data.item_text.template: "{title}; brand: {brand}; category: {category}; price: {price}"

``render`` turns each row of ``items.parquet`` into one string, vectorised in polars
(never a Python loop per training step). The template is split into segments at
``;``; a segment is dropped when any field it names is empty or missing for that
item, so an item without a brand renders ``"lipstick; category: Makeup"``, never
``"lipstick; brand: ; category: Makeup"``. Segments are joined again with ``"; "``.
An item whose every segment is empty gets the fallback text ``"item <raw id>"``
(counted and reported), so it still has a distinct text vector.
"""

from __future__ import annotations

import re
import string
from typing import Optional

import polars as pl

from .importers import DataError

FIELD = re.compile(r"\{([^{}]+)\}")


def check(attrs: pl.DataFrame, vocab_items: pl.Series, description: str, log=print) -> pl.DataFrame:
    """Catalog rows (item + attributes) that belong to the dataset; one clear error for bad catalogs.

    Duplicate ids with different attributes -> DataError (which row is right cannot be guessed);
    exact duplicate rows collapse. No catalog id among the dataset's items -> DataError (wrong id
    column); some unknown -> they are dropped and counted.
    """
    attrs = attrs.unique(keep="first", maintain_order=True)
    dup = attrs.group_by("item").len().filter(pl.col("len") > 1)
    if dup.height:
        raise DataError(
            f"item catalog of {description}: {dup.height} item id(s) appear on several rows with different "
            f"attributes (e.g. '{dup['item'][0]}'); keep one row per item"
        )
    known = attrs["item"].is_in(vocab_items.implode())
    n_unknown = int((~known).sum())
    if attrs.height and n_unknown == attrs.height:
        raise DataError(
            f"item catalog of {description}: none of its {attrs.height} item ids occurs in the events "
            f"(catalog ids look like '{attrs['item'][0]}', event ids like '{vocab_items[0]}'): wrong id column?"
        )
    if n_unknown:
        log(f"item catalog: {n_unknown} of {attrs.height} rows name items not in the dataset (dropped)")
    return attrs.filter(known)


def template_fields(template: str) -> list[str]:
    names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    bad = [f for f in names if not f or not f.isidentifier()]
    if bad:
        raise DataError(f"data.item_text.template: fields must be column names like {{title}}, got {bad}")
    return names


def render(items: pl.DataFrame, template: str, log=print) -> pl.Series:
    """One text per row of ``items`` (ordered as given), see the module docstring."""
    fields = template_fields(template)
    missing = [f for f in fields if f not in items.columns]
    if missing:
        raise DataError(
            f"data.item_text.template names column(s) {missing} that items.parquet lacks "
            f"(columns: {', '.join(c for c in items.columns if c not in ('idx', 'train_count', 'cold'))})"
        )
    if not fields:
        raise DataError("data.item_text.template names no column (e.g. '{title}; brand: {brand}')")
    segs = []
    for seg in template.split(";"):
        seg = seg.strip()
        if not seg:
            continue
        parts: list[pl.Expr] = []
        names = []
        for lit, name, spec, conv in string.Formatter().parse(seg):
            if lit:
                parts.append(pl.lit(lit))
            if name is not None:
                v = pl.col(name).cast(pl.Utf8).str.strip_chars()
                parts.append(v)
                names.append(name)
        expr = pl.concat_str(parts)  # null when any field is null
        if names:
            empty = pl.any_horizontal([pl.col(n).cast(pl.Utf8).str.strip_chars().fill_null("") == "" for n in names])
            expr = pl.when(empty).then(None).otherwise(expr)
        segs.append(expr)
    text = items.select(pl.concat_str(segs, separator="; ", ignore_nulls=True).alias("text"))["text"].fill_null("")
    empty = text == ""
    n_empty = int(empty.sum())
    if n_empty:
        log(f"item text: {n_empty} of {len(text)} items have no text in any template field; they use the fallback 'item <id>'")
        text = pl.select(pl.when(pl.lit(empty)).then(pl.lit("item ") + pl.lit(items["item"].cast(pl.Utf8))).otherwise(pl.lit(text)))
        text = text.to_series()
    return text.rename("text")


def load_catalog(data_path, manifest: Optional[dict] = None) -> pl.DataFrame:
    """items.parquet sorted by idx (1..N)."""
    from pathlib import Path

    root = Path(data_path)
    name = (manifest or {}).get("item_file", "items.parquet")
    return pl.read_parquet(root / name).sort("idx")
