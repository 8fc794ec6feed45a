"""Recommendation quality of a recipe on a sequence dataset, end to end.

    python bench/quality.py recipes/amazon-beauty/full_single.yaml \
        --data ../shared/data/amazon-beauty/sequential_data.txt
    python bench/quality.py recipes/amazon-beauty-hybrid/full_single.yaml \
        --data ../shared/data/amazon-beauty/sequential_data.txt \
        --items ../shared/data/amazon-beauty/items.tsv --label hybrid [data.build.cold_items=0.05]

Builds the dataset (``seq`` importer unless --source says otherwise) into a
fresh folder, trains with the recipe (only ``data.path``/``data.build`` and
the run folder are replaced), evaluates on the test split, and prints one
JSON object: HR@5/10/20, NDCG@5/10/20, MRR with and without the user's seen
items excluded, the popularity baseline, wall time (build + train + eval),
seed and protocol; with cold items also test_cold/test_warm; the machine's load
(2-core machines are shared). Model selection inside the run uses the validation split
only (best checkpoint on val/ndcg@10, early stopping on val).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sys
import tempfile
import time
from pathlib import Path


def load_note(load_start) -> str:
    """What the 1-minute load at the start says about the wall time (the load at the end counts this run's own threads)."""
    if load_start[0] < 0.5:
        return f"machine idle at start (1-min load {load_start[0]:.2f}); loadavg_end includes this run's own threads"
    return (f"machine shared with other jobs (1-min load {load_start[0]:.2f} at start): "
            "wall time is inflated by their load")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe")
    ap.add_argument("--data", required=True, help="raw input for the importer (e.g. sequential_data.txt)")
    ap.add_argument("--source", default="seq")
    ap.add_argument("--work", help="folder for the built data and the run (default: a temp folder)")
    ap.add_argument("--items", help="item catalog for data.build.items (e.g. ../shared/data/amazon-beauty/items.tsv)")
    ap.add_argument("--label", help="name of this variant in the JSON (e.g. hybrid, id)")
    ap.add_argument("overrides", nargs="*", help="extra dotted.key=value overrides")
    a = ap.parse_intermixed_args()  # overrides may follow the options

    from ecomtrain.config import load_recipe
    from ecomtrain.train.runner import train

    import os

    t0 = time.time()
    load_start = os.getloadavg()
    work = Path(a.work or tempfile.mkdtemp(prefix="ecomtrain-quality-"))
    overrides = [
        f"data.path={work / 'data'}",
        f"data.build.source={a.source}",
        f"data.build.input={Path(a.data).resolve()}",
        f"run.dir={work / 'run'}",
        "trainer.progress_bar=false",
        *([f"data.build.items={Path(a.items).resolve()}"] if a.items else []),
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
        **({"test_cold": block("test_cold/"), "test_warm": block("test_warm/"), "val_cold": block("val_cold/"),
            "cold_items": m.get("eval/cold_items"), "test_cold_random_hr@10": m.get("test_cold/random_hr@10")}
           if "test_cold/hr@10" in m else {}),
        "label": a.label,
        "model_items": cfg.model.items,
        "item_text_encoder": cfg.model.item_text.encoder if cfg.model.items != "id" else None,
        "overrides": a.overrides,
        "machine": {"cpus": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                    "loadavg_start": [round(x, 2) for x in load_start], "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                    "note": load_note(load_start)},
        "seed": cfg.run.seed,
        "epochs_trained": m.get("train/epochs"),
        "wall_seconds": round(time.time() - t0, 1),
        "cpu_seconds": round(sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                                 for f in ("ru_utime", "ru_stime")), 1),
        "run_dir": str(run_dir),
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
