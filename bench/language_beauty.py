"""Issue 11 on Amazon Beauty: text/hybrid items vs the ID-only recipe, in one benchmark run.

    ecomtrain model fetch all-minilm-l6-v2 --out models/all-minilm-l6-v2
    python bench/language_beauty.py --work WORK > bench/results/quality_amazon_beauty_language.json

Runs ``bench/quality.py`` (build + text encoding + train + test, model selection on validation
only) for four variants, in phases; the variants of one phase run side by side, the 2 cores
split between them (``OMP_NUM_THREADS`` = cores / variants in the phase):

    phase 1: hybrid                      (alone: its wall time is the "<= 45 min on 2 cores" figure)
    phase 2: id, hybrid_cold
    phase 3: id_cold

``*_cold`` add ``data.build.cold_items=0.05``: 5 % of the items are held out of all training input
and stay val/test targets; their figures are ``test_cold`` (random rank: ``test_cold_random_hr@10``).
Prints one JSON object (every variant's quality.py output plus the targets of the issue).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = "../shared/data/amazon-beauty/sequential_data.txt"
ITEMS = "../shared/data/amazon-beauty/items.tsv"
HYBRID = ["recipes/amazon-beauty-hybrid/full_single.yaml", "--items", ITEMS]
ID = ["recipes/amazon-beauty/full_single.yaml"]
COLD = ["data.build.cold_items=0.05"]
TEXT_INIT = ["recipes/amazon-beauty-text-init/full_single.yaml", "--items", ITEMS]
VARIANTS = {"hybrid": HYBRID, "id": ID, "hybrid_cold": HYBRID + COLD, "id_cold": ID + COLD, "text_init": TEXT_INIT}
PHASES = [["hybrid"], ["id", "hybrid_cold"], ["id_cold"]]


def _variant_key(name: str, extra: list[str]) -> str:
    """What a variant's result depends on: the validated recipe (not its path or comments) and the other arguments."""
    import hashlib

    sys.path.insert(0, str(ROOT))
    from ecomtrain.config import load_recipe

    recipe, *rest = VARIANTS[name]
    cfg = json.dumps(load_recipe(ROOT / recipe).model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256("\0".join([cfg, *rest, *extra]).encode()).hexdigest()[:16]


def _commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return head + ("+uncommitted" if dirty else "")
    except OSError:
        return "unknown"


def run_phase(names: list[str], work: Path, cores: int, extra: list[str], reuse: bool = False) -> dict:
    results = {}
    if reuse:  # results of an earlier invocation on the same WORK, same arguments and validated recipe
        for name in list(names):
            f = work / f"{name}.json"
            try:
                old = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            if old.get("variant_key") == _variant_key(name, extra):
                print(f"[{time.strftime('%H:%M:%S')}] reuse {name} from {f} (commit {old.get('commit')})", file=sys.stderr, flush=True)
                results[name] = old
                names = [n for n in names if n != name]
    if not names:
        return results
    threads = max(1, cores // len(names))
    procs = {}
    commit = _commit()
    for name in names:
        cmd = [sys.executable, "bench/quality.py", *VARIANTS[name], "--data", DATA, "--work", str(work / name),
               "--label", name, "logging.wandb.enabled=false", *extra]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        out, err = open(work / f"{name}.json", "w"), open(work / f"{name}.log", "w")
        print(f"[{time.strftime('%H:%M:%S')}] start {name} (OMP_NUM_THREADS={threads}): {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        procs[name] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err), out, err)
    for name, (p, out, err) in procs.items():
        rc = p.wait()
        out.close(), err.close()
        if rc != 0:
            tail = (work / f"{name}.log").read_text()[-3000:]
            raise SystemExit(f"variant {name} failed (exit {rc}); log {work / f'{name}.log'}:\n{tail}")
        results[name] = json.loads((work / f"{name}.json").read_text())
        results[name]["omp_num_threads"] = threads
        results[name]["ran_beside"] = [n for n in names if n != name]
        results[name]["commit"] = commit
        results[name]["variant_key"] = _variant_key(name, extra)
        (work / f"{name}.json").write_text(json.dumps(results[name], indent=2) + "\n")
        print(f"[{time.strftime('%H:%M:%S')}] done {name}: test hr@10 {results[name]['test']['hr@10']} "
              f"ndcg@10 {results[name]['test']['ndcg@10']} in {results[name]['wall_seconds']} s", file=sys.stderr, flush=True)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="scratch folder (built data and runs of every variant)")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--phases", nargs="*", help="override the phases, e.g. hybrid id,hybrid_cold id_cold")
    ap.add_argument("--reuse", action="store_true",
                    help="take a variant's result from an earlier invocation on the same WORK when its arguments and validated "
                         "recipe are unchanged (each variant records the commit it ran on)")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value overrides for every variant")
    a = ap.parse_intermixed_args()
    phases = [p.split(",") for p in a.phases] if a.phases else PHASES
    unknown = sorted({n for p in phases for n in p} - set(VARIANTS))
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; known: {sorted(VARIANTS)}")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    results: dict = {}
    for names in phases:
        results.update(run_phase(names, work, a.cores, a.overrides, a.reuse))
    summary = {}
    if "hybrid" in results:
        h = results["hybrid"]
        summary["hybrid"] = {"test_hr@10": h["test"]["hr@10"], "test_ndcg@10": h["test"]["ndcg@10"],
                             "target_hr@10": 0.100, "target_ndcg@10": 0.060, "wall_minutes": round(h["wall_seconds"] / 60, 1),
                             "target_wall_minutes": 45,
                             "met": h["test"]["hr@10"] >= 0.100 and h["test"]["ndcg@10"] >= 0.060 and h["wall_seconds"] <= 45 * 60}
    if "id" in results:
        summary["id_reference"] = {"test_hr@10": results["id"]["test"]["hr@10"], "test_ndcg@10": results["id"]["test"]["ndcg@10"]}
    for name in ("hybrid_cold", "id_cold"):
        if name in results:
            r = results[name]
            summary[name] = {"test_cold_hr@10": r["test_cold"]["hr@10"], "test_warm_hr@10": r["test_warm"]["hr@10"],
                             "test_hr@10": r["test"]["hr@10"], "test_cold_random_hr@10": r.get("test_cold_random_hr@10")}
    if "hybrid_cold" in summary:
        summary["hybrid_cold"]["target_cold_hr@10"] = 0.02
        summary["hybrid_cold"]["met"] = summary["hybrid_cold"]["test_cold_hr@10"] >= 0.02
    for r in results.values():
        r["run_dir"] = "WORK/" + Path(r["run_dir"]).relative_to(work).as_posix() if str(r["run_dir"]).startswith(str(work)) else r["run_dir"]
    print(json.dumps({
        "bench": "language_beauty (issue 11)",
        "command": "python bench/language_beauty.py --work WORK " + " ".join(
            ["--phases " + " ".join(",".join(p) for p in phases)] if a.phases else []) + " ".join(a.overrides),
        "phases": phases,
        "summary": summary,
        "variants": results,
        "wall_seconds": round(time.time() - t0, 1),
        "machine": {"cpus": os.cpu_count(), "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
