"""Trade-off of the consistency regulariser (task.consistency_weight): consistency bought vs NDCG@10.

    OMP_NUM_THREADS=2 python bench/consistency_reg.py --weights 0,0.5,2 --out bench/results/consistency_reg.json

Builds a synthetic shop log with channels (app, web, mini_program), trains the quickstart model
(2-layer, 64-wide Qwen2) once per weight with the same seed, and reports test NDCG@10 / HR@10
(seen excluded and included) and the test-split consistency figures (time: history end vs after
the next event; channels: mean over channel pairs). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", default="0,0.5,2")
    ap.add_argument("--users", type=int, default=1500)
    ap.add_argument("--items", type=int, default=300)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--out")
    a = ap.parse_args()

    import torch

    from ecomtrain.config import validate_tree
    from ecomtrain.data import build, importers, synth
    from ecomtrain.train.runner import train

    t0, load = time.time(), os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        synth.write(td / "raw", num_users=a.users, num_items=a.items, seed=0)
        build.build(importers.load("synth", td / "raw"), td / "ds", log=lambda *_: None)
        for w in [float(x) for x in a.weights.split(",")]:
            tree = {
                "run": {"name": "reg", "dir": str(td / f"run{w}"), "seed": 0},
                "data": {"path": str(td / "ds"), "max_history": 50, "batch_size": 64, "eval_batch_size": 256},
                "model": {"backbone": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 256}, "dropout": 0.2},
                "task": {"consistency_weight": w},
                "optim": {"lr": 3e-3},
                "trainer": {"accelerator": "cpu", "max_epochs": a.epochs, "progress_bar": False},
                "eval": {"exclude_seen": True},
                "logging": {"wandb": {"enabled": False}},
            }
            t = time.time()
            m = json.loads((train(validate_tree(tree), log=lambda *_: None) / "metrics.json").read_text())
            chan = [v for k, v in m.items() if k.startswith("test/consistency/channel/") and "~all" not in k and k.endswith("jaccard@10")]
            chan_rbo = [v for k, v in m.items() if k.startswith("test/consistency/channel/") and "~all" not in k and k.endswith("rbo@10")]
            rows.append({
                "consistency_weight": w,
                "test/ndcg@10": m["test/ndcg@10"], "test/hr@10": m["test/hr@10"],
                "test/incl_seen/ndcg@10": m["test/incl_seen/ndcg@10"],
                "test/consistency/time/jaccard@10": m["test/consistency/time/jaccard@10"],
                "test/consistency/time/rbo@10": m["test/consistency/time/rbo@10"],
                "test/consistency/channel_pairs_mean/jaccard@10": sum(chan) / max(1, len(chan)),
                "test/consistency/channel_pairs_mean/rbo@10": sum(chan_rbo) / max(1, len(chan_rbo)),
                "test/coverage@10": m.get("test/coverage@10"), "train_seconds": round(time.time() - t, 1),
            })
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    res = {
        "bench": "consistency_reg",
        "command": "python bench/consistency_reg.py " + " ".join(x for x in sys.argv[1:] if not x.startswith("/")),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "omp_threads": os.environ.get("OMP_NUM_THREADS"), "loadavg_before": [round(x, 2) for x in load],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
        "setup": {"users": a.users, "items": a.items, "epochs": a.epochs, "exclude_seen": True, "seed": 0,
                  "data": "ecomtrain synth (channels app/web/mini_program), leave-one-out"},
        "results": rows,
        "wall_seconds": round(time.time() - t0, 1),
    }
    text = json.dumps(res, indent=1)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
