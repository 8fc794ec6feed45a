"""Fine-tuning methods side by side: trainable parameters, peak memory, step time (prints JSON).

    python bench/peft_methods.py                       # CPU or the visible GPU; defaults below
    python bench/peft_methods.py --steps 40 --hidden 512 --layers 8 --methods full,lora,adalora

Same model (random-init Qwen2), same data (a synthetic shop log built once into
a temp folder, or --data DIR), same batches, one process per method so peak
memory is that method's alone: CUDA ``max_memory_allocated``, or on CPU the
growth of the process's peak RSS (``ru_maxrss``) from just before the model is
built. Step time is the median wall time of a full Lightning optimizer step
(forward, backward, AdamW, and for AdaLoRA the rank allocation callback), after
``--warmup`` steps. Never run inside the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)}"
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def one(args) -> dict:
    """Run one method in this process; return its figures."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback

    from ecomtrain.config import validate_tree
    from ecomtrain.data.build import load_manifest
    from ecomtrain.model.adapters import trainable_parameter_count
    from ecomtrain.train.adalora import AdaLoraAllocator
    from ecomtrain.train.datamodule import ShardDataModule
    from ecomtrain.train.module import RecModule

    cuda = torch.cuda.is_available()
    ft = {"method": args.one}
    if args.one == "adalora":
        ft["adalora"] = {"init_r": 12, "target_r": 4, "tinit": 2, "tfinal": 2}
    tree = {
        "data": {"path": args.data, "batch_size": args.batch, "max_history": 50, "shuffle_buffer": 0},
        "model": {"backbone": {"hidden_size": args.hidden, "num_layers": args.layers, "num_heads": max(1, args.hidden // 64),
                               "intermediate_size": 4 * args.hidden}, "dropout": 0.1},
        "finetune": ft,
        "trainer": {"accelerator": "gpu" if cuda else "cpu", "max_steps": args.steps, "precision": args.precision},
    }
    cfg = validate_tree(tree)
    manifest = load_manifest(args.data)
    n = int(manifest["num_items"])
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    L.seed_everything(0, verbose=False)
    module = RecModule(tree, n)

    class Timer(Callback):
        def __init__(self):
            self.times: list[float] = []

        def on_train_batch_start(self, *a):
            if cuda:
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_train_batch_end(self, *a):
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t)

    timer = Timer()
    callbacks = [timer] + ([AdaLoraAllocator()] if args.one == "adalora" else [])
    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu", devices=1, max_steps=args.steps, precision=args.precision,
        limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )
    trainer.fit(module, datamodule=ShardDataModule(cfg, module.task, manifest))
    trainable, total = trainable_parameter_count(module.net)
    times = timer.times[args.warmup:] or timer.times
    out = {
        "method": args.one,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_pct": round(100.0 * trainable / total, 3),
        "step_time_ms_median": round(1000 * statistics.median(times), 2),
        "steps_timed": len(times),
    }
    if cuda:
        out["peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out["peak_memory_kind"] = "cuda max_memory_allocated"
    else:
        # ru_maxrss is KiB on Linux
        out["peak_memory_mb"] = round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024, 1)
        out["peak_memory_kind"] = "cpu peak RSS growth from model build to end of training"
    return out


def build_data(root: Path, users: int, items: int) -> str:
    from ecomtrain.data import build, importers, synth

    synth.write(root / "raw", num_users=users, num_items=items, seed=0)
    build.build(importers.load("synth", root / "raw"), root / "built", seed=0, log=lambda *a: None)
    return str(root / "built")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="full,lora,dora,adalora", help="comma list (qlora only with CUDA + bitsandbytes)")
    p.add_argument("--data", help="built dataset folder (default: a synthetic one in a temp folder)")
    p.add_argument("--users", type=int, default=3000)
    p.add_argument("--items", type=int, default=2000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--precision", default="32")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print("BENCH " + json.dumps(one(args)), flush=True)
        return
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "WANDB_MODE": "disabled"}
    with tempfile.TemporaryDirectory() as td:
        data = args.data or build_data(Path(td), args.users, args.items)
        results = []
        for m in args.methods.split(","):
            cmd = [sys.executable, __file__, "--one", m, "--data", data] + [
                f"--{k}={getattr(args, k)}" for k in ("hidden", "layers", "batch", "steps", "warmup", "precision")]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")), None)
            if proc.returncode != 0 or line is None:
                results.append({"method": m, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]})
            else:
                results.append(json.loads(line[len("BENCH "):]))
    import torch

    print(json.dumps({
        "device": device_name(),
        "torch": torch.__version__,
        "model": {"arch": "qwen2", "hidden": args.hidden, "layers": args.layers, "num_items": args.items},
        "data": {"synthetic_users": None if args.data else args.users, "batch_size": args.batch, "max_history": 50},
        "steps": args.steps, "warmup": args.warmup, "precision": args.precision,
        "methods": results,
    }, indent=2))


if __name__ == "__main__":
    main()
