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
   ``manifest.json`` with counts, sha256 per shard, summary statistics and the
   dataset fingerprint (sha256 of the build options and the input's identity).

Atomicity: everything is written into a sibling folder ``OUT.tmp-<pid>-<token>``
(its work files in ``OUT.tmp-*/.work``) and moved into OUT only after success
(see :mod:`ecomtrain.data.outdir`), so OUT holds the old dataset or the new one, never a
mix, and files in OUT that the dataset does not list are never touched. Raw
user ids never reach the disk when ``pseudonymise_users`` is on: they are
replaced by their HMAC before the staging pass writes anything.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import secrets
import shutil
import tarfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import polars as pl

from .. import __version__
from ..config import BuildConfig
from .importers import DataError, Imported, check_ids, translate
from .outdir import check_out, recover, roll_forward
from . import cold as cold_items_
from .samples import check_leakage, make_samples, pseudonymise, split_positions

SCHEMA_VERSION = 1
SPLITS = ("train", "val", "test")
# Funnel order: when positions merge, the furthest stage wins.
FUNNEL = {"view": 0, "click": 1, "fav": 2, "cart": 3, "purchase": 4}
# Events whose value is an explicit rating (MovieLens 'rating', Amazon 'review', synth 'rating'):
# their value becomes the position's entry in the samples' 'ratings' list (null elsewhere)
RATING_EVENTS = ("rating", "review")
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
    ev = ev.with_columns(_rating=pl.when(pl.col("event").is_in(RATING_EVENTS)).then(pl.col("value")))
    if collapse_repeats:
        rank = pl.col("event").replace_strict(FUNNEL, default=-1, return_dtype=pl.Int8)
        new_run = (pl.col("item") != pl.col("item").shift(1)) | (pl.col("user") != pl.col("user").shift(1))
        ev = (
            ev.with_columns(_run=new_run.fill_null(True).cum_sum(), _rank=rank)
            .group_by("_run", maintain_order=True)
            .agg(
                pl.col("user").first(), pl.col("item").first(), pl.col("ts").first(),
                pl.col("event").sort_by(["_rank", "_row"]).last(), pl.col("channel").first(),
                pl.col("_rating").drop_nulls().last(),  # a purchase followed by its rating: one position, rated
            )
        )
    aggs = [pl.col("item").alias("items"), pl.col("event").alias("events"), pl.col("channel").alias("channels"), pl.col("ts"),
            pl.col("_rating").alias("ratings")]
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


def as_build_config(cfg: BuildConfig | dict | None = None, **options) -> BuildConfig:
    """A validated BuildConfig from a BuildConfig, its dump, and/or keyword overrides (one DataError line if invalid)."""
    from pydantic import ValidationError

    base = cfg.model_dump() if isinstance(cfg, BuildConfig) else dict(cfg or {})
    base.update(options)
    try:
        return BuildConfig.model_validate(base)
    except ValidationError as exc:
        probs = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise DataError(f"build options: {probs}") from None


def input_identity(path: Optional[str]) -> Optional[dict]:
    """What changes when the input changes: file count, total bytes, newest mtime (ns)."""
    if path is None:
        return None
    p = Path(path)
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
    else:  # a glob
        files = sorted(Path(f) for f in glob.glob(str(path)))
    st = [f.stat() for f in files]
    return {"files": len(st), "bytes": sum(x.st_size for x in st), "mtime_ns": max((x.st_mtime_ns for x in st), default=0)}


def fingerprint(cfg: BuildConfig) -> dict:
    """manifest.json's ``build`` block: canonical options, input identity, and the sha256 of both."""
    options = cfg.identity()
    if options["input"] is not None:  # the same files, whatever the working folder the path was given from
        options["input"] = str(Path(options["input"]).resolve())
    body = {"options": options, "input": input_identity(cfg.input)}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return {**body, "fingerprint": hashlib.sha256(canon.encode()).hexdigest()}


def fingerprint_diff(manifest: dict, cfg: BuildConfig) -> list[str]:
    """Why the dataset of ``manifest`` was not built by ``cfg`` (empty when it was)."""
    have = manifest.get("build") or {}
    if "fingerprint" not in have:
        return ["manifest.json has no build fingerprint (built by an older ecomtrain)"]
    want = fingerprint(cfg)
    if have["fingerprint"] == want["fingerprint"]:
        return []
    a, b = have.get("options", {}), want["options"]
    diffs = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if have.get("input") != want["input"]:
        diffs.append(f"input {cfg.input} changed: {have.get('input')} -> {want['input']}")
    return diffs or ["fingerprint differs"]


def build(imp: Imported, out: str | Path, cfg: BuildConfig | dict | None = None, *, source: Optional[dict] = None,
          log=print, **options) -> dict:
    """Build the dataset of ``imp`` into ``out`` with the validated build options.

    ``cfg`` is a :class:`ecomtrain.config.BuildConfig` (or its dump); keyword
    ``options`` override single fields (``build(imp, out, shard_max_samples=50)``).
    Input and options are checked before ``out`` is touched; ``out`` changes
    only when the build succeeded (atomic swap, see the module docstring).
    """
    t_start = time.time()
    cfg = as_build_config(cfg, **options)
    if cfg.pseudonymise_users:
        pseudonymise(pl.Series(["probe"]), cfg.pseudonym_key_env)  # fail before any work if the key is missing
    out = Path(out).resolve()  # "." or a symlink: the sibling folders go next to the real folder
    recover(out, log)
    check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = out.parent / f"{out.name}.tmp-{token}"
    tmp.mkdir()
    o = {**cfg.build_options(), "source": source or ({"source": cfg.source, "input": cfg.input} if cfg.input else {"description": imp.description}),
         "fingerprint": fingerprint(cfg)}
    try:
        try:
            manifest = _build(imp, tmp, tmp / ".work", t_start, o, log)
        except pl.exceptions.PolarsError as exc:
            raise translate(exc, imp.origin or imp.description, imp) from None
        shutil.rmtree(tmp / ".work", ignore_errors=True)
        check_out(out)  # nothing foreign appeared while we built
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # OUT was never touched
        raise
    # From here a failure leaves tmp and OUT.old-* for recover() to roll forward:
    # deleting tmp now could lose the new dataset after the old one moved out.
    roll_forward(tmp, out, out.parent / f"{out.name}.old-{token}")
    log(
        f"built {out}: {manifest['num_users']} users, {manifest['num_items']} items, "
        + ", ".join(f"{s} {manifest['splits'][s]['num_samples']} samples in {len(manifest['splits'][s]['shards'])} shards" for s in SPLITS)
    )
    return manifest


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
    # counts, and finds an empty user/item cell anywhere (the importer probed the first rows only)
    n_raw = check_ids(imp, ev)
    if n_raw == 0:
        raise DataError(f"{imp.description}: no events" + (f" of types {o['event_types']}" if o["event_types"] else ""))
    if o["pseudonymise_users"]:
        # Raw ids must never touch the disk, not even the work files a SIGKILL
        # would leave behind: HMAC each distinct user in memory (~1 us each) and
        # swap it in before the staging pass writes anything.
        users = ev.select(pl.col("user").unique()).collect(engine="streaming")["user"]
        ids = pl.DataFrame({"user": users, "_pseudo": pseudonymise(users, o["pseudonym_key_env"]).alias("_pseudo")})
        ev = ev.join(ids.lazy(), on="user", how="left").with_columns(pl.col("_pseudo").alias("user")).drop("_pseudo")
        del users, ids
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
    n_rated = 0
    for src in parts:
        lf = pl.scan_parquet(src)
        if keep_users is not None:  # is_in keeps the (user, ts, row) order; a join need not
            lf = lf.filter(pl.col("user").is_in(keep_users["user"].implode()) & pl.col("item").is_in(keep_items["item"].implode()))
        seqs = _positions(lf, o["collapse_repeats"], o["session_gap"], min_len).collect()
        if seqs.height == 0:
            continue
        item_sets.append(seqs.select(pl.col("items").explode().unique()).to_series())
        lengths.append(seqs["items"].list.len().to_numpy())
        n_rated += int(seqs.select(pl.col("ratings").list.drop_nulls().list.len().sum()).item() or 0)
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
        seqs = pl.read_parquet(src)
        if not n_rated:  # no explicit ratings anywhere: samples carry no 'ratings' list
            seqs = seqs.drop("ratings")
        seqs = cold_items_.hold_out(seqs, cold, o["split"], t_val, min_len)
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
        where = imp.items_origin or f"item catalog of {imp.description}"
        try:
            attrs = imp.items.lazy().with_columns(pl.col("item").cast(pl.Utf8)).join(item_map.lazy().select("item"), on="item", how="semi")
            attrs = attrs.collect(engine="streaming").unique("item", keep="first", maintain_order=True)
        except pl.exceptions.PolarsError as exc:
            raise translate(exc, where) from None
        if attrs.height == 0 and imp.items_origin:
            some = imp.items.lazy().select(pl.col("item").cast(pl.Utf8)).head(1).collect()["item"].to_list()
            raise DataError(f"{where}: none of the catalog's item ids occur in the events (catalog has e.g. {some[:1]}, "
                            f"events have e.g. {vocab[:1]}); is the catalog's item column the events' item id?")
        cat = cat.join(attrs, on="item", how="left", maintain_order="left")
    cat.write_parquet(out / "items.parquet")
    phase("catalog")

    pct = {f"p{q}": int(np.percentile(lens, q)) for q in (5, 25, 50, 75, 95, 99)}
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "created_by": f"ecomtrain {__version__}",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": o["source"],
        "build": o["fingerprint"],
        "num_users": int(len(lens)),
        "num_items": len(vocab),
        "num_events": int(lens.sum()),
        "pad_id": 0,
        "item_file": "items.parquet",
        "event_types": event_vocab,
        "channels": channel_vocab,
        "sample_fields": [f for f in ("user", "items", "events", "channels", "ts", "sessions", "weights", "ratings")
                          if f in ("user", "items", "events", "channels", "ts") or (f == "sessions" and o["session_gap"] is not None)
                          or (f == "weights" and weights) or (f == "ratings" and n_rated)],
        "num_ratings": n_rated,
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
    tmp.replace(out / "manifest.json")  # written last: a folder with a manifest is a finished dataset
    return manifest


def load_manifest(path: str | Path) -> dict:
    p = Path(path)
    mf = p / "manifest.json" if p.is_dir() or not p.suffix else p
    if not mf.is_file() and mf.parent == p:
        recover(p, log=lambda *_: None)  # a build killed inside its swap: finish it
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
