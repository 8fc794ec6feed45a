"""id vs text vs hybrid item representations on one recipe and one built dataset (cold items included).

    python bench/language.py recipes/quickstart-hybrid/full_single.yaml > bench/results/quality_quickstart_language.json

Builds the recipe's data once (into --work), then trains one run per variant (model.items id,
text, hybrid; hybrid without ID dropout) with the recipe otherwise unchanged, and prints one
JSON object: per variant test/*, test_cold/*, test_warm/* (HR/NDCG@10), val NDCG@10, epochs
and wall time, plus the machine's load (2-core machines are shared: wall times are inflated
by it). Model selection inside each run uses the validation split only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "id": ["model.items=id"],
    "text": ["model.items=text"],
    "hybrid": ["model.items=hybrid"],
    "hybrid_no_id_dropout": ["model.items=hybrid", "model.item_text.id_dropout=0.0"],
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe")
    ap.add_argument("--work", help="folder for the data and runs (default: a temp folder)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_intermixed_args()

    from ecomtrain.config import load_recipe
    from ecomtrain.train.runner import train

    work = Path(a.work or tempfile.mkdtemp(prefix="ecomtrain-language-"))
    out = {"bench": "language", "recipe": a.recipe, "overrides": a.overrides, "variants": {},
           "machine": {"cpus": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                       "loadavg_start": [round(x, 2) for x in os.getloadavg()]}}
    for name in a.variants.split(","):
        t0 = time.time()
        cfg = load_recipe(a.recipe, [f"data.path={work / 'data'}", f"run.dir={work / name}", "trainer.progress_bar=false",
                                     "logging.wandb.enabled=false", *a.overrides, *VARIANTS[name]])
        with contextlib.redirect_stdout(sys.stderr):
            run_dir = train(cfg, log=lambda *x: print(*x, file=sys.stderr))
        m = json.loads((run_dir / "metrics.json").read_text())
        keys = [f"{p}/{k}" for p in ("test", "test_cold", "test_warm") for k in ("hr@10", "ndcg@10")] + ["val/ndcg@10", "test_cold/random_hr@10"]
        out["variants"][name] = {**{k: round(m[k], 5) for k in keys if k in m}, "epochs": m.get("train/epochs"),
                                 "wall_seconds": round(time.time() - t0, 1)}
    manifest = json.loads((work / "data" / "manifest.json").read_text())
    out.update(num_items=manifest["num_items"], num_users=manifest["num_users"], cold_items=manifest.get("cold_items"),
               exclude_seen=cfg.eval.exclude_seen)
    out["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
