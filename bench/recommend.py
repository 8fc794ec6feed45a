"""Full-catalog top-K at scale: chunked (ecomtrain.serve.topk) vs the naive batch x catalog matrix.

    nice -n 19 python bench/recommend.py --items 1000000 --users 100000 --batch-size 1024 --out bench/results/recommend.json

A random-init 2-layer, 64-wide Qwen2 ItemLM over a 1 M-item vocabulary (tied head: 1 M x 64 fp32
= 256 MB) scores random 20-item histories, seen items excluded, top-20 per user. Each variant runs
in its own process under an address-space cap for private data (RLIMIT_DATA, default 4 GiB) so a
variant that needs more fails where it would on a 4 GB box; peak RSS is the child's ru_maxrss.

- chunked: the library path end to end: ``Recommender.rank_indices`` (``rank_catalog``, chunk size
  from ``--budget-mb`` and the CPU block size) for every user, then ``Recommender.to_frame`` and one
  Parquet file (written to a temporary folder and deleted); users/s, CPU seconds and users per
  CPU-second (robust to other jobs on a shared machine);
- naive: ``item_logits(hidden)`` -> [B, N] -> mask seen (a copy) -> ``torch.topk`` (what eval did
  before), at each of ``--naive-batch-sizes`` over ``--naive-users`` users; it reports where it
  runs out of memory.

Prints one JSON object (machine, load, command) and writes it to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time


def _child(a: argparse.Namespace) -> dict:
    cap = int(a.mem_cap_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    import torch

    from ecomtrain.config import ModelConfig
    from ecomtrain.model.backbone import ItemLM, build_causal_lm
    from ecomtrain.serve.topk import chunk_for_budget, last_hidden

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    t0 = time.time()
    cfg = ModelConfig.model_validate({"backbone": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128}})
    with torch.no_grad():
        lm, vocab, _ = build_causal_lm(cfg, a.items)
        net = ItemLM(lm, vocab).eval()
    build_s = time.time() - t0
    users = a.users if a.child == "chunked" else a.naive_users
    g = torch.Generator().manual_seed(1)
    out = {"variant": a.child, "batch_size": a.batch_size, "users": users, "threads": a.threads, "model_build_s": round(build_s, 1),
           "loadavg_start": [round(x, 2) for x in os.getloadavg()]}
    done = 0

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    t1, c1 = time.time(), cpu()
    try:
        with torch.no_grad():
            if a.child == "chunked":
                import polars as pl

                from ecomtrain.serve.recommend import Recommender

                catalog = pl.DataFrame({"item": [f"I{j:07d}" for j in range(1, a.items + 1)], "idx": list(range(1, a.items + 1))})
                rec = Recommender(net, catalog, max_history=a.history, score_memory_mb=a.budget_mb)
                hist = torch.randint(1, a.items + 1, (users, a.history), generator=g).tolist()
                out["chunk_items"] = chunk_for_budget(a.batch_size, a.budget_mb, a.items)
                t1, c1 = time.time(), cpu()
                vals, inds = [], []
                for v, i in rec.rank_indices(hist, a.k, True, None, a.batch_size):
                    vals.append(v)
                    inds.append(i)
                    done += len(v)
                    if done % (20 * a.batch_size) == 0:
                        print(f"[chunked] {done}/{users} users, {done / (time.time() - t1):.0f} users/s", file=sys.stderr, flush=True)
                    if a.max_seconds > 0 and time.time() - t1 > a.max_seconds:
                        break
                score_wall, score_cpu = time.time() - t1, cpu() - c1
                t2 = time.time()
                df = rec.to_frame(list(range(done)), torch.cat(vals), torch.cat(inds))
                with tempfile.TemporaryDirectory() as td:
                    df.write_parquet(os.path.join(td, "recs.parquet"))
                    out["parquet_mb"] = round(os.path.getsize(os.path.join(td, "recs.parquet")) / 2**20, 1)
                out.update(output_rows=df.height, frame_and_parquet_s=round(time.time() - t2, 1))
            else:
                while done < users:
                    b = min(a.batch_size, users - done)
                    items = torch.randint(1, a.items + 1, (b, a.history), generator=g)
                    h = last_hidden(net, items, torch.full((b,), a.history))
                    scores = net.item_logits(h).float()  # [b, N]
                    scores = scores.clone()
                    scores.scatter_(1, items - 1, float("-inf"))
                    torch.topk(scores, a.k, dim=1)
                    del scores
                    done += b
                score_wall, score_cpu = time.time() - t1, cpu() - c1
        out["status"] = "ok" if done == users else f"stopped after --max-seconds {a.max_seconds:g}"
    except (RuntimeError, MemoryError) as exc:
        out["status"] = "out_of_memory"
        out["error"] = str(exc).splitlines()[0][:200]
        score_wall, score_cpu = time.time() - t1, cpu() - c1
    out.update(users_done=done, score_seconds=round(score_wall, 1), score_cpu_seconds=round(score_cpu, 1),
               users_per_s=round(done / score_wall, 1) if done else 0.0,
               users_per_cpu_s=round(done / score_cpu, 1) if done and score_cpu > 0 else 0.0,
               projected_seconds_all_users=round(users * score_wall / done) if done else None,
               total_wall_s=round(time.time() - t0, 1), total_cpu_s=round(cpu(), 1),
               loadavg_end=[round(x, 2) for x in os.getloadavg()],
               peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    return out


def _spawn(a: argparse.Namespace, variant: str, batch: int) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--batch-size", str(batch)]
    for key in ("items", "users", "naive_users", "history", "k", "budget_mb", "threads", "mem_cap_gb", "max_seconds"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(a, key))]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    print(f"[bench] {variant} batch {batch} ...", file=sys.stderr, flush=True)
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)  # child progress -> our stderr
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if not lines:  # killed (e.g. the OOM killer) before it could report
        return {"variant": variant, "batch_size": batch, "status": f"died (exit {p.returncode})"}
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--naive-users", type=int, default=4096)
    ap.add_argument("--naive-batch-sizes", default="64,256,1024")
    ap.add_argument("--history", type=int, default=20)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--budget-mb", type=float, default=256.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mem-cap-gb", type=float, default=4.0)
    ap.add_argument("--max-seconds", type=float, default=0, help="chunked: stop scoring after this long and report users/s (0 = all users)")
    ap.add_argument("--out")
    ap.add_argument("--child", choices=["chunked", "naive"])
    a = ap.parse_args()
    if a.child:
        print(json.dumps(_child(a)))
        return
    t0 = time.time()
    load_before = os.getloadavg()
    naive = [_spawn(a, "naive", int(b)) for b in a.naive_batch_sizes.split(",") if b.strip()]
    chunked = _spawn(a, "chunked", a.batch_size)
    import torch

    res = {
        "bench": "recommend",
        "command": "python bench/recommend.py " + " ".join(x for x in sys.argv[1:] if not x.startswith("/")),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": a.threads, "torch": torch.__version__,
                    "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
        "setup": {"items": a.items, "users": a.users, "history": a.history, "k": a.k, "exclude_seen": True,
                  "model": "Qwen2 2 layers, hidden 64, tied head (random init)", "mem_cap_gb": a.mem_cap_gb,
                  "budget_mb": a.budget_mb},
        "chunked": chunked,
        "naive": naive,
        "wall_seconds": round(time.time() - t0, 1),
    }
    text = json.dumps(res, indent=1)
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
