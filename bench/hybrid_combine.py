"""How hybrid items combine ID and text: sum vs gate vs concat (issue 11), side by side in one run.

    python bench/hybrid_combine.py --work WORK [--recipe recipes/quickstart-hybrid/full_single.yaml] [--seeds 0 1] [overrides...]

Trains the recipe once per ``model.item_text.combine`` and seed on the same built data (the
recipe's cold items included) and prints one JSON object: test / test_cold / test_warm HR@10 and
NDCG@10 per variant (mean over seeds and each seed), trainable parameters, wall and CPU seconds.
Model selection on validation only (the recipe's best checkpoint).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path


def cpu_seconds() -> float:
    return sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN) for f in ("ru_utime", "ru_stime"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True)
    ap.add_argument("--recipe", default="recipes/quickstart-hybrid/full_single.yaml")
    ap.add_argument("--combines", nargs="*", default=["sum", "gate", "concat"])
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1])
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_intermixed_args()

    from ecomtrain.config import load_recipe
    from ecomtrain.train.runner import train

    work = Path(a.work)
    keys = ["test/hr@10", "test/ndcg@10", "test_cold/hr@10", "test_cold/ndcg@10", "test_warm/hr@10", "test_warm/ndcg@10", "val/ndcg@10"]
    load0, t_all = os.getloadavg(), time.time()
    variants = {}
    for combine in a.combines:
        runs = []
        for seed in a.seeds:
            cfg = load_recipe(a.recipe, [f"data.path={work / 'data'}", f"run.dir={work / f'{combine}-s{seed}'}", f"run.seed={seed}",
                                         "model.items=hybrid", f"model.item_text.combine={combine}", "trainer.progress_bar=false",
                                         "logging.wandb.enabled=false", *a.overrides])
            t0, c0 = time.time(), cpu_seconds()
            with contextlib.redirect_stdout(sys.stderr):
                run_dir = train(cfg, log=lambda *x: print(*x, file=sys.stderr))
            m = json.loads((run_dir / "metrics.json").read_text())
            runs.append({"seed": seed, **{k: round(m[k], 5) for k in keys if k in m},
                         "wall_seconds": round(time.time() - t0, 1), "cpu_seconds": round(cpu_seconds() - c0, 1)})
            print(f"{combine} seed {seed}: {runs[-1]}", file=sys.stderr, flush=True)
        variants[combine] = {
            "mean": {k: round(statistics.mean(r[k] for r in runs), 5) for k in keys if k in runs[0]},
            "std": {k: round(statistics.pstdev(r[k] for r in runs), 5) for k in keys if k in runs[0]},
            "runs": runs,
        }
    print(json.dumps({
        "bench": "hybrid_combine (issue 11)",
        "command": f"python bench/hybrid_combine.py --work WORK --recipe {a.recipe} --seeds {' '.join(map(str, a.seeds))} {' '.join(a.overrides)}".strip(),
        "recipe": a.recipe,
        "variants": variants,
        "machine": {"cpus": os.cpu_count(), "loadavg_start": [round(x, 2) for x in load0],
                    "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
        "wall_seconds": round(time.time() - t_all, 1),
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
