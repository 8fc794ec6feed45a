"""Every task against its baselines, multi-task vs single-task, and what each side input adds.

    OMP_NUM_THREADS=1 python bench/tasks.py                      # ~40 min on 2 loaded CPU cores
    OMP_NUM_THREADS=1 python bench/tasks.py --only purchase_intent --skip-ablation

Runs the recipes in recipes/quickstart/ (<task>_single.yaml, multi_task_single.yaml) through
``ecomtrain train`` on one shared synthetic dataset with planted behaviour / channel / rating
signals (fixed seed), then the side-input ablations (model.inputs.* off one at a time, and all
off), and prints one JSON object, also written to bench/results/tasks.json.

Targets (issue 12): purchase intent AUC >= 0.75 and >= 0.10 above the item-purchase-rate
baseline; rating RMSE <= 0.9 x the user+item-bias baseline; candidate ranking HR@1 >= 2 / K;
multi-task within 2 % of each single-task primary metric.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes" / "quickstart"
PRIMARY = {
    "next_item": ("test/ndcg@10", "baseline/popularity/test/ndcg@10"),
    "purchase_intent": ("test/purchase_intent/auc", "baseline/item_purchase_rate/test/purchase_intent/auc"),
    "rating": ("test/rating/rmse", "baseline/user_item_bias/test/rating/rmse"),
    "candidate_ranking": ("test/candidate_ranking/hr@1", "baseline/random/test/candidate_ranking/hr@1"),
}
INPUTS = ("event_types", "channels", "time_gaps")


def train(recipe: Path, out: Path, data: Path, *overrides: str) -> dict:
    cmd = [sys.executable, "-m", "ecomtrain.cli", "train", str(recipe), f"data.path={data}", f"run.out_dir={out}",
           "logging.wandb.enabled=false", "trainer.progress_bar=false", *overrides]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    run_dir = Path(r.stdout.strip().splitlines()[-1].split("run dir: ", 1)[1])
    m = json.loads((run_dir if run_dir.is_absolute() else REPO / run_dir).joinpath("metrics.json").read_text())
    m["bench/wall_s"] = round(time.time() - t0, 1)
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=list(PRIMARY), help="tasks to run")
    ap.add_argument("--skip-ablation", action="store_true")
    ap.add_argument("--skip-multi", action="store_true")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "tasks.json"))
    ap.add_argument("overrides", nargs="*", help="dotted overrides for every run (e.g. trainer.max_epochs=2)")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-tasks-"))
    data = work / "data"  # built once (by the first run) and shared
    res: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "omp_threads": os.environ.get("OMP_NUM_THREADS")},
                 "command": "OMP_NUM_THREADS=1 python bench/tasks.py " + " ".join(a.overrides), "tasks": {}}
    runs: dict = {}
    for task in a.only:
        m = runs[task] = train(RECIPES / f"{task}_single.yaml", work / "runs", data, *a.overrides)
        key, base = PRIMARY[task]
        row = {"metric": key, "value": m[key], "baseline": base, "baseline_value": m[base], "wall_s": m["bench/wall_s"],
               "all": {k: v for k, v in m.items() if isinstance(v, float) and ("/test/" in k or k.startswith("test/")) and "_seen/" not in k}}
        if task == "purchase_intent":
            row["target"] = "auc >= 0.75 and auc - item_purchase_rate_auc >= 0.10"
            row["pass"] = m[key] >= 0.75 and m[key] - m[base] >= 0.10
        elif task == "rating":
            row["target"] = "rmse <= 0.9 x user_item_bias rmse"
            row["ratio"] = m[key] / m[base]
            row["pass"] = m[key] <= 0.9 * m[base]
        elif task == "candidate_ranking":
            row["target"] = "hr@1 >= 2 x 1/K"
            row["pass"] = m[key] >= 2 * m[base]
        res["tasks"][task] = row
    if not a.skip_multi and {"next_item", "purchase_intent"} <= set(runs):
        mt = train(RECIPES / "multi_task_single.yaml", work / "runs", data, *a.overrides)
        side = {}
        for task in ("next_item", "purchase_intent"):
            key = PRIMARY[task][0]
            single, multi = runs[task][key], mt[key]
            side[task] = {"metric": key, "single": single, "multi": multi, "relative_change": (multi - single) / single,
                          "within_2pct": multi >= 0.98 * single}
        side["wall_s"] = {"multi": mt["bench/wall_s"], "singles": runs["next_item"]["bench/wall_s"] + runs["purchase_intent"]["bench/wall_s"]}
        res["multi_vs_single"] = side
    if not a.skip_ablation:
        abl: dict = {}
        for task in [t for t in ("purchase_intent", "next_item") if t in runs]:
            key = PRIMARY[task][0]
            rows = {"all_on": runs[task][key]}
            offs = [(f"{x}_off", [f"model.inputs.{x}=false"]) for x in INPUTS] if task == "purchase_intent" else []
            offs.append(("all_off", [f"model.inputs.{x}=false" for x in INPUTS]))
            for name, ov in offs:
                rows[name] = train(RECIPES / f"{task}_single.yaml", work / "runs", data, *a.overrides, *ov)[key]
            abl[task] = {"metric": key, **rows}
        res["inputs_ablation"] = abl
    text = json.dumps(res, indent=2)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
