"""Per-user sequences -> split samples (as JSON strings), leakage check, pseudonyms.

All vectorised in polars over one hash partition of users at a time: a
sequence row holds the user's lists (items, events, channels, ts[, sessions,
weights]) plus three positions decided by the split:

    T  = end of the training input      (train windows cover [0, T))
    V  = validation target position     (history [V-H, V), null = no sample)
    S  = test target position           (history [S-H, S), null = no sample)

leave-one-out: T = V = n-2, S = n-1. temporal: T = #events before t_val,
V = T if the user has an event in [t_val, t_test), S = #events before t_test
if one is at or after t_test. The leakage check then proves on the produced
samples that no training window reaches a val/test target position and that
eval histories stop strictly before their target.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Optional

import polars as pl

from .importers import DataError

LIST_FIELDS = ("items", "events", "channels", "ts")  # always present; 'sessions', 'weights', 'ratings' when built


def pseudonymise(users: pl.Series, key_env: str) -> pl.Series:
    """HMAC-SHA256(key, user id), hex, first 32 chars (128 bits: collisions ~never at 1e9 users)."""
    key = os.environ.get(key_env)
    if not key:
        raise DataError(f"pseudonymise_users is on but the environment variable {key_env} holding the HMAC key is unset or empty")
    k = key.encode()
    # one HMAC per distinct user of the partition (~1 us each), never per event
    return pl.Series("user", [hmac.new(k, u.encode(), hashlib.sha256).hexdigest()[:32] for u in users.to_list()], dtype=pl.Utf8)


def split_positions(seqs: pl.DataFrame, method: str, t_val: Optional[int], t_test: Optional[int]) -> pl.DataFrame:
    n = pl.col("items").list.len()
    if method == "leave_one_out":
        return seqs.with_columns(_T=(n - 2).cast(pl.Int64), _V=(n - 2).cast(pl.Int64), _S=(n - 1).cast(pl.Int64))
    before_val = pl.col("ts").list.eval((pl.element() < t_val).sum()).list.first().cast(pl.Int64)
    before_test = pl.col("ts").list.eval((pl.element() < t_test).sum()).list.first().cast(pl.Int64)
    return seqs.with_columns(_T=before_val, _BT=before_test).with_columns(
        _V=pl.when((pl.col("_BT") > pl.col("_T")) & (pl.col("_T") >= 1)).then(pl.col("_T")),
        _S=pl.when((n > pl.col("_BT")) & (pl.col("_BT") >= 1)).then(pl.col("_BT")),
    ).drop("_BT")


def _sample_struct(fields: list[str], lo: pl.Expr, end: pl.Expr, target: Optional[pl.Expr]) -> list[pl.Expr]:
    ln = end - lo
    cols = [pl.col("user")] + [pl.col(f).list.slice(lo, ln).alias(f) for f in fields]
    if target is not None:
        cols += [
            pl.col("items").list.get(target).alias("target"),
            pl.col("events").list.get(target).alias("target_event"),
            pl.col("ts").list.get(target).alias("target_ts"),
            pl.col("channels").list.get(target).alias("target_channel"),
        ]
        if "weights" in fields:
            cols.append(pl.col("weights").list.get(target).alias("target_weight"))
        if "ratings" in fields:
            cols.append(pl.col("ratings").list.get(target).alias("target_rating"))
    return cols


def make_samples(seqs: pl.DataFrame, max_history: int) -> dict[str, pl.DataFrame]:
    """Frames per split with columns user, _lo, _end, _tgt and ``json`` (the sample)."""
    H = max_history
    fields = [f for f in ("items", "events", "channels", "ts", "sessions", "weights", "ratings") if f in seqs.columns]
    # training windows: ends T, T-H, T-2H, ... while > 1 (an input needs 2 items for a causal step)
    k = pl.when(pl.col("_T") >= 2).then((pl.col("_T") - 2) // H + 1).otherwise(0)
    train = (
        seqs.filter(pl.col("_T") >= 2)
        .with_columns(_w=pl.int_ranges(0, k))
        .explode("_w")
        .with_columns(_end=pl.col("_T") - pl.col("_w") * H)
        .with_columns(_lo=pl.max_horizontal(pl.lit(0, pl.Int64), pl.col("_end") - H), _tgt=pl.lit(None, dtype=pl.Int64))
    )
    out = {"train": train.select("user", "_lo", "_end", "_tgt", pl.struct(_sample_struct(fields, pl.col("_lo"), pl.col("_end"), None)).struct.json_encode().alias("json"))}
    for split, pos in (("val", "_V"), ("test", "_S")):
        ev = seqs.filter(pl.col(pos).is_not_null() & (pl.col(pos) >= 1)).with_columns(
            _end=pl.col(pos), _lo=pl.max_horizontal(pl.lit(0, pl.Int64), pl.col(pos) - H), _tgt=pl.col(pos)
        )
        out[split] = ev.select(
            "user", "_lo", "_end", "_tgt",
            pl.struct(_sample_struct(fields, pl.col("_lo"), pl.col("_end"), pl.col("_tgt"))).struct.json_encode().alias("json"),
        )
    return out


def check_leakage(samples: dict[str, pl.DataFrame], seqs: pl.DataFrame) -> None:
    """Raise if any training window of a user covers that user's val/test target
    position, if an eval history reaches its own target, or if a training input
    is later in time than that user's targets."""
    tr = samples["train"].group_by("user").agg(pl.col("_end").max().alias("_max_end"))
    last_ts = seqs.select("user", pl.col("ts"), "_T")
    for split in ("val", "test"):
        ev = samples[split]
        bad_hist = ev.filter(pl.col("_end") > pl.col("_tgt"))
        if bad_hist.height:
            raise DataError(f"leakage check failed: {bad_hist.height} {split} sample(s) whose history includes the target (user {bad_hist['user'][0]})")
        j = ev.join(tr, on="user", how="inner").filter(pl.col("_max_end") > pl.col("_tgt"))
        if j.height:
            raise DataError(
                f"leakage check failed: {j.height} user(s) whose training input contains the {split} target "
                f"(user {j['user'][0]}: train reaches position {j['_max_end'][0]}, target at {j['_tgt'][0]})"
            )
        t = ev.join(last_ts, on="user").filter(pl.col("_T") >= 1).with_columns(
            _tr_ts=pl.col("ts").list.get(pl.col("_T") - 1), _tg_ts=pl.col("ts").list.get(pl.col("_tgt"))
        ).filter(pl.col("_tr_ts") > pl.col("_tg_ts"))
        if t.height:
            raise DataError(f"leakage check failed: {t.height} user(s) with training events later than their {split} target (user {t['user'][0]})")
