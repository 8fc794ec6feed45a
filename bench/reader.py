"""Benchmark: reader samples/s per worker next to what a quickstart training step consumes.

    python bench/reader.py [--data DIR] [--samples 20000] [--steps 20]

Reader: ShardStream (train mode, shuffle buffer 2000, the quickstart collate)
with 0, 1 and 2 DataLoader workers, timed over ``--samples`` samples
(epochs repeat as needed). Consumption: forward + backward + AdamW step of
the quickstart model (recipes/quickstart.yaml: Qwen2, 2 layers, hidden 64) on
this machine's CPU, batch 64. Prints one JSON object. If the reader's
samples/s per worker is well above the training step's, data loading is not
the bottleneck with one worker per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def reader_rate(root: Path, manifest: dict, task, batch: int, workers: int, samples: int) -> dict:
    from ecomtrain.data.stream import EpochLoader, ShardStream

    st = ShardStream(root, "train", manifest, task.collate_train, batch, num_workers=workers, shuffle_buffer=2000, seed=0)
    loader = EpochLoader(st, num_workers=workers)
    n, t0 = 0, time.perf_counter()
    while n < samples:
        for b in loader:
            n += b["items"].shape[0]
            if n >= samples:
                break
    dt = time.perf_counter() - t0  # includes worker start-up, as a real epoch does
    return {"workers": workers, "samples": n, "seconds": round(dt, 2), "samples_per_s": round(n / dt),
            "samples_per_s_per_worker": round(n / dt / max(1, workers))}


def train_rate(cfg, manifest: dict, root: Path, steps: int) -> dict:
    import polars as pl
    import torch

    from ecomtrain.data.stream import ShardStream
    from ecomtrain.train.module import RecModule, make_task

    num_items = int(manifest["num_items"])
    counts = pl.read_parquet(root / "items.parquet").sort("idx")["train_count"].to_list()
    module = RecModule(cfg.model_dump(mode="json"), num_items, counts)
    module.configure_model()
    task = make_task(cfg, num_items)
    st = ShardStream(root, "train", manifest, task.collate_train, cfg.data.batch_size, shuffle_buffer=0)
    batches = []
    while len(batches) < steps + 3:
        batches += list(st)
    opt = torch.optim.AdamW(module.parameters(), lr=cfg.optim.lr)
    module.train()
    for i, b in enumerate(batches[: steps + 3]):
        if i == 3:  # 3 warm-up steps
            t0 = time.perf_counter()
        loss = task.loss(module.net, b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    dt = time.perf_counter() - t0
    return {"steps": steps, "batch_size": cfg.data.batch_size, "step_ms": round(1000 * dt / steps, 1),
            "samples_per_s": round(steps * cfg.data.batch_size / dt), "torch_threads": torch.get_num_threads()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="built dataset (default: quickstart-size synth built into a temp dir)")
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "quickstart.yaml"))
    ap.add_argument("--samples", type=int, default=20000)
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()

    from ecomtrain.config import load_recipe
    from ecomtrain.data import build, importers, synth
    from ecomtrain.train.module import make_task

    tmp = None
    if a.data:
        root = Path(a.data)
    else:
        tmp = tempfile.TemporaryDirectory()
        root = Path(tmp.name) / "built"
        synth.write(Path(tmp.name) / "raw", num_users=3000, num_items=600, seed=0)
        build.build(importers.load("synth", Path(tmp.name) / "raw"), root, shard_max_samples=500, log=lambda *_: None)
    cfg = load_recipe(a.recipe, [f"data.path={root}"])
    manifest = build.load_manifest(root)
    task = make_task(cfg, int(manifest["num_items"]))
    res = {
        "benchmark": "reader_vs_train_step",
        "dataset": {"path": str(root) if a.data else "synth 3000 users x 600 items (quickstart)",
                    "train_samples": manifest["splits"]["train"]["num_samples"]},
        "reader": [reader_rate(root, manifest, task, cfg.data.batch_size, w, a.samples) for w in (0, 1, 2)],
        "train_step": train_rate(cfg, manifest, root, a.steps),
        "cpus": os.cpu_count(),
    }
    per_worker = max(r["samples_per_s_per_worker"] for r in res["reader"] if r["workers"] == 1)
    res["reader_per_worker_over_train_consumption"] = round(per_worker / res["train_step"]["samples_per_s"], 1)
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
