"""Cold-start items: a seeded share of the catalog held out of all training input.

    data.build.cold_items: 0.05      # recipe (or --cold-items 0.05 on `ecomtrain data build`)

Which items: a seeded random set of ``round(fraction * num_items)`` items drawn among
the items that are some user's validation or test *target* (so every cold item is
evaluated). How they are held out: every occurrence of a cold item in a user's
training region (positions before the split's training end ``T``) is removed from the
sequence before samples are cut, so no training window ever contains one; the
occurrences at val/test positions stay (as targets, and as the history of a later
target). Users that fall under the minimum length are dropped as usual.

Evaluation then reports ``test_cold/*`` (targets that are cold items) and
``test_warm/*`` beside ``test/*``, always ranking the whole catalog. An ``id`` model
cannot rank cold items (their ID rows never trained): its cold figures are about
the random-rank expectation, and the runner says so.

The build calls :func:`choose` once (after sequences exist) and :func:`hold_out`
per partition before samples are made; :func:`check` proves on the training-window
item counts that no cold item occurs in training input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import polars as pl

from .importers import DataError


def _targets(df: pl.DataFrame, method: str, t_val: Optional[int]) -> pl.Series:
    """Raw ids at val/test target positions (leave-one-out: the last two; temporal: ts >= t_val)."""
    if method == "leave_one_out":
        return df.select(pl.col("items").list.tail(2).explode())["items"]
    rows = df.select("items", "ts").explode(["items", "ts"])
    return rows.filter(pl.col("ts") >= t_val)["items"]


def choose(seq_parts: list[Path], num_items: int, fraction: float, seed: int, method: str, t_val: Optional[int]) -> pl.Series:
    """Raw ids of the cold items (sorted), drawn among val/test targets."""
    if fraction <= 0:
        return pl.Series("item", [], dtype=pl.Utf8)
    cands = pl.concat([_targets(pl.read_parquet(p, columns=["items", "ts"]), method, t_val) for p in seq_parts])
    cands = cands.drop_nulls().cast(pl.Utf8).unique().sort()
    want = int(round(fraction * num_items))
    if want == 0:
        raise DataError(f"data.build.cold_items={fraction}: rounds to 0 of {num_items} items; use a larger fraction")
    if want > cands.len():
        raise DataError(f"data.build.cold_items={fraction}: asks for {want} cold items but only {cands.len()} items are val/test targets")
    rng = np.random.default_rng(seed + 7919)
    pick = np.sort(rng.choice(cands.len(), size=want, replace=False))
    return cands.gather(pick).rename("item")


def hold_out(seqs: pl.DataFrame, cold: pl.Series, method: str, t_val: Optional[int], min_len: int) -> pl.DataFrame:
    """Remove cold items from each user's training region (raw ids, before the split)."""
    if cold.len() == 0:
        return seqs
    lists = [c for c in ("items", "events", "channels", "ts", "sessions", "ratings") if c in seqs.columns]
    rows = seqs.with_row_index("_u").explode(lists)
    rows = rows.with_columns(_p=pl.int_range(pl.len()).over("_u"), _n=pl.len().over("_u"))
    in_train = pl.col("_p") < (pl.col("_n") - 2) if method == "leave_one_out" else pl.col("ts") < t_val
    rows = rows.filter(~(in_train & pl.col("items").is_in(cold.implode())))
    agg = [pl.col(c).first() for c in seqs.columns if c not in lists] + [pl.col(c) for c in lists]
    out = rows.group_by("_u", maintain_order=True).agg(agg).select(seqs.columns)
    return out.filter(pl.col("items").list.len() >= min_len)


def check(train_counts: np.ndarray, cold_idx: np.ndarray) -> None:
    """Raise if a cold item occurs in training input (``train_counts``: per item index, from the training windows)."""
    bad = int(train_counts[cold_idx].sum()) if len(cold_idx) else 0
    if bad:
        raise DataError(f"cold-item check failed: cold items occur {bad} times in training input")
