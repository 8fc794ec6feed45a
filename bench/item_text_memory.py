"""Peak memory of encoding and chunk-scoring a 1 M-item catalog (model.items text).

    OMP_NUM_THREADS=1 python bench/item_text_memory.py --items 1000000 > bench/results/item_text_memory_1m.json

Synthetic item texts (brand, product line, category, size: the synth generator's title
shape) are encoded in chunks (``item_text.encode``) by the built-in hashing encoder and,
optionally, a random-init BERT-style encoder (--bert: a 2-layer, 128-wide encoder saved to
a temp folder, i.e. real transformer activations per chunk), then every item is scored for
a batch of users chunk by chunk with ``ItemLM.item_logits(h, lo, hi)`` keeping a running
top-10. Peak RSS (ru_maxrss) is read after each phase; the table itself is N x D x 4 bytes,
the rest should be one chunk.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path


def rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--bert", action="store_true")
    a = ap.parse_args()

    import numpy as np
    import torch

    from ecomtrain.model import item_text as IT
    from ecomtrain.model.items import ItemTower

    out = {"bench": "item_text_memory", "items": a.items, "chunk": a.chunk, "machine": {
        "cpus": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "loadavg_start": list(os.getloadavg())}}
    t0 = time.time()
    rng = np.random.default_rng(0)
    cats = ["shampoo", "conditioner", "lipstick", "serum", "sunscreen", "mascara", "toner", "perfume"]
    texts = [f"brand{b:04d} line{l:05d} {cats[c]}; brand: brand{b:04d}; category: {cats[c]}; price: {p:.2f}"
             for b, l, c, p in zip(rng.integers(0, 5000, a.items), rng.integers(0, 50000, a.items),
                                   rng.integers(0, len(cats), a.items), rng.uniform(2, 80, a.items))]
    out["texts_rss_mb"] = rss_mb()
    enc = lambda ts: IT.hashing_encode(ts, a.dim)  # noqa: E731
    name = f"hashing(dim={a.dim})"
    if a.bert:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from test_language import save_tiny_bert

        folder = Path(tempfile.mkdtemp()) / "bert"
        save_tiny_bert(folder, words=[f"brand{i:04d}" for i in range(0, 5000, 7)] + cats)
        enc, name = IT.HFEncoder(folder, 32), "random-init BERT (1 layer, 32 wide)"
    t1 = time.time()
    table = IT.encode(texts, enc, a.chunk)
    out["encode"] = {"encoder": name, "seconds": round(time.time() - t1, 1), "table_mb": round(table.numel() * 4 / 2**20, 1),
                     "peak_rss_mb": rss_mb()}
    del texts
    tower = ItemTower(table, 64, "linear")
    h = torch.randn(256, 64)
    t2 = time.time()
    best_v = torch.full((256, 10), float("-inf"))
    best_i = torch.zeros((256, 10), dtype=torch.long)
    with torch.no_grad():
        for lo in range(0, a.items, a.chunk):
            hi = min(lo + a.chunk, a.items)
            s = h @ tower.vectors(lo, hi).T
            v, i = torch.cat([best_v, s], 1).topk(10, dim=1)
            best_i = torch.cat([best_i, torch.arange(lo, hi).expand(256, -1)], 1).gather(1, i)
            best_v = v
    out["score_top10"] = {"users": 256, "seconds": round(time.time() - t2, 1), "peak_rss_mb": rss_mb(),
                          "one_chunk_scores_mb": round(256 * a.chunk * 4 / 2**20, 1),
                          "full_score_matrix_would_be_mb": round(256 * a.items * 4 / 2**20, 1)}
    out["wall_seconds"] = round(time.time() - t0, 1)
    out["machine"]["loadavg_end"] = list(os.getloadavg())
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
