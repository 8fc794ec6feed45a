"""Training throughput: ecomtrain (Lightning + shards) vs a hand-written PyTorch loop.

    python bench/train_throughput.py                      # CPU, quickstart-sized model
    python bench/train_throughput.py --device cuda --precision bf16-mixed \
        --hidden 1024 --layers 12 --heads 16 --items 50000 --batch 32 --steps 60

Both sides train the same ItemLM (same init, same batch size and history
length) for the same number of optimizer steps; the baseline gets its
batches pre-collated in memory (no data loading at all), ecomtrain streams
them from WebDataset shards through its DataModule. Prints one JSON object:
samples/s and tokens/s for each, ecomtrain's overhead, and on CUDA the model
FLOP utilisation (6 x params x tokens + attention, over the GPU's dense bf16
peak given by --peak-tflops).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--precision", default="32", choices=["32", "bf16-mixed", "16-mixed"])
    ap.add_argument("--users", type=int, default=3000)
    ap.add_argument("--items", type=int, default=600)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--history", type=int, default=50)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs of each side; medians are reported")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    ap.add_argument("--data", help="an already built dataset folder (else a synth one is built)")
    ap.add_argument("--out", help="also write the JSON object to this file (e.g. bench/results/train_throughput_cpu.json)")
    ap.add_argument("--profile-callers", nargs="*", default=[], metavar="NAME",
                    help="with --profile: also print the callers of functions matching these names")
    ap.add_argument("--num-workers", type=int, default=0,
                    help="ecomtrain arm: data.num_workers (0 = read in the training process, in a prefetch thread; N = worker processes)")
    ap.add_argument("--read-ahead", choices=["on", "off"], default="on",
                    help="ecomtrain arm: start the next epoch's reader at an epoch's last batch (train/datamodule.py) or on demand")
    ap.add_argument("--profile-dump", metavar="DIR", help="with --profile: also write each side's raw cProfile stats to DIR/<side>.prof (pstats)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="instead of timing: cProfile (main-thread CPU time) one ecomtrain run and one plain run, print the top N entries "
                         "by cumulative and by own time (where the time beyond the model step goes)")
    a = ap.parse_args()

    import lightning as L
    import torch

    from ecomtrain.config import validate_tree
    from ecomtrain.data import build, importers, synth
    from ecomtrain.data.stream import ShardStream
    from ecomtrain.train.datamodule import ShardDataModule
    from ecomtrain.train.module import RecModule

    tmp = Path(tempfile.mkdtemp(prefix="ecomtrain-bench-"))
    data = Path(a.data) if a.data else tmp / "data"
    if not a.data:
        synth.write(tmp / "raw", num_users=a.users, num_items=a.items, seed=0)
        build.build(importers.load("synth", tmp / "raw"), data, log=lambda *_: None)
    manifest = build.load_manifest(data)
    n_items = manifest["num_items"]
    tree = {
        "run": {"dir": str(tmp / "run"), "seed": 0},
        "data": {"path": str(data), "max_history": a.history, "batch_size": a.batch, "shuffle_buffer": 1000,
                 "num_workers": a.num_workers},
        "model": {"backbone": {"hidden_size": a.hidden, "num_layers": a.layers, "num_heads": a.heads, "intermediate_size": 4 * a.hidden,
                               "max_position_embeddings": max(512, a.history + 1)}, "dropout": 0.1},
        "optim": {"warmup_ratio": 0.0, "scheduler": "constant"},
        "trainer": {"accelerator": "gpu" if a.device == "cuda" else "cpu", "precision": a.precision, "progress_bar": False},
        "logging": {"wandb": {"enabled": False}},
    }
    cfg = validate_tree(tree)
    total = a.steps + a.warmup
    from ecomtrain.train.datamodule import _ResumableLoader

    _ResumableLoader.read_ahead = a.read_ahead == "on"

    # ---- the batches, pre-collated once for the plain loop
    L.seed_everything(0, verbose=False)
    module = RecModule(tree, n_items)
    module.configure_model()
    net = module.net.to(a.device)
    ds = ShardStream(data, "train", manifest, module.task.collate_train, a.batch, mode="train", shuffle_buffer=1000, seed=0)
    batches = []
    while len(batches) < total:
        for b in ds:
            batches.append({k: v.to(a.device) for k, v in b.items()})
            if len(batches) == total:
                break
    tokens = [int((b["labels"] > 0).sum()) for b in batches]
    timed_tokens = sum(tokens[a.warmup:])
    amp = a.precision != "32"
    dtype = torch.bfloat16 if a.precision.startswith("bf16") else torch.float16

    def sync():
        if a.device == "cuda":
            torch.cuda.synchronize()

    def plain_run() -> tuple[float, float, float]:
        """The same model in a hand-written loop over pre-collated in-memory batches (no data loading)."""
        L.seed_everything(0, verbose=False)
        module = RecModule(tree, n_items)
        module.configure_model()
        net = module.net.to(a.device)
        # the optimizer ecomtrain uses (train/module.py): torch's fused AdamW, so the comparison
        # measures the framework, not the optimizer kernel
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3, fused=True)
        scaler = torch.amp.GradScaler(a.device, enabled=a.precision == "16-mixed")
        net.train()
        for i, b in enumerate(batches):
            if i == a.warmup:
                sync()
                t0, c0, m0 = time.perf_counter(), time.process_time(), time.thread_time()
            with torch.autocast(a.device, dtype=dtype, enabled=amp):
                loss = module.task.loss(net, b)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t0, time.process_time() - c0, time.thread_time() - m0

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == a.warmup:
                sync()
                self.t0, self.c0, self.m0 = time.perf_counter(), time.process_time(), time.thread_time()

        def on_train_end(self, trainer, pl_module):
            sync()
            self.t1, self.c1, self.m1 = time.perf_counter(), time.process_time(), time.thread_time()

    def eco_run() -> tuple[float, float, float]:
        """ecomtrain: Lightning Trainer streaming the shards through its DataModule, with the
        callbacks a real run has (throughput monitor, LR monitor via a logger-free trainer)."""
        from ecomtrain.train.throughput import ThroughputMonitor

        L.seed_everything(0, verbose=False)
        timer = Timer()
        module2 = RecModule(tree, n_items)
        trainer = L.Trainer(
            accelerator=cfg.trainer.accelerator, devices=1, precision=a.precision, max_steps=total, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=[timer, ThroughputMonitor(log_every_n_steps=10)],
            limit_val_batches=0, num_sanity_val_steps=0, gradient_clip_val=1.0,
        )
        trainer.fit(module2, datamodule=ShardDataModule(cfg, module2.task, manifest))
        return timer.t1 - timer.t0, timer.c1 - timer.c0, timer.m1 - timer.m0

    if a.profile:
        import cProfile
        import io
        import pstats

        report = {}
        for name, fn in (("plain_pytorch", plain_run), ("ecomtrain", eco_run)):
            fn()  # warm (imports, allocator)
            prof = cProfile.Profile(time.thread_time)  # CPU time of the training thread: robust to other jobs
            prof.enable()
            fn()
            prof.disable()
            if a.profile_dump:
                Path(a.profile_dump).mkdir(parents=True, exist_ok=True)
                prof.dump_stats(str(Path(a.profile_dump) / f"{name}.prof"))
            for order in ("cumulative", "tottime"):
                buf = io.StringIO()
                pstats.Stats(prof, stream=buf).strip_dirs().sort_stats(order).print_stats(a.profile)
                report[f"{name}_{order}"] = buf.getvalue()
            if a.profile_callers:  # who calls the named functions (e.g. deepcopy __setattr__)
                buf = io.StringIO()
                for fname in a.profile_callers:  # one restriction each (several would be applied in turn)
                    pstats.Stats(prof, stream=buf).strip_dirs().sort_stats("cumulative").print_callers(fname)
                report[f"{name}_callers"] = buf.getvalue()
        for key, text in report.items():
            print(f"===== {key}\n{text}")
        return

    plain_runs, eco_runs = [], []
    load_start = os.getloadavg()[0]
    for _ in range(a.repeats):  # alternate, so load changes hit both sides alike
        plain_runs.append(plain_run())
        eco_runs.append(eco_run())
    import statistics

    plain_times, eco_times = [r[0] for r in plain_runs], [r[0] for r in eco_runs]
    plain_s, eco_s = statistics.median(plain_times), statistics.median(eco_times)
    plain_cpu, eco_cpu = statistics.median(r[1] for r in plain_runs), statistics.median(r[1] for r in eco_runs)
    plain_main, eco_main = statistics.median(r[2] for r in plain_runs), statistics.median(r[2] for r in eco_runs)
    # per-run ratios of adjacent (alternating) runs: robust to load drifting between repeats
    ratios = [e / p for p, e in zip(plain_times, eco_times)]
    n_params = sum(p.numel() for p in net.parameters())

    steps = a.steps
    out = {
        "bench": "train_throughput",
        "device": torch.cuda.get_device_name() if a.device == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "precision": a.precision,
        "model": {"params": n_params, "hidden": a.hidden, "layers": a.layers, "items": n_items, "history": a.history, "batch": a.batch},
        "timed_steps": steps,
        "plain_pytorch": {"seconds": round(plain_s, 3), "samples_per_s": round(steps * a.batch / plain_s, 1), "tokens_per_s": round(timed_tokens / plain_s, 1)},
        "ecomtrain": {"seconds": round(eco_s, 3), "samples_per_s": round(steps * a.batch / eco_s, 1), "tokens_per_s": round(timed_tokens / eco_s, 1)},
        "ecomtrain_overhead_pct": round(100 * (eco_s / plain_s - 1), 1),
        "ecomtrain_overhead_pct_median_of_pairs": round(100 * (statistics.median(ratios) - 1), 1),
        # process CPU seconds (all threads: the prefetch thread's decode/collate included), median per side
        "plain_cpu_seconds": round(plain_cpu, 3),
        "ecomtrain_cpu_seconds": round(eco_cpu, 3),
        "ecomtrain_cpu_overhead_pct": round(100 * (eco_cpu / plain_cpu - 1), 1),
        # CPU seconds of the training (main) thread alone: the critical path. ecomtrain's reading,
        # decoding and collating run in its prefetch thread (data.prefetch_batches), off this path
        # when a core is free; the plain loop reads nothing
        "plain_main_thread_cpu_seconds": round(plain_main, 3),
        "ecomtrain_main_thread_cpu_seconds": round(eco_main, 3),
        "ecomtrain_main_thread_cpu_overhead_pct": round(100 * (eco_main / plain_main - 1), 1),
        "plain_samples_per_cpu_s": round(steps * a.batch / plain_cpu, 1),
        "ecomtrain_samples_per_cpu_s": round(steps * a.batch / eco_cpu, 1),
        "repeats": a.repeats,
        "plain_seconds_each": [round(t, 3) for t in plain_times],
        "ecomtrain_seconds_each": [round(t, 3) for t in eco_times],
        "plain_cpu_seconds_each": [round(r[1], 3) for r in plain_runs],
        "ecomtrain_cpu_seconds_each": [round(r[1], 3) for r in eco_runs],
        "ecomtrain_main_thread_cpu_seconds_each": [round(r[2], 3) for r in eco_runs],
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_avg_1m_start": round(load_start, 2),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "command": "python bench/train_throughput.py " + " ".join(sys.argv[1:]),
    }
    if a.device == "cuda":
        # 6*N per token for matmuls (fwd+bwd) + attention 12*L*H*T per token
        flops_tok = 6 * n_params + 12 * a.layers * a.hidden * a.history
        for k in ("plain_pytorch", "ecomtrain"):
            out[k]["mfu_pct"] = round(100 * flops_tok * out[k]["tokens_per_s"] / (a.peak_tflops * 1e12), 2)
        out["peak_tflops_assumed"] = a.peak_tflops
    print(json.dumps(out, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
