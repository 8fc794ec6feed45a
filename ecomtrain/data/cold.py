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
from .seqs import Seqs


def _target_mask(s: Seqs, method: str, t_val: Optional[int]) -> np.ndarray:
    """Positions that can be val/test targets (leave-one-out: each user's last two; temporal: ts >= t_val)."""
    if method == "leave_one_out":
        pos = np.arange(len(s.item)) - s.off[:-1][s.user_of_position()]
        return pos >= (s.lengths[s.user_of_position()] - 2)
    return s.ts >= t_val


def choose(seq_dirs: list[Path], item_names: pl.Series, num_items: int, fraction: float, seed: int, method: str,
           t_val: Optional[int]) -> pl.Series:
    """Raw ids of the cold items (sorted), drawn among val/test targets (``item_names``: item code -> id)."""
    if fraction <= 0:
        return pl.Series("item", [], dtype=pl.Utf8)
    codes = set()
    for d in seq_dirs:
        s = Seqs.load(d)
        codes.update(np.unique(s.item[_target_mask(s, method, t_val)]).tolist())
    cands = item_names.gather(sorted(codes)).cast(pl.Utf8).unique().sort()
    want = int(round(fraction * num_items))
    if want == 0:
        raise DataError(f"data.build.cold_items={fraction}: rounds to 0 of {num_items} items; use a larger fraction")
    if want > cands.len():
        raise DataError(f"data.build.cold_items={fraction}: asks for {want} cold items but only {cands.len()} items are val/test targets")
    rng = np.random.default_rng(seed + 7919)
    pick = np.sort(rng.choice(cands.len(), size=want, replace=False))
    return cands.gather(pick).rename("item")


def hold_out(s: Seqs, cold_codes: np.ndarray, method: str, t_val: Optional[int], min_len: int) -> Seqs:
    """Remove cold items (``cold_codes``: bool per item code) from each user's training region."""
    if not cold_codes.any():
        return s
    if method == "leave_one_out":
        uop = s.user_of_position()
        in_train = (np.arange(len(s.item)) - s.off[:-1][uop]) < (s.lengths[uop] - 2)
    else:
        in_train = s.ts < t_val
    return s.keep(~(in_train & cold_codes[s.item]), min_len)


def check(train_counts: np.ndarray, cold_idx: np.ndarray) -> None:
    """Raise if a cold item occurs in training input (``train_counts``: per item index, from the training windows)."""
    bad = int(train_counts[cold_idx].sum()) if len(cold_idx) else 0
    if bad:
        raise DataError(f"cold-item check failed: cold items occur {bad} times in training input")
