"""Few-shot purchase intent with SmolLM2-135M + LoRA in text (TALLRec's protocol) on synthetic prompts.

    ecomtrain model fetch smollm2-135m --out models/smollm2-135m
    OMP_NUM_THREADS=1 python bench/tasks_fewshot.py --sizes 64 256 1024

Uses recipes/smollm2-135m/purchase_intent_lora.yaml (plus dotted overrides): the synthetic shop
with planted behaviour / channel signals is built once into WORK/data; the task's own code
renders the prompts (tasks/prompts.py) and scores them (logit(Yes) - logit(No)); the model is the
recipe's (module_for_dataset + configure_model: SmolLM2 with LoRA). For each size N a fresh LoRA
trains on the first N labelled training prompts (a fixed seeded shuffle; one candidate per
prompt: the window's last interacted item or a sampled untouched item) for --epochs passes
(AdamW, constant lr), then is evaluated on one fixed held-out set (the first --eval-samples
validation users: their target + one sampled item each) with the task's evaluator: AUC, GAUC,
log loss, ECE, and the item-purchase-rate and popularity baselines on the same prompts. Size 0
is the zero-shot model. A plain loop, not Lightning: the point is the sample count, exactly.

Prints one JSON object (also written to --out): per size AUC, CPU seconds, wall seconds, load
average; labelled "SmolLM2-135M (4-bit GGUF source)".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = "recipes/smollm2-135m/purchase_intent_lora.yaml"


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def read_samples(root, manifest: dict, split: str) -> list[dict]:
    from ecomtrain.data.shardio import iter_split_samples

    return list(iter_split_samples(root, manifest, split))


def rows_of(batch: dict) -> list[dict]:
    """The valid prompts of a collated text batch, one dict per (sample, candidate)."""
    out = []
    B, C = batch["cands"].shape
    mask = batch["mask"]
    for b in range(B):
        for c in range(C):
            if batch["valid"][b, c]:
                r = b * C + c
                n = int(mask[r].sum())
                out.append({"ids": batch["ids"][r, :n].tolist(), "label": float(batch["labels"][b, c]), "cand": int(batch["cands"][b, c]),
                            "group": int(batch["group"][b])})
    return out


def to_batch(rows: list[dict], pad_id: int) -> dict:
    import torch

    from ecomtrain.tasks.prompts import pad_rows

    ids, mask = pad_rows([r["ids"] for r in rows], pad_id)
    return {"ids": ids, "mask": mask, "last": mask.sum(1) - 1, "cands": torch.tensor([[r["cand"]] for r in rows]),
            "labels": torch.tensor([[r["label"]] for r in rows]), "valid": torch.ones(len(rows), 1, dtype=torch.bool),
            "group": torch.tensor([r["group"] for r in rows])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=RECIPE)
    ap.add_argument("--sizes", type=int, nargs="*", default=[0, 64, 256, 1024])
    ap.add_argument("--epochs", type=int, nargs="*", default=[2], help="passes per size (one value, or one per size)")
    ap.add_argument("--eval-samples", type=int, default=150, help="held-out validation users (2 prompts each)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--work", default=None, help="work folder (default: a new temporary one); recorded as WORK")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "tasks_fewshot_smollm2.json"))
    ap.add_argument("overrides", nargs="*", help="dotted recipe overrides")
    a = ap.parse_args()
    os.chdir(REPO)
    import torch

    from ecomtrain.config import load_recipe
    from ecomtrain.data.build import load_manifest
    from ecomtrain.train.module import module_for_dataset
    from ecomtrain.train.runner import ensure_dataset

    work = Path(a.work or tempfile.mkdtemp(prefix="bench-fewshot-"))
    cfg = load_recipe(a.recipe, [f"data.path={work / 'data'}", *a.overrides])
    torch.manual_seed(cfg.run.seed)
    ensure_dataset(cfg, log=lambda *x: print(*x, file=sys.stderr))
    manifest = load_manifest(cfg.data.path)
    train_s, val_s = read_samples(cfg.data.path, manifest, "train"), read_samples(cfg.data.path, manifest, "val")
    t0 = time.time()
    module = module_for_dataset(cfg, manifest, log=lambda *x: print(*x, file=sys.stderr))
    task = module.task
    pad_id = task.prompts.tok.pad_token_id
    train_rows = [r for i in range(0, len(train_s), 64) for r in rows_of(task.collate_train(train_s[i:i + 64]))]
    random.Random(cfg.run.seed).shuffle(train_rows)
    held = val_s[: a.eval_samples]
    eval_batches = [task.collate_eval(held[i:i + 16]) for i in range(0, len(held), 16)]
    prompt_tokens = [len(r["ids"]) for r in train_rows]
    res = {"label": "SmolLM2-135M (4-bit GGUF source), LoRA r=%d" % cfg.finetune.lora.r,
           "command": "OMP_NUM_THREADS=%s python bench/tasks_fewshot.py %s" % (
               os.environ.get("OMP_NUM_THREADS", ""), " ".join(sys.argv[1:]).replace(str(work), "WORK").replace(str(Path(a.out).resolve()), "OUT")),
           "recipe": a.recipe, "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                                           "threads": torch.get_num_threads()},
           "data": {"train_prompts_available": len(train_rows), "positive_rate_train": sum(r["label"] for r in train_rows) / max(1, len(train_rows)),
                    "eval_users": len(held), "prompt_tokens_mean": sum(prompt_tokens) / max(1, len(prompt_tokens)), "prompt_tokens_max": max(prompt_tokens),
                    "max_prompt_tokens": cfg.task[0].prompt.max_prompt_tokens, "max_steps": cfg.task[0].prompt.max_steps},
           "setup_wall_s": round(time.time() - t0, 1), "runs": {}}
    print(json.dumps(res["data"]), file=sys.stderr)
    epochs = a.epochs if len(a.epochs) == len(a.sizes) else [a.epochs[0]] * len(a.sizes)
    for n, ep in zip(a.sizes, epochs):
        if n > len(train_rows):
            print(f"size {n}: only {len(train_rows)} training prompts; skipped", file=sys.stderr)
            continue
        torch.manual_seed(cfg.run.seed)
        m = module_for_dataset(cfg, manifest, log=lambda *x: None) if n else module
        m.configure_model()
        net = m.net
        params = [p for p in net.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
        la0, c0, w0 = os.getloadavg(), cpu_s(), time.time()
        net.train()
        losses = []
        for e in range(ep if n else 0):
            order = list(range(n))
            random.Random(cfg.run.seed + e).shuffle(order)
            for i in range(0, n, a.batch):
                b = to_batch([train_rows[j] for j in order[i:i + a.batch]], pad_id)
                loss = task.loss(net, None, b)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss))
        c1, w1 = cpu_s(), time.time()
        net.eval()
        ev = task.evaluator("test")
        with torch.no_grad():
            for b in eval_batches:
                ev.update(net, None, b)
        out = {k: float(v) for k, v in ev.compute().items()}
        c2, w2 = cpu_s(), time.time()
        row = {"train_prompts": n, "epochs": ep if n else 0, "auc": out["test/purchase_intent/auc"], "gauc": out["test/purchase_intent/gauc"],
               "logloss": out["test/purchase_intent/logloss"], "ece": out["test/purchase_intent/ece"],
               "baseline_item_purchase_rate_auc": out["baseline/item_purchase_rate/test/purchase_intent/auc"],
               "baseline_popularity_auc": out["baseline/popularity/test/purchase_intent/auc"],
               "train_loss_first_last": [losses[0], sum(losses[-4:]) / len(losses[-4:])] if losses else None,
               "train_cpu_s": round(c1 - c0, 1), "train_wall_s": round(w1 - w0, 1),
               "train_cpu_s_per_prompt_pass": round((c1 - c0) / max(1, n * (ep if n else 0)), 3) if n else None,
               "eval_cpu_s": round(c2 - c1, 1), "eval_wall_s": round(w2 - w1, 1), "eval_prompts": int(sum(int(b["valid"].sum()) for b in eval_batches)),
               "loadavg_start": [round(x, 2) for x in la0], "loadavg_end": [round(x, 2) for x in os.getloadavg()]}
        res["runs"][str(n)] = row
        print(json.dumps(row), file=sys.stderr)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=2) + "\n")  # after every size: a stopped run keeps what it measured
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
