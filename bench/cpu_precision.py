"""bf16 autocast vs fp32 on this CPU: what `trainer.precision=bf16-mixed` costs where the CPU has no native bf16.

    OMP_NUM_THREADS=1 python bench/cpu_precision.py --out bench/results/cpu_precision.json

Times, alternating fp32 and bf16 autocast (medians of --repeats), on the CPU:
  - one (tokens x hidden) @ (hidden x intermediate) matmul, SmolLM2-135M's MLP shape (576 -> 1536);
  - one training step (forward, backward, AdamW) of a 2-layer Llama with SmolLM2-135M's layer shapes
    (hidden 576, 9 heads, 3 KV heads, intermediate 1536), random init, batch x 50 tokens.
Prints one JSON object, with the slowdown factors and whether ecomtrain's start-up warning
(`train/strategies.py: cpu_precision_warning`) fires on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", help="also write the JSON object to this file")
    a = ap.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ecomtrain.train.strategies import cpu_has_bf16_kernels, cpu_precision_warning

    torch.manual_seed(0)
    tokens = a.batch * a.seq
    x, w = torch.randn(tokens, 576), torch.randn(1536, 576)
    cfg = LlamaConfig(vocab_size=2000, hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq))

    def matmul() -> None:
        x @ w.T

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def timed(fn, bf16: bool) -> float:
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            fn()
        return time.perf_counter() - t

    out: dict = {}
    for name, fn in (("matmul", matmul), ("train_step", step)):
        timed(fn, False), timed(fn, True)  # warm-up: allocator, oneDNN primitives
        runs = {"fp32": [], "bf16_autocast": []}
        for _ in range(a.repeats):  # alternating, so a load change hits both sides
            runs["fp32"].append(timed(fn, False))
            runs["bf16_autocast"].append(timed(fn, True))
        med = {k: statistics.median(v) for k, v in runs.items()}
        out[name] = {"seconds_median": {k: round(v, 5) for k, v in med.items()},
                     "seconds_all": {k: [round(t, 5) for t in v] for k, v in runs.items()},
                     "bf16_over_fp32": round(med["bf16_autocast"] / med["fp32"], 2)}
    result = {
        "bench": "cpu_precision",
        "command": "OMP_NUM_THREADS=%s python bench/cpu_precision.py --batch %d --seq %d --repeats %d"
                   % (os.environ.get("OMP_NUM_THREADS", "unset"), a.batch, a.seq, a.repeats),
        "tokens": tokens,
        **out,
        "machine": {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "onednn_bf16": cpu_has_bf16_kernels(),
                    "processor": platform.processor() or platform.machine(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "loadavg": list(os.getloadavg())},
        "ecomtrain_warns": cpu_precision_warning("bf16-mixed", "cpu") is not None,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
