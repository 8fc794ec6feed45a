"""Benchmark: generate N synthetic events, build them, print JSON (events per CPU-second, peak RSS, bytes).

    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python bench/data_build.py --events 100000000 > bench/results/data_build_100m.json

The input is a folder of Parquet files (user, item, ts, event, channel, value;
about 1 % exact duplicates) generated with numpy in 5 M-row chunks, so the
generator itself never holds more than one chunk. Each build runs as
``ecomtrain data build --source table`` in a child process; its CPU time and
peak RSS are that child's own (``os.wait4``), so the generator is not counted.
On a shared machine CPU-seconds are the figure to compare (wall time depends on
the load, recorded as ``os.getloadavg()`` before and after each build).

Side by side (``--compare-events``, default 10 M; 0 = off): a smaller input built
twice, in the default ``npy`` shard format and in the earlier ``json`` format
(``--shard-format json``: same pipeline, same samples, one JSON member per
sample), so the format's share of time and bytes is measured on the same code.
The figures of the build before this pipeline (JSON shards, measured on the
same kind of machine) are carried along as ``baseline_100m``. Outputs are
deleted afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

EVENTS = np.array(["view", "click", "cart", "purchase"])
CHANNELS = np.array(["app", "web", "mini_program"])

# bench/results/data_build_100m.json as measured on the tree before the npy format and the
# numpy pipeline (commit bbeb978: polars pipeline, samples rendered to JSON by polars)
BASELINE_100M = {
    "tree": "bbeb978 (JSON shards, schema 1, polars pipeline)",
    "input_events": 100_000_000, "build_seconds": 2938.1, "build_cpu_seconds": 848, "events_per_cpu_s": 117925,
    "peak_rss_gb": 2.66, "output_gb": 11.57, "shards": 1200, "samples": {"train": 2000000, "val": 2000000, "test": 2000000},
    "conditions": "nice -n 10, OMP_NUM_THREADS=1, shared 2-core / 24 GB machine, load average 10-13",
    "phase_wall_minutes_from_sampler": {"stage_partitions": 5, "dedupe_sort": 12, "sequences": 14, "samples_json_shards_sha256": 18},
}


def generate(out: Path, n: int, users: int, items: int, chunk: int = 5_000_000, seed: int = 0) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    t0, span = 1_700_000_000, 180 * 86400
    for k, start in enumerate(range(0, n, chunk)):
        m = min(chunk, n - start)
        dup = m // 100  # ~1 % exact duplicates, exercising the dedupe
        base = m - dup
        u = rng.integers(0, users, base)
        # skewed popularity: item = items * U^3 (top 1 % of items get ~20 % of events)
        it = (items * rng.random(base) ** 3).astype(np.int64)
        df = pl.DataFrame(
            {
                "user": u, "item": it, "ts": t0 + rng.integers(0, span, base),
                "event": EVENTS[rng.choice(4, base, p=[0.7, 0.2, 0.07, 0.03])],
                "channel": CHANNELS[rng.choice(3, base, p=[0.5, 0.35, 0.15])],
            }
        ).with_columns(
            pl.format("U{}", "user").alias("user"), pl.format("SKU{}", "item").alias("item"),
            pl.when(pl.col("event").is_in(["cart", "purchase"])).then(pl.lit(19.99)).alias("value"),
        )
        df = pl.concat([df, df.sample(dup, seed=seed + k)])
        df.write_parquet(out / f"part-{k:05d}.parquet")


def run_build(raw: Path, out: Path, work: Path, partition_events: int, fmt: str) -> dict:
    """One ``ecomtrain data build`` in a child process: its own CPU time, peak RSS, wall, load, output."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    cmd = [sys.executable, "-m", "ecomtrain.cli", "data", "build", "--source", "table", "--input", str(raw),
           "--out", str(out), "--partition-events", str(partition_events), "--shard-format", fmt]
    load0 = os.getloadavg()
    t = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    log = proc.stdout.read()
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.time() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"build failed:\n{log}")
    m = json.loads((out / "manifest.json").read_text())
    out_bytes = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    shard_bytes = sum(sh["bytes"] for s in m["splits"].values() for sh in s["shards"])
    cpu = ru.ru_utime + ru.ru_stime
    n = m["stats"]["input_events"]
    shutil.rmtree(out, ignore_errors=True)
    return {
        "shard_format": fmt,
        "schema_version": m["schema_version"],
        "input_events": n,
        "build_seconds": round(wall, 1),
        "build_cpu_seconds": round(cpu, 1),
        "events_per_cpu_s": round(n / max(cpu, 1e-9)),
        "events_per_s_wall": round(n / wall),
        "peak_rss_gb": round(ru.ru_maxrss / 1024**2, 2),
        "output_gb": round(out_bytes / 1e9, 3),
        "shard_bytes": shard_bytes,
        "bytes_per_sample": round(shard_bytes / max(1, sum(s["num_samples"] for s in m["splits"].values())), 1),
        "num_users": m["num_users"],
        "num_items": m["num_items"],
        "num_events_after_cleaning": m["num_events"],
        "duplicates_dropped": m["stats"]["duplicates_dropped"],
        "partitions": m["stats"]["partitions"],
        "samples": {s: m["splits"][s]["num_samples"] for s in ("train", "val", "test")},
        "shards": sum(len(m["splits"][s]["shards"]) for s in ("train", "val", "test")),
        "phase_cpu_seconds": m["stats"].get("phase_cpu_seconds"),
        "phase_wall_seconds": m["stats"].get("phase_seconds"),
        "load_avg_before": [round(x, 2) for x in load0],
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "command": " ".join([".venv/bin/python", *cmd[1:]]).replace(str(work), "WORK"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=100_000_000)
    ap.add_argument("--users", type=int, default=None, help="default: events / 50")
    ap.add_argument("--items", type=int, default=None, help="default: events / 100")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "ecomtrain-bench-data"))
    ap.add_argument("--partition-events", type=int, default=4_000_000)
    ap.add_argument("--shard-format", default="npy", choices=["npy", "json"])
    ap.add_argument("--compare-events", type=int, default=10_000_000,
                    help="also build an input of this size in both shard formats (0 = off)")
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    res = {"benchmark": "data_build", "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def inputs(n: int, name: str) -> tuple[Path, dict]:
        users, items = a.users or max(10, n // 50), a.items or max(10, n // 100)
        raw = work / name
        t = time.time()
        generate(raw, n, users, items)
        return raw, {"input_events": n, "input_users": users, "input_items": items,
                     "input_parquet_gb": round(sum(p.stat().st_size for p in raw.iterdir()) / 1e9, 2),
                     "generate_seconds": round(time.time() - t, 1)}

    if a.compare_events:
        raw, info = inputs(a.compare_events, "raw_compare")
        runs = {fmt: run_build(raw, work / f"built_{fmt}", work, a.partition_events, fmt) for fmt in ("npy", "json")}
        res["side_by_side"] = {
            **info, **runs,
            "npy_vs_json": {"events_per_cpu_s": round(runs["npy"]["events_per_cpu_s"] / runs["json"]["events_per_cpu_s"], 2),
                            "shard_bytes": round(runs["npy"]["shard_bytes"] / runs["json"]["shard_bytes"], 3)},
        }
        shutil.rmtree(raw, ignore_errors=True)
    raw, info = inputs(a.events, "raw")
    res.update(info)
    res["build"] = run_build(raw, work / "built", work, a.partition_events, a.shard_format)
    res["baseline_100m"] = BASELINE_100M
    if a.events == BASELINE_100M["input_events"]:
        b = res["build"]
        res["vs_baseline"] = {"events_per_cpu_s": round(b["events_per_cpu_s"] / BASELINE_100M["events_per_cpu_s"], 2),
                              "output_gb": round(b["output_gb"] / BASELINE_100M["output_gb"], 3),
                              "peak_rss_gb": round(b["peak_rss_gb"] / BASELINE_100M["peak_rss_gb"], 3)}
    res["machine"] = {"cpus": os.cpu_count(), "mem_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1),
                      "python": platform.python_version(), "polars": pl.__version__, "numpy": np.__version__}
    res["conditions"] = (f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, niceness {os.nice(0)}, shared machine: "
                         "wall figures are contention-bound; CPU-seconds are the build child's own (os.wait4)")
    res["bench_command"] = f"OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python bench/data_build.py --events {a.events} --compare-events {a.compare_events}"
    print(json.dumps(res, indent=2))
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
