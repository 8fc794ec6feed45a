"""Benchmark: generate N synthetic events, build them, print JSON (events/s, peak RSS).

    nice python bench/data_build.py --events 100000000 > bench/results/data_build_100m.json

The input is a folder of Parquet files (user, item, ts, event, channel, value;
about 1 % exact duplicates) generated with numpy in 5 M-row chunks, so the
generator itself never holds more than one chunk. The build runs as
``ecomtrain data build --source table`` in a child process; its peak RSS is the
child's ``ru_maxrss`` (the generator's memory is not counted). Outputs are
deleted afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=100_000_000)
    ap.add_argument("--users", type=int, default=None, help="default: events / 50")
    ap.add_argument("--items", type=int, default=None, help="default: events / 100")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "ecomtrain-bench-data"))
    ap.add_argument("--partition-events", type=int, default=4_000_000)
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    users = a.users or max(10, a.events // 50)
    items = a.items or max(10, a.events // 100)
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    raw, out = work / "raw", work / "built"

    t = time.time()
    generate(raw, a.events, users, items)
    gen_s = time.time() - t
    raw_bytes = sum(p.stat().st_size for p in raw.iterdir())

    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    cmd = [sys.executable, "-m", "ecomtrain.cli", "data", "build", "--source", "table", "--input", str(raw),
           "--out", str(out), "--partition-events", str(a.partition_events)]
    t = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    build_s = time.time() - t
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak_kb, cpu_s = ru.ru_maxrss, ru.ru_utime + ru.ru_stime
    if proc.returncode != 0:
        print(proc.stdout + proc.stderr, file=sys.stderr)
        return proc.returncode
    m = json.loads((out / "manifest.json").read_text())
    out_bytes = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    res = {
        "benchmark": "data_build",
        "input_events": a.events,
        "input_users": users,
        "input_items": items,
        "input_parquet_gb": round(raw_bytes / 1e9, 2),
        "generate_seconds": round(gen_s, 1),
        "build_seconds": round(build_s, 1),
        "events_per_s": round(a.events / build_s),
        "peak_rss_gb": round(peak_kb / 1024**2, 2),
        "build_cpu_seconds": round(cpu_s, 1),
        "events_per_cpu_s": round(a.events / max(cpu_s, 1e-9)),
        "num_users": m["num_users"],
        "num_items": m["num_items"],
        "num_events_after_cleaning": m["num_events"],
        "duplicates_dropped": m["stats"]["duplicates_dropped"],
        "partitions": m["stats"]["partitions"],
        "samples": {s: m["splits"][s]["num_samples"] for s in ("train", "val", "test")},
        "shards": sum(len(m["splits"][s]["shards"]) for s in ("train", "val", "test")),
        "output_gb": round(out_bytes / 1e9, 2),
        "machine": {"cpus": os.cpu_count(), "mem_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1),
                    "python": platform.python_version(), "polars": pl.__version__},
        "command": " ".join(cmd),
    }
    print(json.dumps(res, indent=2))
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
