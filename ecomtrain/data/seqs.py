"""One user partition -> deduplicated, time-ordered positions per user, as numpy CSR arrays.

Called by :mod:`ecomtrain.data.build` once per staged hash partition of users
(about ``partition_events`` events). Polars reads the partition; everything after
that is vectorised numpy on integer codes (no per-event Python, no string sort):

1. codes: users get the rank of their id string inside the partition (so users come out
   in id order, as a sort by the string would give), items / event types / channels get
   build-wide codes from polars ``Categories`` (:class:`Codes`: a code means the same
   item in every partition; the strings are looked up once at the end);
2. one stable sort by (user, ts) -- ties stay in file order (``_row``), never by item;
3. exact duplicates (same user, item, ts, event, channel, value) dropped, the first kept:
   only rows that share (user, ts) with a neighbour can be duplicates, so only those few
   are compared;
4. (k-core, in build.py, on these deduplicated events);
5. :func:`positions`: consecutive repeats of an item merged (the furthest funnel stage wins,
   the last rating of the run is kept), sessions by inactivity gap, users with fewer than
   ``min_len`` positions dropped.

The result, :class:`Seqs`, is ``off`` (int64, users + 1 offsets) plus one flat array per
field; :meth:`Seqs.save` / :meth:`Seqs.load` keep it in ``.npy`` work files (read with
``allow_pickle=False``) and the user ids in a Parquet file.
"""

from __future__ import annotations

from dataclasses import dataclass, fields as dc_fields
from pathlib import Path
from typing import Optional

import numpy as np
import polars as pl

# Funnel order: when positions merge, the furthest stage wins.
FUNNEL = {"view": 0, "click": 1, "fav": 2, "cart": 3, "purchase": 4}
# Events whose value is an explicit rating (MovieLens 'rating', Amazon 'review', synth 'rating'):
# their value becomes the position's entry in the samples' 'ratings' list (null elsewhere)
RATING_EVENTS = ("rating", "review")


def _new_strings(s: pl.Series, codes: np.ndarray, base: int) -> Optional[pl.Series]:
    """The strings of codes ``base, base + 1, ...`` (those a cast just added), in code order.

    A cast gives each new string the next code at its first appearance, so the rows where
    the running maximum code grows are those strings' first rows. None if that does not hold
    (the caller then asks polars for the distinct values instead)."""
    new = codes >= base
    if not new.any():
        return s.clear()
    rows = np.flatnonzero(new)
    c = codes[rows]
    first = rows[np.flatnonzero(c > np.maximum.accumulate(np.concatenate([[base - 1], c[:-1]])))]
    if not np.array_equal(codes[first], np.arange(base, base + len(first))) or int(codes.max()) != base + len(first) - 1:
        return None
    return s.gather(first)


class Codes:
    """Build-wide integer codes for items, event types and channels (null -> -1), and their strings.

    Backed by polars ``Categories`` (a string -> u32 map that grows as partitions are read;
    a code means the same string in every partition). Polars frees a ``Categories`` once
    no column uses it: the empty columns kept here hold them for the lifetime of the build.
    """

    def __init__(self) -> None:
        self.cats = {c: pl.Categories.random() for c in ("item", "event", "channel")}
        self._alive = [pl.Series([], dtype=pl.Utf8).cast(pl.Categorical(c)) for c in self.cats.values()]
        self._items: list[pl.Series] = []  # item code -> id, in pieces (Categories.to_series loops in Python)
        self._n_items = 0

    def encode(self, s: pl.Series, col: str) -> np.ndarray:
        codes, names = encode(s, self.cats[col], self._n_items if col == "item" else None)
        if col == "item":
            self._items.append(names)
            self._n_items += names.len()
        return codes

    def strings(self, col: str) -> pl.Series:
        """code -> string (index = code)."""
        if col == "item":
            return pl.concat(self._items) if self._items else pl.Series([], dtype=pl.Utf8)
        return self.cats[col].to_series()  # a handful of event types / channels


def encode(s: pl.Series, cats: "pl.Categories", known: Optional[int] = 0) -> tuple[np.ndarray, Optional[pl.Series]]:
    """(codes of ``s`` in ``cats``, null -> -1; with ``known`` = the number of codes ``cats`` had
    before: the strings of the codes this call added, in code order).

    A cast gives each new string the next code at its first appearance, so the rows where
    the running maximum code grows are those strings' first rows; where that does not hold
    (never seen so far), the distinct values are asked of polars instead."""
    cat = s.cast(pl.Categorical(cats))
    codes = cat.to_physical().cast(pl.Int32).fill_null(-1).to_numpy()
    if known is None:
        return codes, None
    rows = np.flatnonzero(codes >= known)
    c = codes[rows]
    first = rows[np.flatnonzero(c > np.maximum.accumulate(np.concatenate([[known - 1], c[:-1]])))] if len(rows) else rows
    if np.array_equal(codes[first], np.arange(known, known + len(first))) and (not len(c) or int(c.max()) == known + len(first) - 1):
        return codes, s.gather(first).cast(pl.Utf8)
    df = pl.DataFrame({"s": cat.unique().drop_nulls()}).with_columns(code=pl.col("s").to_physical()).filter(pl.col("code") >= known)
    df = df.sort("code")
    if not np.array_equal(df["code"].to_numpy(), np.arange(known, known + df.height)):
        raise RuntimeError("polars Categories codes are not dense")
    return codes, df["s"].cast(pl.Utf8)


@dataclass
class Events:
    """Deduplicated events of one partition, ordered by (user, ts, file row)."""

    users: pl.Series      # distinct user ids of the partition, sorted; ``u`` indexes it
    u: np.ndarray         # int32
    item: np.ndarray      # int32 item code
    ts: np.ndarray        # int64
    ev: np.ndarray        # int32 event code (-1 = null)
    ch: np.ndarray        # int32 channel code (-1 = null)
    rating: np.ndarray    # float64, NaN where the event is no rating
    row: np.ndarray       # int64 input row

    def take(self, mask: np.ndarray) -> "Events":
        return Events(self.users, *(getattr(self, f.name)[mask] for f in dc_fields(self)[1:]))

    @property
    def n(self) -> int:
        return len(self.u)

    def save(self, d: Path) -> None:
        d.mkdir(parents=True)
        pl.DataFrame({"user": self.users}).write_parquet(d / "users.parquet")
        for f in dc_fields(self)[1:]:
            np.save(d / f"{f.name}.npy", getattr(self, f.name), allow_pickle=False)

    @classmethod
    def load(cls, d: Path, mmap: bool = False) -> "Events":
        arrays = [np.load(d / f"{f.name}.npy", allow_pickle=False, mmap_mode="r" if mmap else None) for f in dc_fields(cls)[1:]]
        return cls(pl.read_parquet(d / "users.parquet")["user"], *arrays)


def read_partition(files: str | Path | list, codes: Codes) -> tuple[Events, int]:
    """Staged partition -> (deduplicated sorted events, number of events before dedupe)."""
    df = pl.read_parquet(files)
    n_in = df.height
    # users: codes of a fresh Categories (dense), then the rank of each id string (id order)
    ucode, names = encode(df["user"], pl.Categories.random(), 0)
    order = names.arg_sort().to_numpy()
    rank = np.empty(len(order), dtype=np.int32)
    rank[order] = np.arange(len(order), dtype=np.int32)
    u = rank[ucode]
    users = names.gather(order)
    del ucode
    item = codes.encode(df["item"], "item")
    ev = codes.encode(df["event"], "event")
    ch = codes.encode(df["channel"], "channel")
    ts = df["ts"].to_numpy()
    row = df["_row"].to_numpy()
    value = df["value"].cast(pl.Float64).to_numpy()  # null -> NaN
    is_rating = (df["event"].is_in(RATING_EVENTS) & df["value"].is_not_null()).fill_null(False)
    rating = df["value"].cast(pl.Float64).to_numpy() if is_rating.any() else None
    if rating is not None:
        rating = np.where(is_rating.to_numpy(), rating, np.nan)
    del df, is_rating

    # (user, ts, row) order. The staged file is normally in row order already, and then one
    # stable argsort of a packed (user, ts) key is ~2x faster than a 3-key lexsort, and the
    # sorted key gives back user and ts without two more gathers.
    ordered_rows = n_in < 2 or bool(np.all(row[1:] > row[:-1]))
    tmin = int(ts.min()) if n_in else 0
    bits_t, bits_u = (int(ts.max()) - tmin).bit_length() if n_in else 0, int(len(rank)).bit_length()
    if n_in and ordered_rows and bits_t + bits_u <= 62:
        key = (u.astype(np.int64) << bits_t) | (ts - tmin)
        # polars' stable sort: ~1.5x less CPU than np.argsort(kind="stable") on 4 M keys
        idx = pl.DataFrame({"k": key}).select(pl.int_range(pl.len(), dtype=pl.Int64).sort_by("k", maintain_order=True)).to_series().to_numpy()
        key = key[idx]
        u, ts = (key >> bits_t).astype(np.int32), (key & ((1 << bits_t) - 1)) + tmin
        del key
    else:
        idx = np.lexsort((row, ts, u))
        u, ts = u[idx], ts[idx]

    # exact duplicates share (user, ts): compare only rows with such a neighbour
    if n_in > 1:
        same = (u[1:] == u[:-1]) & (ts[1:] == ts[:-1])
        cand = np.zeros(n_in, dtype=bool)
        cand[1:] |= same
        cand[:-1] |= same
        ci = np.flatnonzero(cand)
        if len(ci):
            src = idx[ci]
            sub = pl.DataFrame({"u": u[ci], "i": item[src], "t": ts[ci], "e": ev[src], "c": ch[src], "v": value[src].view(np.int64)})
            first = sub.select(pl.struct(pl.all()).is_first_distinct()).to_series().to_numpy()
            if not first.all():
                keep = np.ones(n_in, dtype=bool)
                keep[ci[~first]] = False
                idx, u, ts = idx[keep], u[keep], ts[keep]
    rating = np.full(len(idx), np.nan) if rating is None else rating[idx]
    return Events(users, u, item[idx], ts, ev[idx], ch[idx], rating, row[idx].astype(np.int64)), n_in


@dataclass
class Seqs:
    """Positions of the users of one partition (CSR: user k owns ``off[k]:off[k+1]``)."""

    users: pl.Series               # user ids (sorted)
    off: np.ndarray                # int64, len(users) + 1
    item: np.ndarray               # int32 item code
    ev: np.ndarray                 # int32 event code (-1 = null)
    ch: np.ndarray                 # int32 channel code (-1 = null)
    ts: np.ndarray                 # int64
    rating: np.ndarray             # float64 (NaN = none)
    sess: Optional[np.ndarray]     # int32 session number per user, or None

    ARRAYS = ("off", "item", "ev", "ch", "ts", "rating", "sess")

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.off)

    def user_of_position(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.users), dtype=np.int64), self.lengths)

    def keep(self, pos_mask: np.ndarray, min_len: int) -> "Seqs":
        """Positions where ``pos_mask`` holds, then users with >= ``min_len`` positions."""
        uop = self.user_of_position()
        lens = np.bincount(uop[pos_mask], minlength=len(self.users))
        ok = lens >= min_len
        pos_mask = pos_mask & ok[uop]
        off = np.zeros(int(ok.sum()) + 1, dtype=np.int64)
        np.cumsum(lens[ok], out=off[1:])
        take = lambda a: None if a is None else a[pos_mask]  # noqa: E731
        return Seqs(self.users.filter(pl.Series(ok)), off, take(self.item), take(self.ev), take(self.ch), take(self.ts),
                    take(self.rating), take(self.sess))

    def save(self, d: Path) -> None:
        d.mkdir(parents=True)
        pl.DataFrame({"user": self.users}).write_parquet(d / "users.parquet")
        for name in self.ARRAYS:
            a = getattr(self, name)
            if a is not None and not (name == "rating" and np.isnan(a).all()):  # no ratings: nothing to keep
                np.save(d / f"{name}.npy", a, allow_pickle=False)

    @classmethod
    def load(cls, d: Path) -> "Seqs":
        def get(name):
            p = d / f"{name}.npy"
            return np.load(p, allow_pickle=False) if p.is_file() else None

        s = cls(pl.read_parquet(d / "users.parquet")["user"], *(get(n) for n in cls.ARRAYS))
        if s.rating is None:
            s.rating = np.full(len(s.item), np.nan)
        return s


def positions(e: Events, ev_rank: np.ndarray, collapse_repeats: bool, session_gap: Optional[int], min_len: int) -> Seqs:
    """Events -> positions (repeats merged, sessions) -> users with >= ``min_len`` positions.

    ``ev_rank[code + 1]`` is the funnel rank of event code ``code`` (-1 outside the funnel).
    """
    u, item, ts, ev, ch, rating = e.u, e.item, e.ts, e.ev, e.ch, e.rating
    if collapse_repeats and e.n:
        new = np.ones(e.n, dtype=bool)
        new[1:] = (item[1:] != item[:-1]) | (u[1:] != u[:-1])
        starts = np.flatnonzero(new)
        run = np.cumsum(new) - 1
        # the furthest funnel stage wins; among equal stages the later input row
        key = ((ev_rank[ev + 1].astype(np.int64) + 2) << 40) | e.row
        ev = ev[key == np.maximum.reduceat(key, starts)[run]]
        # the last rating of the run (a purchase followed by its rating: one rated position)
        rated = ~np.isnan(rating)
        if rated.any():
            last = np.maximum.reduceat(np.where(rated, np.arange(e.n), -1), starts)
            rating = np.where(last >= 0, rating[np.maximum(last, 0)], np.nan)
        else:
            rating = np.full(len(starts), np.nan)
        u, item, ts, ch = u[starts], item[starts], ts[starts], ch[starts]
    n_users = len(e.users)
    lens = np.bincount(u, minlength=n_users)
    off = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(lens, out=off[1:])
    sess = None
    if session_gap is not None:
        gap = np.zeros(len(ts), dtype=np.int64)
        if len(ts) > 1:
            gap[1:] = (np.diff(ts) > session_gap) & (u[1:] == u[:-1])
        c = np.cumsum(gap)
        sess = (c - c[off[u]]).astype(np.int32)  # per user, starting at 0
    s = Seqs(e.users, off, item, ev, ch, ts, rating, sess)
    return s.keep(np.ones(len(item), dtype=bool), min_len)


def kth_smallest(parts: list[Path], k: int) -> int:
    """The k-th smallest (0-based) of all positions' ``ts`` across partitions, in bounded memory
    (bisection over the value range, counting with numpy)."""
    arrays = [np.load(p / "ts.npy", allow_pickle=False, mmap_mode="r") for p in parts]
    lo = min(int(a.min()) for a in arrays if len(a))
    hi = max(int(a.max()) for a in arrays if len(a))
    while lo < hi:  # smallest x with count(ts <= x) >= k + 1
        mid = (lo + hi) // 2
        if sum(int(np.count_nonzero(a <= mid)) for a in arrays) >= k + 1:
            hi = mid
        else:
            lo = mid + 1
    return lo
