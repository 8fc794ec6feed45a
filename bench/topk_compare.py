"""``rank_catalog`` of an earlier commit vs this tree, alternating, in users per CPU-second.

    OMP_NUM_THREADS=1 nice -n 19 python bench/topk_compare.py --before ff03618 --items 1000000 --out bench/results/topk_compare.json

Loads ``ecomtrain/serve/topk.py`` as of ``--before`` (``git show``) next to the current one, builds
one random-init 2-layer, 64-wide Qwen2 ItemLM over ``--items`` items, and times both routines on the
same hidden states (random 20-item histories, seen excluded, top-20; each with its own
``chunk_for_budget`` at the default 256 MB budget) in alternation, ``--rounds`` times. CPU seconds
(process time) rather than wall time: the figure holds on a shared machine. Also checks that both
return the same lists (they may order exact ties differently; random floats have none).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _load_old(commit: str):
    src = subprocess.run(["git", "show", f"{commit}:ecomtrain/serve/topk.py"], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    with tempfile.TemporaryDirectory() as td:
        f = Path(td) / "topk_before.py"
        f.write_text(src)
        spec = importlib.util.spec_from_file_location("topk_before", f)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["topk_before"] = mod
        spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", required=True, help="commit whose rank_catalog to compare against")
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out")
    a = ap.parse_args()
    import torch

    from ecomtrain.config import ModelConfig
    from ecomtrain.model.backbone import ItemLM, build_causal_lm
    from ecomtrain.serve import topk as now

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    old = _load_old(a.before)
    torch.manual_seed(0)
    load0 = os.getloadavg()
    cfg = ModelConfig.model_validate({"backbone": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128}})
    B, N = a.batch_size, a.items
    rows = {"before": [], "now": []}
    with torch.no_grad():
        lm, vocab, _ = build_causal_lm(cfg, N)
        net = ItemLM(lm, vocab).eval()
        items = torch.randint(1, N + 1, (B, 20))
        h = now.last_hidden(net, items, torch.full((B,), 20))
        sc = now.HiddenScorer(net, h)
        lists = {}
        for _ in range(a.rounds):
            for name, mod in (("before", old), ("now", now)):
                chunk = mod.chunk_for_budget(B, 256, N)
                c0 = time.process_time()
                res = mod.rank_catalog(sc, B, N, 20, chunk, seen=items)
                dt = time.process_time() - c0
                rows[name].append({"chunk_items": chunk, "cpu_seconds": round(dt, 3), "users_per_cpu_s": round(B / dt, 1)})
                lists[name] = res.indices
    best = {k: max(r["users_per_cpu_s"] for r in v) for k, v in rows.items()}
    out = {
        "bench": "topk_compare",
        "command": f"python bench/topk_compare.py --before {a.before} --items {N} --batch-size {B} --rounds {a.rounds}"
                   + (f" --out {a.out}" if a.out and not a.out.startswith("/") else ""),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "loadavg_before": [round(x, 2) for x in load0], "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
        "setup": {"items": N, "batch_size": B, "history": 20, "k": 20, "exclude_seen": True, "model": "Qwen2 2 layers, hidden 64, tied head (random init)"},
        "runs": rows,
        "best_users_per_cpu_s": best,
        "speedup_best": round(best["now"] / best["before"], 2),
        "same_lists": bool(torch.equal(lists["before"], lists["now"])),
    }
    text = json.dumps(out, indent=1)
    if a.out:
        Path(a.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
