"""Per-user positions -> split samples (numpy), leakage check, pseudonyms.

Vectorised over one hash partition of users at a time (:class:`~ecomtrain.data.seqs.Seqs`,
CSR arrays). The split decides three positions per user:

    T  = end of the training input      (train windows cover [0, T))
    V  = validation target position     (history [V-H, V), -1 = no sample)
    S  = test target position           (history [S-H, S), -1 = no sample)

leave-one-out: T = V = n-2, S = n-1. temporal: T = #events before t_val,
V = T if the user has an event in [t_val, t_test), S = #events before t_test
if one is at or after t_test. A sample is a record (user, lo, end, tgt): history
positions [lo, end), target position tgt (-1 for training windows). The leakage
check proves on these records that no training window reaches a val/test target
position, that eval histories stop strictly before their target, and that no
training input is later than the user's targets. :func:`gather` turns records into
a :class:`Block` (flat arrays + lengths) that a shard sink writes.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import polars as pl

from .importers import DataError
from .seqs import Seqs

LIST_FIELDS = ("items", "events", "channels", "ts")  # always present; 'sessions', 'weights', 'ratings' when built
OPTIONAL_FIELDS = ("sessions", "weights", "ratings")
TARGETS = {"items": "target", "events": "target_event", "ts": "target_ts", "channels": "target_channel",
           "weights": "target_weight", "ratings": "target_rating"}


def pseudonymise(users: pl.Series, key_env: str) -> pl.Series:
    """HMAC-SHA256(key, user id), hex, first 32 chars (128 bits: collisions ~never at 1e9 users)."""
    key = os.environ.get(key_env)
    if not key:
        raise DataError(f"pseudonymise_users is on but the environment variable {key_env} holding the HMAC key is unset or empty")
    k = key.encode()
    # one HMAC per distinct user, never per event; hmac.digest is OpenSSL's one-shot HMAC (~0.5 us)
    return pl.Series("user", [hmac.digest(k, u.encode(), "sha256").hex()[:32] for u in users.to_list()], dtype=pl.Utf8)


def split_points(s: Seqs, method: str, t_val: Optional[int], t_test: Optional[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(T, V, S) per user, int64; -1 = no val / test sample."""
    n = s.lengths.astype(np.int64)
    if method == "leave_one_out":
        return n - 2, n - 2, n - 1
    uop = s.user_of_position()
    T = np.bincount(uop[s.ts < t_val], minlength=len(n)).astype(np.int64)
    BT = np.bincount(uop[s.ts < t_test], minlength=len(n)).astype(np.int64)
    V = np.where((BT > T) & (T >= 1), T, -1)
    S = np.where((n > BT) & (BT >= 1), BT, -1)
    return T, V, S


@dataclass
class Records:
    """Samples of one split, in shard order: history [lo, end) of user ``user``, target ``tgt`` (-1: none)."""

    user: np.ndarray
    lo: np.ndarray
    end: np.ndarray
    tgt: np.ndarray

    def __len__(self) -> int:
        return len(self.user)


def make_records(T: np.ndarray, V: np.ndarray, S: np.ndarray, max_history: int, order: np.ndarray) -> dict[str, Records]:
    """Records per split; users in ``order`` (a permutation), training windows of each user
    ending at T, T-H, T-2H, ... while > 1 (an input needs 2 items for a causal step)."""
    H = max_history
    u = order[T[order] >= 2]
    k = (T[u] - 2) // H + 1
    tu = np.repeat(u, k)
    first = np.cumsum(k) - k
    w = np.arange(len(tu)) - np.repeat(first, k)
    end = T[tu] - w * H
    out = {"train": Records(tu, np.maximum(0, end - H), end, np.full(len(tu), -1, dtype=np.int64))}
    for split, pos in (("val", V), ("test", S)):
        eu = order[pos[order] >= 1]
        e = pos[eu]
        out[split] = Records(eu, np.maximum(0, e - H), e, e.copy())
    return out


def check_leakage(recs: dict[str, Records], s: Seqs, T: np.ndarray) -> None:
    """Raise if any training window of a user covers that user's val/test target
    position, if an eval history reaches its own target, or if a training input
    is later in time than that user's targets."""
    tr = recs["train"]
    max_end = np.full(len(s.users), -1, dtype=np.int64)
    np.maximum.at(max_end, tr.user, tr.end)
    for split in ("val", "test"):
        r = recs[split]
        bad = np.flatnonzero(r.end > r.tgt)
        if len(bad):
            raise DataError(f"leakage check failed: {len(bad)} {split} sample(s) whose history includes the target (user {s.users[int(r.user[bad[0]])]})")
        me = max_end[r.user]
        bad = np.flatnonzero((me >= 0) & (me > r.tgt))
        if len(bad):
            i = bad[0]
            raise DataError(
                f"leakage check failed: {len(bad)} user(s) whose training input contains the {split} target "
                f"(user {s.users[int(r.user[i])]}: train reaches position {me[i]}, target at {r.tgt[i]})"
            )
        t = T[r.user]
        has = t >= 1
        base = s.off[r.user]
        late = np.zeros(len(r), dtype=bool)
        late[has] = s.ts[base[has] + t[has] - 1] > s.ts[base[has] + r.tgt[has]]
        bad = np.flatnonzero(late)
        if len(bad):
            raise DataError(f"leakage check failed: {len(bad)} user(s) with training events later than their {split} target "
                            f"(user {s.users[int(r.user[bad[0]])]})")


def ragged_index(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(starts[i], starts[i] + lens[i])``."""
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    return np.arange(total, dtype=np.int64) + np.repeat(starts.astype(np.int64) - (np.cumsum(lens) - lens), lens)


@dataclass
class Block:
    """Samples as flat arrays: sample i owns ``lists[f][cum[i]:cum[i+1]]`` (cum = cumsum of ``lens``)
    and ``user[ucum[i]:ucum[i+1]]`` (UTF-8 bytes); ``targets`` holds one value per sample (eval splits)."""

    lens: np.ndarray                 # int64 history length per sample
    user: np.ndarray                 # uint8, UTF-8 bytes of the user ids, concatenated
    user_len: np.ndarray             # int64 bytes per user id
    lists: dict[str, np.ndarray]     # field -> flat values (LIST_FIELDS + the optional ones built)
    targets: dict[str, np.ndarray] = field(default_factory=dict)  # 'target', 'target_event', ... -> per sample

    def __len__(self) -> int:
        return len(self.lens)

    def slice(self, a: int, b: int) -> "Block":
        if not hasattr(self, "_cum"):
            self._cum = np.concatenate([[0], np.cumsum(self.lens)])
            self._ucum = np.concatenate([[0], np.cumsum(self.user_len)])
        cum, ucum = self._cum, self._ucum
        return Block(self.lens[a:b], self.user[ucum[a]:ucum[b]], self.user_len[a:b],
                     {k: v[cum[a]:cum[b]] for k, v in self.lists.items()}, {k: v[a:b] for k, v in self.targets.items()})

    def dicts(self) -> Iterator[dict]:
        """The samples as the dicts a reader yields (JSON-compatible: ratings NaN -> None)."""
        lists = {k: v.tolist() for k, v in self.lists.items()}
        if "ratings" in lists:
            lists["ratings"] = [None if x != x else x for x in lists["ratings"]]
        targets = {k: v.tolist() for k, v in self.targets.items()}
        if "target_rating" in targets:
            targets["target_rating"] = [None if x != x else x for x in targets["target_rating"]]
        ub = self.user.tobytes()
        a = ua = 0
        for i, (n, un) in enumerate(zip(self.lens.tolist(), self.user_len.tolist())):
            d = {"user": ub[ua:ua + un].decode()}
            for k, v in lists.items():
                d[k] = v[a:a + n]
            for k, v in targets.items():
                d[k] = v[i]
            a, ua = a + n, ua + un
            yield d


@dataclass
class Tables:
    """Code -> output value lookups, indexed by code + 1 (code -1 = null)."""

    item: np.ndarray                  # item code -> idx (1..N); indexed by code (no null items)
    event: np.ndarray                 # -> event index (-1 = null / unknown)
    channel: np.ndarray               # -> channel index (-1 = null)
    weight: Optional[np.ndarray]      # -> event weight (float64), or None when not built
    fields: tuple                     # list fields stored, in order


def gather(s: Seqs, r: Records, users_utf8: tuple[np.ndarray, np.ndarray], tab: Tables) -> Block:
    """The samples of records ``r`` as a Block."""
    lens = r.end - r.lo
    idx = ragged_index(s.off[r.user] + r.lo, lens)
    ub, uoff = users_utf8
    ulen = uoff[r.user + 1] - uoff[r.user]
    user = ub[ragged_index(uoff[r.user], ulen)]
    ev = s.ev[idx]
    src = {
        "items": lambda: tab.item[s.item[idx]], "events": lambda: tab.event[ev + 1], "channels": lambda: tab.channel[s.ch[idx] + 1],
        "ts": lambda: s.ts[idx], "sessions": lambda: s.sess[idx], "weights": lambda: tab.weight[ev + 1], "ratings": lambda: s.rating[idx],
    }
    lists = {f: src[f]() for f in tab.fields}
    targets = {}
    if len(r) and r.tgt[0] >= 0:
        p = s.off[r.user] + r.tgt
        tv = {"items": lambda: tab.item[s.item[p]], "events": lambda: tab.event[s.ev[p] + 1], "ts": lambda: s.ts[p],
              "channels": lambda: tab.channel[s.ch[p] + 1], "weights": lambda: tab.weight[s.ev[p] + 1], "ratings": lambda: s.rating[p]}
        targets = {TARGETS[f]: tv[f]() for f in ("items", "events", "ts", "channels", "weights", "ratings") if f in tab.fields}
    return Block(lens, user, ulen, lists, targets)


def users_utf8(users: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """(UTF-8 bytes of all ids concatenated, offsets) for :func:`gather`."""
    ub = np.frombuffer("".join(users.to_list()).encode(), dtype=np.uint8)
    off = np.zeros(users.len() + 1, dtype=np.int64)
    np.cumsum(users.str.len_bytes().to_numpy(), out=off[1:])
    return ub, off
