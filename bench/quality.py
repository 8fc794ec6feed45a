"""Recommendation quality of a recipe on a sequence dataset, end to end.

    python bench/quality.py recipes/amazon-beauty/full_single.yaml \
        --data ../shared/data/amazon-beauty/sequential_data.txt

Builds the dataset (``seq`` importer unless --source says otherwise) into a
fresh folder, trains with the recipe (only ``data.path``/``data.build`` and
the run folder are replaced), evaluates on the test split, and prints one
JSON object: HR@5/10/20, NDCG@5/10/20, MRR with and without the user's seen
items excluded, the popularity baseline, wall time (build + train + eval),
seed and protocol. Model selection inside the run uses the validation split
only (best checkpoint on val/ndcg@10, early stopping on val).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe")
    ap.add_argument("--data", required=True, help="raw input for the importer (e.g. sequential_data.txt)")
    ap.add_argument("--source", default="seq")
    ap.add_argument("--work", help="folder for the built data and the run (default: a temp folder)")
    ap.add_argument("overrides", nargs="*", help="extra dotted.key=value overrides")
    a = ap.parse_intermixed_args()  # overrides may follow the options

    from ecomtrain.config import load_recipe
    from ecomtrain.train.runner import train

    t0 = time.time()
    work = Path(a.work or tempfile.mkdtemp(prefix="ecomtrain-quality-"))
    overrides = [
        f"data.path={work / 'data'}",
        f"data.build.source={a.source}",
        f"data.build.input={Path(a.data).resolve()}",
        f"run.dir={work / 'run'}",
        "trainer.progress_bar=false",
        *a.overrides,
    ]
    cfg = load_recipe(a.recipe, overrides)
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON result
        run_dir = train(cfg, log=lambda *x: print(*x, file=sys.stderr))
    m = json.loads((run_dir / "metrics.json").read_text())
    manifest = json.loads((work / "data" / "manifest.json").read_text())
    primary_excl = bool(m["eval/exclude_seen"])
    alt = "incl_seen" if primary_excl else "excl_seen"

    def block(prefix: str) -> dict:
        keys = ["hr@5", "hr@10", "hr@20", "ndcg@5", "ndcg@10", "ndcg@20", "mrr"]
        return {k: round(m[prefix + k], 5) for k in keys if prefix + k in m}

    out = {
        "bench": "quality",
        "recipe": a.recipe,
        "data": str(a.data),
        "protocol": {
            "split": "leave-one-out per user (last item = test, second to last = validation)",
            "ranking": f"full catalog ({manifest['num_items']} items)",
            "model_selection": "validation split only (best val/ndcg@10 checkpoint)",
            "primary": "seen items excluded" if primary_excl else "seen items included",
        },
        "num_users": manifest["num_users"],
        "num_items": manifest["num_items"],
        "test": block("test/"),
        f"test_{alt}": block(f"test/{alt}/"),
        "val": block("val/"),
        "baseline_popularity_test": block("baseline/popularity/test/"),
        "seed": cfg.run.seed,
        "epochs_trained": m.get("train/epochs"),
        "wall_seconds": round(time.time() - t0, 1),
        "run_dir": str(run_dir),
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
