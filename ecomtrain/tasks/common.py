"""Helpers shared by the point-wise and candidate tasks: seeded negative sampling, side inputs
for a history window, one pass over the training shards for baselines, and a small MLP head."""

from __future__ import annotations

import hashlib
from typing import Iterator, Optional

import numpy as np
import torch
from torch import nn

from ..model.side_inputs import side_keys, side_lists
from .base import pad


def user_key(user) -> int:
    """A stable 62-bit id of a user string (groups for GAUC; never a raw id in a tensor)."""
    return int.from_bytes(hashlib.blake2b(str(user).encode(), digest_size=8).digest(), "little") >> 2


def rng_for(seed: int, *parts) -> np.random.Generator:
    """A generator that depends only on (seed, parts): the same negatives on every run and rank."""
    return np.random.default_rng([seed & 0xFFFFFFFF, user_key("|".join(str(p) for p in parts)) & 0xFFFFFFFF])


class NegativeSampler:
    """Items 1..N drawn uniformly or by training popularity, never one in ``exclude``."""

    def __init__(self, num_items: int, counts: list[int], how: str = "uniform"):
        self.n = num_items
        if how == "popularity":
            w = np.asarray(counts, dtype=np.float64) + 1.0  # +1: items never seen in training stay possible
            self.p = w / w.sum()
        else:
            self.p = None

    def draw(self, rng: np.random.Generator, k: int, exclude: set) -> list[int]:
        if k <= 0:
            return []
        if len(exclude) >= self.n:
            return []
        out: list[int] = []
        taken = set(exclude)
        for _ in range(20):  # rejection in rounds: a few draws suffice unless the history covers the catalog
            cand = rng.choice(self.n, size=2 * (k - len(out)) + 4, p=self.p) + 1
            for c in cand.tolist():
                if c not in taken:
                    out.append(c)
                    taken.add(c)
                    if len(out) == k:
                        return out
        rest = [i for i in range(1, self.n + 1) if i not in taken]  # dense histories: take what is left
        rng.shuffle(rest)
        return out + rest[: k - len(out)]


def side_batch(samples: list[dict], bounds: list[tuple[int, int]], flags: dict, pad_rows=pad) -> Optional[dict]:
    """Padded side-input tensors aligned with the item rows (None when every input is off);
    ``pad_rows``: rows -> right-padded long tensor (next_item passes its faster one)."""
    if not side_keys(flags):  # every side input off: no per-sample work (collate runs once per training step)
        return None
    rows = [side_lists(s, lo, hi, flags) for s, (lo, hi) in zip(samples, bounds)]
    if not rows or not rows[0]:
        return None
    return {k: pad_rows([r[k] for r in rows]) for k in rows[0]}


def iter_train_samples(data_path: str, manifest: dict) -> Iterator[dict]:
    """Every training sample of a built dataset, shard by shard (for baselines fitted on train)."""
    from ..data.shardio import iter_split_samples

    yield from iter_split_samples(data_path, manifest, "train")


def prev_code(seen: dict, item: int) -> int:
    """0: the candidate is not in the history so far; 1 + k: it is, and its last event index is k-1 (k=0: unknown)."""
    if item not in seen:
        return 0
    e = seen[item]
    return 1 + (e + 1 if e is not None and e >= 0 else 0)


def history_codes(items: list[int], events: list, lo: int, hi: int) -> dict:
    """item -> its last event index over steps lo..hi-1."""
    out: dict = {}
    for t in range(lo, min(hi, len(items))):
        out[items[t]] = events[t] if t < len(events) else None
    return out


class PairHead(nn.Module):
    """logit(h, e) = MLP([h, e', h * e']), e' = the candidate's item embedding plus an embedding of
    whether (and with which last event) it already appears in the user's history: repeat
    consumption and returning to an abandoned cart are the strongest point-wise signals in logs."""

    def __init__(self, hidden: int, out: int = 1, num_events: int = 0):
        super().__init__()
        self.prev = nn.Embedding(num_events + 2, hidden)
        nn.init.normal_(self.prev.weight, std=0.02)
        self.mlp = nn.Sequential(nn.Linear(3 * hidden, hidden), nn.GELU(), nn.Linear(hidden, out))

    def forward(self, h: torch.Tensor, e: torch.Tensor, prev: Optional[torch.Tensor] = None) -> torch.Tensor:
        e = e.to(h.dtype)
        if prev is not None:
            e = e + self.prev(prev).to(h.dtype)
        return self.mlp(torch.cat([h, e, h * e], -1)).squeeze(-1)
