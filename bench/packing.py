"""Sequence packing vs padding: samples/s, token efficiency and validation NDCG@10, side by side.

    python bench/packing.py                                   # Beauty-like skewed lengths, synthetic, 3 seeds
    python bench/packing.py --data ../shared/data/amazon-beauty/sequential_data.txt --epochs 3

Both arms train the same recipe (default: the Beauty quality recipe's model) on the same
built dataset for the same number of epochs; the only difference is ``data.packing``. Arms
alternate (padded, packed, padded, packed, ...) so machine load hits both alike. samples/s
and token efficiency come from the run's own throughput monitor (``perf/*`` in metrics.json,
steady state, training steps only); NDCG@10 is the best validation value of each run.
Prints one JSON object.

The synthetic data mimics Beauty's lengths (5-core; median 6, p95 ~20, a tail to 200): each
user's next item is the previous item's successor with probability 0.5, so there is
something to learn.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path


def write_skewed(path: Path, users: int, items: int, seed: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    succ = rng.permutation(items) + 1
    lengths = np.minimum(200, 5 + np.floor(np.exp(rng.normal(0.3, 1.2, users)))).astype(int)
    with open(path, "w") as f:
        for u in range(users):
            seq = [int(rng.integers(1, items + 1))]
            for _ in range(lengths[u] - 1):
                seq.append(int(succ[seq[-1] - 1]) if rng.random() < 0.5 else int(rng.integers(1, items + 1)))
            f.write(f"{u + 1} " + " ".join(map(str, seq)) + "\n")
    return {"users": users, "items": items, "length_median": float(np.median(lengths)), "length_p95": float(np.percentile(lengths, 95)),
            "length_max": int(lengths.max())}


def length_stats(path: Path) -> dict:
    """History lengths of a `user item item ...` file (whole histories, before the train window cut)."""
    import numpy as np

    lengths = np.array([len(line.split()) - 1 for line in path.read_text().splitlines() if line.strip()])
    return {"users": int(len(lengths)), "length_median": float(np.median(lengths)), "length_p95": float(np.percentile(lengths, 95)),
            "length_max": int(lengths.max())}


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="recipes/amazon-beauty/full_single.yaml")
    ap.add_argument("--data", help="a `user item item ...` file (default: Beauty-like synthetic)")
    ap.add_argument("--users", type=int, default=8000)
    ap.add_argument("--items", type=int, default=3000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--work", help="work folder (default: a temp folder)")
    ap.add_argument("--out", help="also write the JSON object to this file (e.g. bench/results/packing_beauty.json)")
    ap.add_argument("overrides", nargs="*", help="extra dotted.key=value overrides for both arms")
    a = ap.parse_intermixed_args()

    from ecomtrain.config import load_recipe
    from ecomtrain.train.runner import train

    work = Path(a.work or tempfile.mkdtemp(prefix="ecomtrain-packing-"))
    work.mkdir(parents=True, exist_ok=True)
    data_info: dict = {}
    if a.data:
        src, data_info = a.data, {"file": a.data, **length_stats(Path(a.data))}
    else:
        src = str(work / "skewed.txt")
        data_info = {"synthetic": write_skewed(Path(src), a.users, a.items, seed=0)}
    runs = []
    t0, load_start = time.time(), os.getloadavg()[0]
    for seed in (int(s) for s in a.seeds.split(",")):
        for packing in (False, True):
            over = [
                f"data.path={work}/data", "data.build.source=seq", f"data.build.input={src}",
                f"run.dir={work}/run-s{seed}-{'packed' if packing else 'padded'}", f"run.seed={seed}",
                f"data.packing={str(packing).lower()}", f"trainer.max_epochs={a.epochs}",
                "trainer.early_stopping.enabled=false", "trainer.progress_bar=false", "logging.wandb.enabled=false",
                *a.overrides,
            ]
            cfg = load_recipe(a.recipe, over)
            t, c = time.time(), time.process_time()
            with contextlib.redirect_stdout(sys.stderr):  # Lightning prints its model summary to stdout
                run_dir = train(cfg, log=lambda *_: None)
            m = json.loads((run_dir / "metrics.json").read_text())
            runs.append({
                "seed": seed, "packing": packing, "wall_s": round(time.time() - t, 1), "cpu_s": round(time.process_time() - c, 1),
                "load_avg_1m": round(os.getloadavg()[0], 2),
                "samples_per_s": m.get("perf/samples_per_s"), "samples_per_cpu_s": m.get("perf/samples_per_cpu_s"),
                "tokens_per_s": m.get("perf/tokens_per_s"),
                "token_efficiency": m.get("perf/token_efficiency"), "data_wait_fraction": m.get("perf/data_wait_fraction"),
                "val_ndcg@10": m.get("val/ndcg@10"), "test_ndcg@10": m.get("test/ndcg@10"), "test_hr@10": m.get("test/hr@10"),
            })
            print(json.dumps(runs[-1]), file=sys.stderr)

    def med(packing: bool, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["packing"] == packing)

    def sd(packing: bool, key: str) -> float:
        vals = [r[key] for r in runs if r["packing"] == packing]
        return statistics.stdev(vals) if len(vals) > 1 else 0.0  # sample std (n - 1)

    def mean(packing: bool, key: str) -> float:
        return statistics.fmean(r[key] for r in runs if r["packing"] == packing)

    # speed-up per seed from the adjacent (alternating) padded/packed pair: robust to load drift
    pairs = {r["seed"]: {} for r in runs}
    for r in runs:
        pairs[r["seed"]][r["packing"]] = r
    speedups = [p[True]["samples_per_s"] / p[False]["samples_per_s"] for p in pairs.values() if len(p) == 2]
    cpu_speedups = [p[True]["samples_per_cpu_s"] / p[False]["samples_per_cpu_s"] for p in pairs.values()
                    if len(p) == 2 and p[True]["samples_per_cpu_s"] and p[False]["samples_per_cpu_s"]]
    keys = ("samples_per_s", "samples_per_cpu_s", "tokens_per_s", "token_efficiency", "data_wait_fraction", "val_ndcg@10", "test_ndcg@10")

    out = {
        "benchmark": "packing",
        "command": "python bench/packing.py " + " ".join(
            ([f"--data {a.data}"] if a.data else [f"--users {a.users}", f"--items {a.items}"]) + [f"--epochs {a.epochs}", f"--seeds {a.seeds}"]
            + ([f"--out {a.out}"] if a.out else []) + a.overrides
        ),
        "recipe": a.recipe,
        "data": data_info,
        "epochs": a.epochs,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch_threads(),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "device": "cpu (no GPU lent to this work)",
                    "load_avg_1m_at_start": round(load_start, 2), "load_avg_1m_at_end": round(os.getloadavg()[0], 2)},
        # medians over seeds
        "padded": {k: med(False, k) for k in keys},
        "packed": {k: med(True, k) for k in keys},
        # mean and sample std over seeds, both arms
        "mean_std": {arm: {k: [round(mean(flag, k), 6), round(sd(flag, k), 6)] for k in ("samples_per_s", "samples_per_cpu_s", "val_ndcg@10", "test_ndcg@10")}
                     for arm, flag in (("padded", False), ("packed", True))},
        "val_ndcg@10_std": {"padded": sd(False, "val_ndcg@10"), "packed": sd(True, "val_ndcg@10")},
        "speedup_samples_per_s": round(med(True, "samples_per_s") / med(False, "samples_per_s"), 3),
        "speedup_samples_per_s_per_seed": [round(x, 3) for x in speedups],
        "speedup_samples_per_cpu_s_per_seed": [round(x, 3) for x in cpu_speedups],
        "runs": runs,
        "wall_s": round(time.time() - t0, 1),
    }
    print(json.dumps(out, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0 if all(math.isfinite(r["val_ndcg@10"] or float("nan")) for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
