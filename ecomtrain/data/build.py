"""Build: normalised events -> per-user sequences -> splits -> WebDataset shards.

    ecomtrain data build --source synth --input data/raw --out data/quickstart

Memory stays bounded by working on hash partitions of users (polars, lazy
and streaming where it matters; raw events never become Python objects):

1. stage: events (event types chosen) are streamed once into
   ``OUT/.work/events/_p=P/`` partitioned by hash(user) % P, P sized so that a
   partition holds about ``partition_events`` (default 4 M) events;
2. per partition: drop exact duplicates, order each user's events by
   (ts, file row) -- ties stay in file order, never broken by item id;
3. k-core (optional): drop users/items with fewer than k events, repeated
   until stable (one streaming pass over the partitions per round);
4. per partition: merge consecutive repeats (optional), sessionise by an
   inactivity gap (optional), drop users with < ``min_user_events`` positions;
5. item vocabulary (1..N, 0 = padding; numeric ids in numeric order);
6. per partition: split (leave-one-out or global temporal), samples rendered
   to JSON by polars, leakage check, appended to size-targeted shards
   (webdataset TarWriter, JSON members only); catalog ``items.parquet``;
   ``manifest.json`` with counts, sha256 per shard and summary statistics.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tarfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import polars as pl

from .. import __version__
from .importers import DataError, Imported
from . import catalog
from . import cold as cold_items_
from .samples import check_leakage, make_samples, pseudonymise, split_positions

SCHEMA_VERSION = 1
SPLITS = ("train", "val", "test")
# Funnel order: when positions merge, the furthest stage wins.
FUNNEL = {"view": 0, "click": 1, "fav": 2, "cart": 3, "purchase": 4}
DEDUP_COLS = ["user", "item", "ts", "event", "channel", "value"]
DEFAULT_KEY_ENV = "ECOMTRAIN_PSEUDONYM_KEY"


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
        # fixed mtime: the same input gives byte-identical shards (and sha256);
        # encoder=False: payloads are already JSON bytes
        self._writer = wds.TarWriter(self._stream, encoder=False, mtime=0)
        # webdataset 1.0 computes its ``format`` argument but never passes it to
        # tarfile, which then writes PAX headers: ~2x the per-sample cost.
        # Plain USTAR suffices (member names are ~16 ASCII chars).
        self._writer.tarstream.format = tarfile.USTAR_FORMAT
        self.shards.append({"name": name, "num_samples": 0})
        self._count = self._bytes = 0

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            info = self.shards[-1]
            path = self.out / info["name"]
            info.update(num_samples=self._count, bytes=path.stat().st_size, sha256=sha256_file(path))

    def write_json(self, payload: bytes) -> None:
        if self._writer is None or self._count >= self.max_samples or self._bytes + len(payload) > self.max_bytes:
            self._close()
            self._open()
        self._writer.write({"__key__": f"s{self.total:010d}", "json": payload})
        self._count += 1
        self._bytes += len(payload) + 1024  # tar header + padding
        self.total += 1

    def write(self, sample: dict) -> None:
        self.write_json(json.dumps(sample, separators=(",", ":")).encode())

    def finish(self) -> dict:
        self._close()
        return {"num_samples": self.total, "shards": self.shards}


def _positions(ev: pl.LazyFrame, collapse_repeats: bool, session_gap: Optional[int], min_len: int) -> pl.LazyFrame:
    """Sorted, deduplicated events of one partition -> one row per user with lists."""
    if collapse_repeats:
        rank = pl.col("event").replace_strict(FUNNEL, default=-1, return_dtype=pl.Int8)
        new_run = (pl.col("item") != pl.col("item").shift(1)) | (pl.col("user") != pl.col("user").shift(1))
        ev = (
            ev.with_columns(_run=new_run.fill_null(True).cum_sum(), _rank=rank)
            .group_by("_run", maintain_order=True)
            .agg(
                pl.col("user").first(), pl.col("item").first(), pl.col("ts").first(),
                pl.col("event").sort_by(["_rank", "_row"]).last(), pl.col("channel").first(),
            )
        )
    aggs = [pl.col("item").alias("items"), pl.col("event").alias("events"), pl.col("channel").alias("channels"), pl.col("ts")]
    if session_gap is not None:
        gap = (pl.col("ts").diff().over("user") > session_gap).fill_null(False)
        ev = ev.with_columns(_sess=gap.cast(pl.Int32).cum_sum().over("user"))
        aggs.append(pl.col("_sess").alias("sessions"))
    return ev.group_by("user", maintain_order=True).agg(aggs).filter(pl.col("items").list.len() >= min_len)


def _kcore(parts: list[Path], k_users: int, k_items: int, log, max_rounds: int = 50):
    """Users and items kept by iterative k-core filtering (None = no filter)."""
    if k_users <= 1 and k_items <= 1:
        return None, None
    users = items = None
    for rnd in range(max_rounds):
        lf = pl.scan_parquet(parts)
        if users is not None:
            lf = lf.join(users.lazy(), on="user", how="semi").join(items.lazy(), on="item", how="semi")
        ic = lf.group_by("item").len().filter(pl.col("len") >= max(1, k_items)).select("item").collect(engine="streaming")
        uc = (
            lf.join(ic.lazy(), on="item", how="semi").group_by("user").len()
            .filter(pl.col("len") >= max(1, k_users)).select("user").collect(engine="streaming")
        )
        stable = users is not None and uc.height == users.height and ic.height == items.height
        users, items = uc, ic
        if stable:
            log(f"k-core (users>={k_users}, items>={k_items}) stable after {rnd + 1} rounds: {users.height} users, {items.height} items")
            return users, items
    raise DataError(f"k-core filtering did not converge in {max_rounds} rounds")


def _vocab(items: pl.Series) -> list[str]:
    items = items.unique()
    nums = items.cast(pl.Int64, strict=False)
    if nums.null_count() == 0:  # all numeric: 1, 2, ..., 10 rather than 1, 10, 2
        return pl.DataFrame({"i": items, "n": nums}).sort("n")["i"].to_list()
    return items.sort().to_list()


def build(
    imp: Imported,
    out: str | Path,
    *,
    event_types: Optional[list[str]] = None,
    event_weights: Optional[dict[str, float]] = None,
    min_user_events: int = 3,
    kcore_users: int = 0,
    kcore_items: int = 0,
    max_history: int = 200,
    collapse_repeats: bool = True,
    split: str = "leave_one_out",
    temporal_val_fraction: float = 0.1,
    temporal_test_fraction: float = 0.1,
    session_gap: Optional[int] = None,
    pseudonymise_users: bool = False,
    pseudonym_key_env: str = DEFAULT_KEY_ENV,
    shard_max_samples: int = 5000,
    shard_max_bytes: int = 64 * 1024 * 1024,
    partition_events: int = 4_000_000,
    cold_items: float = 0.0,
    seed: int = 0,
    source: Optional[dict] = None,
    log=print,
) -> dict:
    t_start = time.time()
    if split not in ("leave_one_out", "temporal"):
        raise DataError(f"split: unknown method '{split}' (leave_one_out or temporal)")
    if pseudonymise_users:
        pseudonymise(pl.Series(["probe"]), pseudonym_key_env)  # fail before any work if the key is missing
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "manifest.json").exists():
        (out / "manifest.json").unlink()  # a half-rebuilt folder must not look valid
    for old in out.glob("*.tar"):
        old.unlink()
    work = out / ".work"  # holds raw ids; always removed, even on failure
    shutil.rmtree(work, ignore_errors=True)
    try:
        return _build(imp, out, work, t_start, locals(), log)
    except pl.exceptions.PolarsError as exc:
        raise DataError(f"{imp.description}: could not read events: {type(exc).__name__}: {exc}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _build(imp: Imported, out: Path, work: Path, t_start: float, o: dict, log) -> dict:
    min_len = max(3, o["min_user_events"]) if o["split"] == "leave_one_out" else max(2, o["min_user_events"])
    ev = imp.events
    if o["event_types"]:
        ev = ev.filter(pl.col("event").is_in(o["event_types"]))

    phases: dict[str, float] = {}
    tick = [time.time()]

    def phase(name: str) -> None:
        now = time.time()
        phases[name] = round(now - tick[0], 2)
        tick[0] = now

    # 1. stage into hash partitions of users (one streaming pass over the input)
    n_raw = ev.select(pl.len()).collect(engine="streaming").item()
    if n_raw == 0:
        raise DataError(f"{imp.description}: no events" + (f" of types {o['event_types']}" if o["event_types"] else ""))
    P = max(1, math.ceil(n_raw / o["partition_events"]))
    staged = work / "events"
    ev.with_columns(_p=(pl.col("user").hash(seed=1234) % P).cast(pl.UInt32)).sink_parquet(
        pl.PartitionBy(staged, key="_p", include_key=False), mkdir=True
    )
    log(f"staged {n_raw:,} events into {P} user partition(s)")
    phase("stage")

    # 2. dedupe + stable time order per partition
    dedup_dir = work / "dedup"
    dedup_dir.mkdir(parents=True)
    parts = []
    for pdir in sorted(staged.iterdir()):
        df = pl.scan_parquet(pdir / "*.parquet").sort(["user", "ts", "_row"]).unique(subset=DEDUP_COLS, keep="first", maintain_order=True)
        dst = dedup_dir / f"{pdir.name}.parquet"
        df.sink_parquet(dst)
        parts.append(dst)
    shutil.rmtree(staged)
    n_dedup = pl.scan_parquet(parts).select(pl.len()).collect().item()
    phase("dedupe_sort")

    # 3. k-core
    keep_users, keep_items = _kcore(parts, o["kcore_users"], o["kcore_items"], log)
    phase("kcore")

    # 4. positions per user, per partition
    seq_dir = work / "seqs"
    seq_dir.mkdir()
    seq_parts, item_sets, lengths = [], [], []
    ev_counts: dict = {}
    ch_counts: dict = {}
    for src in parts:
        lf = pl.scan_parquet(src)
        if keep_users is not None:  # is_in keeps the (user, ts, row) order; a join need not
            lf = lf.filter(pl.col("user").is_in(keep_users["user"].implode()) & pl.col("item").is_in(keep_items["item"].implode()))
        seqs = _positions(lf, o["collapse_repeats"], o["session_gap"], min_len).collect()
        if seqs.height == 0:
            continue
        item_sets.append(seqs.select(pl.col("items").explode().unique()).to_series())
        lengths.append(seqs["items"].list.len().to_numpy())
        for col, acc in (("events", ev_counts), ("channels", ch_counts)):
            for k, v in seqs.select(pl.col(col).explode().value_counts()).unnest(col).iter_rows():
                acc[k] = acc.get(k, 0) + v
        dst = seq_dir / src.name
        seqs.write_parquet(dst)
        seq_parts.append(dst)
    if not seq_parts:
        raise DataError(f"{imp.description}: no user has {min_len} or more events after filtering; nothing to build")
    vocab = _vocab(pl.concat(item_sets))
    item_map = pl.DataFrame({"item": vocab, "idx": pl.int_range(1, len(vocab) + 1, eager=True).cast(pl.Int64)})
    event_vocab = sorted((e for e in ev_counts if e is not None), key=lambda e: (FUNNEL.get(e, 99), e))
    channel_vocab = sorted(c for c in ch_counts if c is not None)
    lens = np.concatenate(lengths)
    phase("sequences")

    t_val = t_test = None
    if o["split"] == "temporal":
        q = pl.scan_parquet(seq_parts).select(pl.col("ts").explode()).select(
            v=pl.col("ts").quantile(1 - o["temporal_val_fraction"] - o["temporal_test_fraction"], "lower"),
            t=pl.col("ts").quantile(1 - o["temporal_test_fraction"], "lower"),
        ).collect()
        t_val, t_test = int(q["v"][0]), int(q["t"][0])
        if t_val >= t_test:
            t_test = t_val + 1
        log(f"temporal split: val from ts {t_val}, test from ts {t_test}")

    # cold-start items (data/cold.py): chosen among val/test targets, removed from training input
    cold = cold_items_.choose(seq_parts, len(vocab), o["cold_items"], o["seed"], o["split"], t_val)
    if cold.len():
        log(f"cold items: {cold.len()} of {len(vocab)} held out of training input (kept as val/test targets)")

    # 6. samples and shards, partition by partition
    sinks = {s: ShardSink(out, s, o["shard_max_samples"], o["shard_max_bytes"]) for s in SPLITS}
    train_counts = np.zeros(len(vocab) + 1, dtype=np.int64)
    ev_idx = {e: i for i, e in enumerate(event_vocab)}
    ch_idx = {c: i for i, c in enumerate(channel_vocab)}
    weights = o["event_weights"]
    for p, src in enumerate(seq_parts):
        seqs = cold_items_.hold_out(pl.read_parquet(src), cold, o["split"], t_val, min_len)
        exploded = seqs.select("user", "items").with_row_index("_u").explode("items").join(
            item_map, left_on="items", right_on="item", how="left", maintain_order="left"
        )
        idx_lists = exploded.group_by("_u", maintain_order=True).agg(pl.col("idx"))["idx"]
        cols = [
            idx_lists.alias("items"),
            pl.col("events").list.eval(pl.element().replace_strict(ev_idx, default=-1, return_dtype=pl.Int32)),
            pl.col("channels").list.eval(pl.element().replace_strict(ch_idx, default=-1, return_dtype=pl.Int32)),
        ]
        if weights:
            cols.append(pl.col("events").list.eval(pl.element().replace_strict(weights, default=1.0, return_dtype=pl.Float32)).alias("weights"))
        seqs = seqs.with_columns(cols)
        if o["pseudonymise_users"]:
            seqs = seqs.with_columns(pseudonymise(seqs["user"], o["pseudonym_key_env"]))
        seqs = split_positions(seqs, o["split"], t_val, t_test).sample(fraction=1.0, shuffle=True, seed=o["seed"] + p)
        samples = make_samples(seqs, o["max_history"])
        check_leakage(samples, seqs)
        tr_items = seqs.filter(pl.col("_T") > 0).select(pl.col("items").list.slice(0, pl.col("_T")).explode()).to_series()
        train_counts += np.bincount(tr_items.to_numpy(), minlength=len(vocab) + 1)
        for s in SPLITS:
            for payload in samples[s]["json"].to_list():
                sinks[s].write_json(payload.encode())
        del seqs, samples
    splits = {s: sinks[s].finish() for s in SPLITS}
    cold_idx = item_map.filter(pl.col("item").is_in(cold.implode()))["idx"].to_numpy()
    cold_items_.check(train_counts, cold_idx)
    phase("samples_shards")
    for s in ("val", "test"):
        if splits[s]["num_samples"] == 0:
            log(f"warning: split '{s}' is empty")

    cat = item_map.with_columns(train_count=pl.Series(train_counts[1:]), cold=pl.col("item").is_in(cold.implode()))
    if imp.items is not None:
        attrs = imp.items.lazy().with_columns(pl.col("item").cast(pl.Utf8)).collect(engine="streaming")
        attrs = catalog.check(attrs, item_map["item"], imp.description, log)  # duplicate / unknown ids
        cat = cat.join(attrs, on="item", how="left", maintain_order="left")
    cat.write_parquet(out / "items.parquet")
    phase("catalog")

    pct = {f"p{q}": int(np.percentile(lens, q)) for q in (5, 25, 50, 75, 95, 99)}
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "created_by": f"ecomtrain {__version__}",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": o["source"] or {"description": imp.description},
        "num_users": int(len(lens)),
        "num_items": len(vocab),
        "num_events": int(lens.sum()),
        "pad_id": 0,
        "item_file": "items.parquet",
        "event_types": event_vocab,
        "channels": channel_vocab,
        "split": {
            "method": o["split"], "max_history": o["max_history"], "collapse_repeats": o["collapse_repeats"],
            "min_user_events": o["min_user_events"], "kcore_users": o["kcore_users"], "kcore_items": o["kcore_items"],
            "event_weights": weights, "session_gap": o["session_gap"],
            **({"val_from_ts": t_val, "test_from_ts": t_test} if t_val is not None else {}),
        },
        "privacy": {"user_ids": "hmac-sha256" if o["pseudonymise_users"] else "raw", "key_env": o["pseudonym_key_env"] if o["pseudonymise_users"] else None},
        "leakage_check": "passed",
        "cold_items": {"fraction": o["cold_items"], "count": int(cold.len()), "seed": o["seed"]},
        "stats": {
            "input_events": int(n_raw), "duplicates_dropped": int(n_raw - n_dedup),
            "events_by_type": {k: int(v) for k, v in sorted(ev_counts.items(), key=lambda kv: str(kv[0]))},
            "events_by_channel": {str(k): int(v) for k, v in sorted(ch_counts.items(), key=lambda kv: str(kv[0]))},
            "history_length": {"min": int(lens.min()), **pct, "max": int(lens.max()), "mean": round(float(lens.mean()), 2)},
            "partitions": len(seq_parts),
            "phase_seconds": phases,
        },
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
