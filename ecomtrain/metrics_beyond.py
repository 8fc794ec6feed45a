"""Beyond-accuracy metrics of the recommended top-K lists (definitions: docs/recommend.md).

    coverage@K  = |{i : i in some user's top-K}| / N                       in [0, 1]
    gini@K      = Gini coefficient of item exposure (times in a top-K)       in [0, 1 - 1/N]
                  G = sum_i (2i - N - 1) x_(i) / (N sum_i x_i),  x ascending
    ild@K       = mean over lists of the share of item pairs whose categories differ   in [0, 1]
    novelty@K   = mean over list items of -log2 p(i),
                  p(i) = (train_count_i + 1) / (sum_j train_count_j + N)    in (0, log2(sum + N)]

HR/NDCG by bucket reuse ``metrics.RankingMetrics`` with the weight of rows outside the bucket set
to 0: item-popularity buckets of the *target* (head = most popular items that hold the first 50 %
of training interactions, torso = the next 30 %, tail = the rest and never-trained items) and
user-activity buckets of the history length (light < 5, medium 5-19, heavy >= 20 items).

Every state is a sum (exposure counts included), so torchmetrics' all-reduce makes the values
exact across ranks (padding rows carry weight 0).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torchmetrics import Metric

POP_BUCKETS = ("head", "torso", "tail")
POP_SHARES = (0.5, 0.8)  # cumulative interaction shares closing head and torso
USER_BUCKETS = ("light", "medium", "heavy")
USER_EDGES = (5, 20)  # history lengths opening medium and heavy


def popularity_buckets(counts: torch.Tensor) -> torch.Tensor:
    """Bucket id (0 head, 1 torso, 2 tail) per item column from training counts."""
    counts = counts.to(torch.float64)
    order = torch.argsort(counts, descending=True, stable=True)
    total = counts.sum().clamp(min=1)
    share_before = (torch.cumsum(counts[order], 0) - counts[order]) / total  # share held by more popular items
    b = torch.full_like(order, 2)
    b[order[share_before < POP_SHARES[1]]] = 1
    b[order[share_before < POP_SHARES[0]]] = 0
    b[counts <= 0] = 2
    return b


def activity_buckets(history_len: torch.Tensor) -> torch.Tensor:
    return (history_len >= USER_EDGES[0]).long() + (history_len >= USER_EDGES[1]).long()


def gini(x: torch.Tensor) -> torch.Tensor:
    x = torch.sort(x.to(torch.float64)).values
    n = x.numel()
    if n == 0 or float(x.sum()) <= 0:
        return torch.tensor(0.0, dtype=torch.float64)
    i = torch.arange(1, n + 1, dtype=torch.float64, device=x.device)
    return ((2 * i - n - 1) * x).sum() / (n * x.sum())


def intra_list_diversity(cats: torch.Tensor, valid: torch.Tensor, num_categories: int) -> torch.Tensor:
    """Per list: share of pairs of (valid) items whose categories differ; 0 for lists under 2 items."""
    onehot = torch.zeros(cats.shape[0], num_categories + 1, dtype=torch.float64, device=cats.device)
    onehot.scatter_add_(1, torch.where(valid, cats, num_categories), valid.to(torch.float64))
    onehot = onehot[:, :num_categories]
    n = valid.sum(1).to(torch.float64)
    pairs = n * (n - 1)
    same = (onehot * (onehot - 1)).sum(1)
    return torch.where(pairs > 0, 1 - same / pairs.clamp(min=1), torch.zeros_like(n))


class BeyondAccuracy(Metric):
    """coverage / gini / ild / novelty at each K from top-K item columns."""

    full_state_update = False

    def __init__(self, num_items: int, ks: Sequence[int], item_counts: torch.Tensor,
                 item_category: Optional[torch.Tensor] = None, **kw):
        super().__init__(**kw)
        self.ks = tuple(int(k) for k in ks)
        self.num_items = num_items
        counts = item_counts.to(torch.float64)
        self.register_buffer("neg_log_p", -torch.log2((counts + 1) / (counts.sum() + num_items)), persistent=False)
        cat = item_category if item_category is not None else torch.full((num_items,), -1, dtype=torch.long)
        self.num_categories = int(cat.max().item()) + 1 if cat.numel() else 0
        self.register_buffer("category", cat.long(), persistent=False)
        self.add_state("exposure", default=torch.zeros(len(self.ks), num_items, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("ild", default=torch.zeros(len(self.ks), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("novelty", default=torch.zeros(len(self.ks), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("lists", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("slots", default=torch.zeros(len(self.ks), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, indices: torch.Tensor, values: torch.Tensor, weight: Optional[torch.Tensor] = None) -> None:
        """``indices``/``values``: [B, >=max K] top-K item columns and scores (-inf = empty slot)."""
        w = torch.ones(len(indices), dtype=torch.float64, device=indices.device) if weight is None else weight.to(torch.float64)
        self.lists = self.lists + w.sum()
        for j, k in enumerate(self.ks):
            idx, valid = indices[:, :k], torch.isfinite(values[:, :k])
            vw = valid.to(torch.float64) * w.unsqueeze(1)
            # DeepSpeed may cast metric states to the module's dtype: add in the state's own dtype
            self.exposure[j].index_add_(0, idx.reshape(-1), vw.reshape(-1).to(self.exposure.dtype))
            self.novelty[j] = self.novelty[j] + (self.neg_log_p[idx] * vw).sum()
            self.slots[j] = self.slots[j] + vw.sum()
            if self.num_categories > 0:
                cats = self.category[idx]
                ok = valid & (cats >= 0)
                self.ild[j] = self.ild[j] + (intra_list_diversity(cats.clamp(min=0), ok, self.num_categories) * w).sum()

    def compute(self) -> dict[str, torch.Tensor]:
        out = {}
        for j, k in enumerate(self.ks):
            out[f"coverage@{k}"] = ((self.exposure[j] > 0).sum() / self.num_items).float()
            out[f"gini@{k}"] = gini(self.exposure[j]).float()
            out[f"novelty@{k}"] = (self.novelty[j] / self.slots[j].clamp(min=1)).float()
            if self.num_categories > 0:
                out[f"ild@{k}"] = (self.ild[j] / self.lists.clamp(min=1)).float()
        return out
