"""Build: normalised events -> per-user sequences -> splits -> WebDataset shards.

    ecomtrain data build --source synth --input data/raw --out data/quickstart

Steps (polars, lazy until the per-user sequences are formed):
1. drop exact duplicate events, keep the chosen event types;
2. order each user's events by time, ties kept in input order (``_row``),
   never broken by item id;
3. optionally merge consecutive events on the same item into one position
   (view -> click -> cart of one item is one step of the sequence, carrying the
   furthest funnel stage);
4. drop users with fewer than ``min_user_events`` positions, index the items
   (1..N, 0 is padding);
5. leave-one-out split per user: train = all but the last two positions,
   val target = second to last, test target = last;
6. leakage check, shards (webdataset TarWriter, JSON members only), catalog,
   ``manifest.json`` with sample counts and sha256 per shard.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path
from typing import Optional

import polars as pl

from .. import __version__
from .importers import DataError, Imported

SCHEMA_VERSION = 1
SPLITS = ("train", "val", "test")
# Funnel order: when positions merge, the furthest stage wins.
FUNNEL = {"view": 0, "click": 1, "cart": 2, "purchase": 3}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ShardSink:
    """Size-targeted shards through webdataset's TarWriter; records counts."""

    def __init__(self, out: Path, split: str, max_samples: int, max_bytes: int):
        self.out, self.split = out, split
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.shards: list[dict] = []
        self._writer = None
        self._count = 0
        self._bytes = 0
        self.total = 0

    def _open(self) -> None:
        import webdataset as wds

        name = f"{self.split}-{len(self.shards):06d}.tar"
        self._stream = open(self.out / name, "wb")
        self._writer = wds.TarWriter(self._stream)
        self.shards.append({"name": name, "num_samples": 0})
        self._count = self._bytes = 0

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            info = self.shards[-1]
            path = self.out / info["name"]
            info.update(num_samples=self._count, bytes=path.stat().st_size, sha256=sha256_file(path))

    def write(self, sample: dict) -> None:
        payload = json.dumps(sample, separators=(",", ":")).encode()
        if self._writer is None or self._count >= self.max_samples or self._bytes + len(payload) > self.max_bytes:
            self._close()
            self._open()
        self._writer.write({"__key__": f"s{self.total:010d}", "json": payload})
        self._count += 1
        self._bytes += len(payload) + 1024  # tar header + padding
        self.total += 1

    def finish(self) -> dict:
        self._close()
        return {"num_samples": self.total, "shards": self.shards}


def sequences(imp: Imported, event_types: Optional[list[str]], collapse_repeats: bool, min_len: int) -> pl.DataFrame:
    """One row per user: lists item, event, channel, ts in chronological order."""
    ev = imp.events
    if event_types:
        ev = ev.filter(pl.col("event").is_in(event_types))
    dedup_cols = ["user", "item", "ts", "event", "channel", "value"]
    ev = ev.unique(subset=dedup_cols, keep="first", maintain_order=True)
    ev = ev.sort(["user", "ts", "_row"])
    rank = pl.col("event").replace_strict(FUNNEL, default=-1, return_dtype=pl.Int8)
    if collapse_repeats:
        new_run = (pl.col("item") != pl.col("item").shift(1)) | (pl.col("user") != pl.col("user").shift(1))
        ev = (
            ev.with_columns(_run=new_run.fill_null(True).cum_sum(), _rank=rank)
            .group_by("_run", maintain_order=True)
            .agg(
                pl.col("user").first(),
                pl.col("item").first(),
                pl.col("ts").first(),
                pl.col("event").sort_by(["_rank", "_row"]).last(),
                pl.col("channel").first(),
            )
        )
    seqs = (
        ev.group_by("user", maintain_order=True)
        .agg(pl.col("item"), pl.col("event"), pl.col("channel"), pl.col("ts"))
        .filter(pl.col("item").list.len() >= min_len)
    )
    return seqs.collect()


def check_no_leakage(train_len: int, seq_len: int, ts: list[int]) -> None:
    """The test target (last position) and the val target are not in the
    training input, and nothing in the input is later than its target."""
    if train_len != seq_len - 2:
        raise AssertionError(f"leakage: train input has {train_len} of {seq_len} positions")
    if train_len and ts[train_len - 1] > ts[seq_len - 2]:
        raise AssertionError("leakage: training input is later than the validation target")


def build(
    imp: Imported,
    out: str | Path,
    *,
    event_types: Optional[list[str]] = None,
    min_user_events: int = 3,
    max_history: int = 200,
    collapse_repeats: bool = True,
    shard_max_samples: int = 5000,
    shard_max_bytes: int = 64 * 1024 * 1024,
    seed: int = 0,
    source: Optional[dict] = None,
    log=print,
) -> dict:
    t_start = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "manifest.json").exists():
        (out / "manifest.json").unlink()  # a half-rebuilt folder must not look valid
    for old in out.glob("*.tar"):
        old.unlink()

    try:
        seqs = sequences(imp, event_types, collapse_repeats, max(3, min_user_events))
    except pl.exceptions.PolarsError as exc:
        raise DataError(f"{imp.description}: could not read events: {exc}") from None
    if seqs.height == 0:
        raise DataError(f"{imp.description}: no user has {max(3, min_user_events)} or more events after filtering; nothing to build")

    vocab = seqs.select(pl.col("item").explode().unique().sort()).to_series().to_list()
    item_index = {it: i + 1 for i, it in enumerate(vocab)}
    event_vocab = sorted({e for lst in seqs["event"].to_list() for e in lst}, key=lambda e: (FUNNEL.get(e, 99), e))
    channel_vocab = sorted({c for lst in seqs["channel"].to_list() for c in lst if c is not None})
    ev_idx = {e: i for i, e in enumerate(event_vocab)}
    ch_idx = {c: i for i, c in enumerate(channel_vocab)}

    sinks = {s: ShardSink(out, s, shard_max_samples, shard_max_bytes) for s in SPLITS}
    counts = [0] * (len(vocab) + 1)
    order = list(range(seqs.height))
    random.Random(seed).shuffle(order)  # shards are not sorted by user
    users, items_col, ev_col, ch_col, ts_col = (seqs[c].to_list() for c in ("user", "item", "event", "channel", "ts"))
    num_events = 0
    for r in order:
        items = [item_index[i] for i in items_col[r]]
        evs = [ev_idx[e] for e in ev_col[r]]
        chs = [ch_idx.get(c, -1) if c is not None else -1 for c in ch_col[r]]
        ts = ts_col[r]
        n = len(items)
        num_events += n
        check_no_leakage(n - 2, n, ts)
        for i in items[: n - 2]:
            counts[i] += 1

        def sample(end: int, target: Optional[int]) -> dict:
            lo = max(0, end - max_history)
            s = {"user": users[r], "items": items[lo:end], "events": evs[lo:end], "channels": chs[lo:end], "ts": ts[lo:end]}
            if target is not None:
                s.update(target=items[target], target_event=evs[target], target_ts=ts[target])
            return s

        # Training input: every position but the last two; causal training
        # predicts each next item inside it. Long histories are kept whole
        # (up to max_history at the *end*, plus earlier windows).
        for end in range(n - 2, 1, -max_history):
            sinks["train"].write(sample(end, None))
        sinks["val"].write(sample(n - 2, n - 2))
        sinks["test"].write(sample(n - 1, n - 1))

    splits = {s: sinks[s].finish() for s in SPLITS}

    cat = pl.DataFrame({"item": vocab, "idx": list(range(1, len(vocab) + 1)), "train_count": counts[1:]})
    if imp.items is not None:
        attrs = imp.items.with_columns(pl.col("item").cast(pl.Utf8)).unique("item", keep="first")
        cat = cat.join(attrs, on="item", how="left")
    cat.write_parquet(out / "items.parquet")

    manifest = {
        "schema_version": SCHEMA_VERSION,
        "created_by": f"ecomtrain {__version__}",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": source or {"description": imp.description},
        "num_users": seqs.height,
        "num_items": len(vocab),
        "num_events": num_events,
        "pad_id": 0,
        "item_file": "items.parquet",
        "event_types": event_vocab,
        "channels": channel_vocab,
        "split": {"method": "leave_one_out", "max_history": max_history, "collapse_repeats": collapse_repeats, "min_user_events": min_user_events},
        "leakage_check": "passed",
        "splits": splits,
        "build_seconds": round(time.time() - t_start, 2),
    }
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(out / "manifest.json")
    log(
        f"built {out}: {manifest['num_users']} users, {manifest['num_items']} items, "
        + ", ".join(f"{s} {splits[s]['num_samples']} samples in {len(splits[s]['shards'])} shards" for s in SPLITS)
    )
    return manifest


def load_manifest(path: str | Path) -> dict:
    p = Path(path)
    mf = p / "manifest.json" if p.is_dir() or not p.suffix else p
    if not mf.is_file():
        raise DataError(f"no manifest.json in {p} (build it with `ecomtrain data build --out {p}`)")
    try:
        m = json.loads(mf.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{mf}: not valid JSON: {exc}") from None
    for key in ("schema_version", "num_users", "num_items", "splits"):
        if key not in m:
            raise DataError(f"{mf}: missing field '{key}'")
    if m["schema_version"] != SCHEMA_VERSION:
        raise DataError(f"{mf}: schema_version {m['schema_version']} is not supported (expected {SCHEMA_VERSION}); rebuild the dataset")
    return m
