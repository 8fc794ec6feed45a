"""Consistency (and accuracy) of a trained run, as ``ecomtrain eval`` reports it, into a bench JSON.

    OMP_NUM_THREADS=1 nice -n 19 python bench/consistency_eval.py RUN_DIR --ckpt best --name amazon-beauty-id \
        --out bench/results/consistency_beauty.json

Runs ``ecomtrain.train.evaluate.evaluate`` (the code behind ``ecomtrain eval``) on the test split and
records every ``test/consistency/*`` figure (time: history end vs after the next event; day:
consecutive days on temporal splits; channel pairs where the data has channels), the accuracy
figures (primary protocol and the other one), beyond-accuracy figures, CPU seconds, wall seconds
and the machine load. The run folder is recorded by name only (``RUN`` in the command).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the run's recipe (e.g. data.path=...)")
    ap.add_argument("--ckpt", default="best")
    ap.add_argument("--split", default="test", choices=["val", "test"])
    ap.add_argument("--name", help="label of the run in the JSON (default: the run folder's name)")
    ap.add_argument("--out")
    a = ap.parse_args()

    import torch
    import yaml

    from ecomtrain.train.evaluate import evaluate

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rd = Path(a.run_dir)
    recipe = yaml.safe_load((rd / "recipe.yaml").read_text())
    t0, load0 = time.time(), os.getloadavg()
    m = evaluate(str(rd), split=a.split, ckpt=a.ckpt, overrides=a.overrides)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    s = a.split
    pick = lambda pred: {k: round(v, 6) if isinstance(v, float) else v for k, v in m.items() if pred(k)}  # noqa: E731
    res = {
        "bench": "consistency_eval",
        "command": " ".join(["python bench/consistency_eval.py RUN", *a.overrides]) + f" --ckpt {a.ckpt} --split {s}"
                   + (f" --name {a.name}" if a.name else "") + (f" --out {a.out}" if a.out and not a.out.startswith("/") else ""),
        "run": {"name": a.name or rd.name, "recipe_run_name": (recipe.get("run") or {}).get("name"),
                "checkpoint": Path(str(m.get("eval/checkpoint", ""))).name, "data": Path(str((recipe.get("data") or {}).get("path", ""))).name,
                "exclude_seen_primary": m.get("eval/exclude_seen")},
        "consistency": pick(lambda k: k.startswith(f"{s}/consistency/")),
        "accuracy": pick(lambda k: k.split("/")[-1].split("@")[0] in ("hr", "ndcg", "mrr")
                         and k.rsplit("/", 1)[0] in (s, f"{s}/excl_seen", f"{s}/incl_seen", f"baseline/popularity/{s}")),
        "beyond_accuracy": pick(lambda k: k.split("/")[-1].split("@")[0] in ("coverage", "gini", "ild", "novelty")),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "loadavg_before": [round(x, 2) for x in load0], "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
        "wall_seconds": round(time.time() - t0, 1),
        "cpu_seconds": round(ru.ru_utime + ru.ru_stime, 1),
        "peak_rss_mb": round(ru.ru_maxrss / 1024, 1),
    }
    text = json.dumps(res, indent=1)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
