"""Build: normalised events -> per-user sequences -> splits -> WebDataset shards.

    ecomtrain data build --source synth --input data/raw --out data/quickstart

Memory stays bounded by working on hash partitions of users; raw events never
become Python objects (polars reads and stages them, numpy does the rest on
integer codes, see :mod:`ecomtrain.data.seqs`):

1. stage: events (event types chosen) are streamed once into
   ``OUT/.work/events/_p=P/`` partitioned by hash(user) % P, P sized so that a
   partition holds about ``partition_events`` (default 4 M) events;
2. per partition (:func:`ecomtrain.data.seqs.read_partition`): integer codes, one
   stable sort by (user, ts) -- ties stay in file order, never broken by item id --
   and exact duplicates dropped;
3. k-core (optional): drop users/items with fewer than k events, repeated
   until stable (bincounts over the partitions' codes per round);
4. per partition: merge consecutive repeats (optional), sessionise by an
   inactivity gap (optional), drop users with < ``min_user_events`` positions;
   kept as ``.npy`` work files (CSR arrays);
5. item vocabulary (1..N, 0 = padding; numeric ids in numeric order);
6. per partition: split (leave-one-out or global temporal) into sample records,
   leakage check, samples gathered as flat arrays and appended to size-targeted
   shards (:mod:`ecomtrain.data.shardio`: ``.npy`` blocks, schema 2, or one JSON
   member per sample, schema 1); catalog ``items.parquet``; ``manifest.json``
   with counts, sha256 per shard, summary statistics and the dataset fingerprint
   (sha256 of the build options and the input's identity).

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
from .samples import LIST_FIELDS, Tables, check_leakage, gather, make_records, pseudonymise, ragged_index, split_points, users_utf8
from .seqs import FUNNEL, RATING_EVENTS, Codes, Events, Seqs, kth_smallest, positions, read_partition  # noqa: F401 (re-exported)
from .shardio import JSON_SCHEMA_VERSION, READABLE_SCHEMAS, SCHEMA_VERSION, SINKS, rebuild_error

SPLITS = ("train", "val", "test")
DEDUP_COLS = ["user", "item", "ts", "event", "channel", "value"]  # an exact duplicate agrees on all of these
DEFAULT_KEY_ENV = "ECOMTRAIN_PSEUDONYM_KEY"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _kcore(dirs: list[Path], n_items: int, k_users: int, k_items: int, log, max_rounds: int = 50):
    """Per partition the users kept, and the item codes kept, by iterative k-core filtering (None = no filter).

    Each round: items with >= k_items events among the events of the users and items kept so
    far, then users with >= k_users events among those with a kept item; stable when neither
    set shrinks."""
    if k_users <= 1 and k_items <= 1:
        return None, None
    users = items = None
    for rnd in range(max_rounds):
        counts = np.zeros(n_items, dtype=np.int64)
        for j, d in enumerate(dirs):
            u, it = np.load(d / "u.npy", allow_pickle=False), np.load(d / "item.npy", allow_pickle=False)
            m = slice(None) if users is None else users[j][u] & items[it]
            counts += np.bincount(it[m], minlength=n_items)
        ic = counts >= max(1, k_items)
        uc = []
        for j, d in enumerate(dirs):
            u, it = np.load(d / "u.npy", allow_pickle=False), np.load(d / "item.npy", allow_pickle=False)
            m = ic[it] if users is None else users[j][u] & items[it] & ic[it]
            n_users = pl.scan_parquet(d / "users.parquet").select(pl.len()).collect().item()
            uc.append(np.bincount(u[m], minlength=n_users) >= max(1, k_users))
        stable = users is not None and sum(int(x.sum()) for x in uc) == sum(int(x.sum()) for x in users) and int(ic.sum()) == int(items.sum())
        users, items = uc, ic
        if stable:
            log(f"k-core (users>={k_users}, items>={k_items}) stable after {rnd + 1} rounds: "
                f"{sum(int(x.sum()) for x in users)} users, {int(items.sum())} items")
            return users, items
    raise DataError(f"k-core filtering did not converge in {max_rounds} rounds")


def _vocab(names: pl.Series, present: np.ndarray) -> tuple[list[str], np.ndarray]:
    """(vocabulary: item ids in idx order, their codes) of the item codes ``present``."""
    items = names.gather(present)
    nums = items.cast(pl.Int64, strict=False)
    df = pl.DataFrame({"i": items, "code": present})
    if nums.null_count() == 0:  # all numeric: 1, 2, ..., 10 rather than 1, 10, 2
        df = df.with_columns(n=nums).sort(["n", "i"])
    else:
        df = df.sort("i")
    return df["i"].to_list(), df["code"].to_numpy()


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
    phases_cpu: dict[str, float] = {}
    tick = [time.time(), time.process_time()]

    def phase(name: str) -> None:
        now, cpu = time.time(), time.process_time()
        phases[name] = round(phases.get(name, 0) + now - tick[0], 2)
        phases_cpu[name] = round(phases_cpu.get(name, 0) + cpu - tick[1], 2)
        tick[0], tick[1] = now, cpu

    # 1. stage into hash partitions of users (one streaming pass over the input)
    # counts, and finds an empty user/item/ts cell anywhere (the importer probed the first rows only)
    n_raw = check_ids(imp, ev)
    if n_raw == 0:
        raise DataError(f"{imp.description}: no events" + (f" of types {o['event_types']}" if o["event_types"] else ""))
    if o["pseudonymise_users"]:
        # Raw ids must never touch the disk, not even the work files a SIGKILL
        # would leave behind: HMAC each distinct user in memory (~0.5 us each) and
        # swap it in before the staging pass writes anything.
        users = ev.select(pl.col("user").unique()).collect(engine="streaming")["user"]
        ids = pl.DataFrame({"user": users, "_pseudo": pseudonymise(users, o["pseudonym_key_env"]).alias("_pseudo")})
        ev = ev.join(ids.lazy(), on="user", how="left").with_columns(pl.col("_pseudo").alias("user")).drop("_pseudo")
        del users, ids
    P = max(1, math.ceil(n_raw / o["partition_events"]))
    staged = work / "events"
    # lz4 and no statistics: work files read once; ~25 % less CPU than the default zstd for ~35 % more bytes
    ev.with_columns(_p=(pl.col("user").hash(seed=1234) % P).cast(pl.UInt32)).sink_parquet(
        pl.PartitionBy(staged, key="_p", include_key=False), mkdir=True, compression="lz4", statistics=False
    )
    log(f"staged {n_raw:,} events into {P} user partition(s)")
    phase("stage")

    # 2.-4. per partition: codes, sort, dedupe [, k-core], positions
    codes = Codes()
    kcore = o["kcore_users"] > 1 or o["kcore_items"] > 1
    seq_dirs: list[Path] = []
    item_count = np.zeros(0, dtype=np.int64)
    ev_count = np.zeros(0, dtype=np.int64)  # indexed by code + 1 (0 = null)
    ch_count = np.zeros(0, dtype=np.int64)
    lengths: list[np.ndarray] = []
    n_rated = n_dedup = 0

    def add(acc: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
        c = np.bincount(values, minlength=n)
        if len(acc) < len(c):
            acc = np.concatenate([acc, np.zeros(len(c) - len(acc), dtype=np.int64)])
        acc[:len(c)] += c
        return acc

    def ev_rank() -> np.ndarray:
        return np.array([-1] + [FUNNEL.get(e, -1) for e in codes.strings("event").to_list()], dtype=np.int64)

    def sequences(e: Events) -> None:
        nonlocal item_count, ev_count, ch_count, n_rated
        s = positions(e, ev_rank(), o["collapse_repeats"], o["session_gap"], min_len)
        if len(s.users) == 0:
            return
        item_count = add(item_count, s.item, 0)
        ev_count = add(ev_count, s.ev + 1, 1)
        ch_count = add(ch_count, s.ch + 1, 1)
        lengths.append(s.lengths)
        n_rated += int(np.count_nonzero(~np.isnan(s.rating)))
        d = work / "seqs" / f"{len(seq_dirs):06d}"
        s.save(d)
        seq_dirs.append(d)

    dedup_dirs = []
    for i, pdir in enumerate(sorted(staged.iterdir())):
        e, _ = read_partition(sorted(pdir.glob("*.parquet")), codes)
        n_dedup += e.n
        phase("dedupe_sort")
        if kcore:
            d = work / "dedup" / f"{i:06d}"
            e.save(d)
            dedup_dirs.append(d)
        else:
            sequences(e)
            phase("sequences")
        del e
        shutil.rmtree(pdir)
    if kcore:
        keep_users, keep_items = _kcore(dedup_dirs, codes.strings("item").len(), o["kcore_users"], o["kcore_items"], log)
        phase("kcore")
        for j, d in enumerate(dedup_dirs):
            e = Events.load(d)
            sequences(e.take(keep_users[j][e.u] & keep_items[e.item]))
            shutil.rmtree(d)
        phase("sequences")
    if not seq_dirs:
        raise DataError(f"{imp.description}: no user has {min_len} or more events after filtering; nothing to build")

    item_names = codes.strings("item")
    vocab, vocab_codes = _vocab(item_names, np.flatnonzero(item_count))
    item_map = pl.DataFrame({"item": vocab, "idx": pl.int_range(1, len(vocab) + 1, eager=True).cast(pl.Int64)})
    item_tab = np.zeros(item_names.len(), dtype=np.int64)
    item_tab[vocab_codes] = np.arange(1, len(vocab) + 1)
    ev_names = [None] + codes.strings("event").to_list()  # index = code + 1
    ch_names = [None] + codes.strings("channel").to_list()
    ev_counts = {ev_names[c]: int(n) for c, n in enumerate(ev_count) if n}
    ch_counts = {ch_names[c]: int(n) for c, n in enumerate(ch_count) if n}
    event_vocab = sorted((e for e in ev_counts if e is not None), key=lambda e: (FUNNEL.get(e, 99), e))
    channel_vocab = sorted(c for c in ch_counts if c is not None)
    lens = np.concatenate(lengths)
    phase("sequences")

    t_val = t_test = None
    if o["split"] == "temporal":
        n_pos = int(lens.sum())
        qv, qt = 1 - o["temporal_val_fraction"] - o["temporal_test_fraction"], 1 - o["temporal_test_fraction"]
        # polars' quantile(q, "lower"): the floor((n - 1) * q)-th smallest
        t_val, t_test = (kth_smallest(seq_dirs, int(math.floor((n_pos - 1) * q))) for q in (qv, qt))
        if t_val >= t_test:
            t_test = t_val + 1
        log(f"temporal split: val from ts {t_val}, test from ts {t_test}")

    # cold-start items (data/cold.py): chosen among val/test targets, removed from training input
    cold = cold_items_.choose(seq_dirs, item_names, len(vocab), o["cold_items"], o["seed"], o["split"], t_val)
    cold_codes = np.zeros(item_names.len(), dtype=bool)
    if cold.len():
        cold_codes[vocab_codes[item_map["item"].is_in(cold.implode()).to_numpy()]] = True
        log(f"cold items: {cold.len()} of {len(vocab)} held out of training input (kept as val/test targets)")

    # 6. samples and shards, partition by partition
    weights = o["event_weights"]
    ev_idx = {e: i for i, e in enumerate(event_vocab)}
    ch_idx = {c: i for i, c in enumerate(channel_vocab)}
    fields = [*LIST_FIELDS] + [f for f, on in (("sessions", o["session_gap"] is not None), ("weights", bool(weights)), ("ratings", n_rated > 0)) if on]
    tab = Tables(
        item=item_tab,
        event=np.array([ev_idx.get(e, -1) for e in ev_names], dtype=np.int64),
        channel=np.array([ch_idx.get(c, -1) for c in ch_names], dtype=np.int64),
        # float32 weights as their shortest decimal (what a JSON writer of float32 prints): 0.3, not 0.30000001
        weight=np.array([float(str(np.float32((weights or {}).get(e, 1.0)))) for e in ev_names]) if weights else None,
        fields=tuple(fields),
    )
    fmt = o.get("shard_format", "npy")
    sinks = {s: SINKS[fmt](out, s, o["shard_max_samples"], o["shard_max_bytes"]) for s in SPLITS}
    train_counts = np.zeros(len(vocab) + 1, dtype=np.int64)
    for p, d in enumerate(seq_dirs):
        s = cold_items_.hold_out(Seqs.load(d), cold_codes, o["split"], t_val, min_len)
        T, V, S = split_points(s, o["split"], t_val, t_test)
        order = pl.Series(np.arange(len(s.users))).sample(fraction=1.0, shuffle=True, seed=o["seed"] + p).to_numpy()
        recs = make_records(T, V, S, o["max_history"], order)
        check_leakage(recs, s, T)
        tr = ragged_index(s.off[:-1], np.maximum(T, 0))
        train_counts += np.bincount(item_tab[s.item[tr]], minlength=len(vocab) + 1)
        uu = users_utf8(s.users)
        for split in SPLITS:
            sinks[split].write(gather(s, recs[split], uu, tab))
        del s, recs
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
        "schema_version": SCHEMA_VERSION if fmt == "npy" else JSON_SCHEMA_VERSION,
        "shard_format": fmt,
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
        "sample_fields": ["user", *fields],
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
            "partitions": len(seq_dirs),
            "phase_seconds": phases,
            "phase_cpu_seconds": phases_cpu,
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
    if m["schema_version"] not in READABLE_SCHEMAS:
        raise rebuild_error(str(mf), m["schema_version"])
    return m
