"""Full-catalog ranking metrics on torchmetrics: HR@K, NDCG@K, MRR, AUC.

One relevant item per query (the held-out next item). With ``g`` items
scored strictly above the target and ``e`` other items tied with it, the
target's rank is uniform on ``g+1 .. g+e+1`` under random tie-breaking; the
metrics below are the exact expectations over that tie-break, so a
constant-score baseline (popularity has many ties at count 0) is neither
flattered (optimistic ties) nor punished (pessimistic ties). Without ties
they are the usual definitions:

    HR@K   = 1[rank <= K]
    NDCG@K = 1/log2(rank + 1) if rank <= K else 0
    MRR    = 1/rank
    AUC    = 1 - (rank - 1) / (n - 1)      (n = items with a finite score)

Items masked with ``-inf`` (e.g. already seen) drop out of the ranking; a
masked target counts as a miss.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torchmetrics import Metric


def target_ties(scores: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(#items strictly above the target, #other items tied with it) per row."""
    t = scores.gather(1, target.view(-1, 1))
    greater = (scores > t).sum(1)
    equal = (scores == t).sum(1) - 1
    return greater, equal


def _cumulative(n: int, fn, device) -> torch.Tensor:
    r = torch.arange(1, n + 1, dtype=torch.float64, device=device)
    return torch.cat([torch.zeros(1, dtype=torch.float64, device=device), torch.cumsum(fn(r), 0)])


def ranking_scores(scores: torch.Tensor, target: torch.Tensor, ks: Sequence[int]) -> dict[str, torch.Tensor]:
    """Per-row metric values (float64), exact under random tie-breaking."""
    g, e = target_ties(scores, target)
    masked = ~torch.isfinite(scores.gather(1, target.view(-1, 1))).squeeze(1)
    finite = torch.isfinite(scores).sum(1)
    return ranking_from_counts(g, e, finite, masked, ks, scores.shape[1])


def ranking_from_counts(greater: torch.Tensor, equal: torch.Tensor, n_finite: torch.Tensor, masked: torch.Tensor,
                        ks: Sequence[int], num_items: int) -> dict[str, torch.Tensor]:
    """Per-row metric values from counts: items scored strictly above the target (``greater``),
    other items tied with it (``equal``), items with a finite score (``n_finite``) and whether the
    target itself is masked. This is all the ranking needs, so a chunked pass over the catalog
    (``ecomtrain.serve.topk``) that only counts gives the same values as a full score matrix."""
    device = greater.device
    g, e = greater.to(torch.float64), equal.to(torch.float64)
    lo, hi = g.long(), (g + e + 1).long()  # rank range is lo+1 .. hi
    disc = _cumulative(num_items, lambda r: 1.0 / torch.log2(r + 1), device)
    harm = _cumulative(num_items, lambda r: 1.0 / r, device)
    out = {}
    for k in ks:
        out[f"hr@{k}"] = ((k - g) / (e + 1)).clamp(0, 1)
        out[f"ndcg@{k}"] = (disc[hi.clamp(max=k)] - disc[lo.clamp(max=k)]) / (e + 1)
    out["mrr"] = (harm[hi] - harm[lo]) / (e + 1)
    finite = n_finite.to(torch.float64)
    out["auc"] = (1 - (g + e / 2) / (finite - 1).clamp(min=1)).clamp(0, 1)
    for v in out.values():
        v.masked_fill_(masked.to(device), 0.0)
    return out


class RankingMetrics(Metric):
    """Accumulates weighted sums; ``compute`` returns means. DDP-safe (sum)."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, ks: Sequence[int] = (5, 10, 20), report_count: bool = False, **kw):
        super().__init__(**kw)
        self.ks = tuple(int(k) for k in ks)
        self.report_count = report_count  # also return "users" (the summed weight), reduced like the rest
        self.names = [f"{m}@{k}" for k in self.ks for m in ("hr", "ndcg")] + ["mrr", "auc"]
        for name in self.names:
            self.add_state(name.replace("@", "_"), default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, scores: Optional[torch.Tensor], target: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None,
               counts: Optional[tuple] = None, num_items: int = 0) -> None:
        """From a full score matrix ``[B, N]`` and 0-based targets, or from ``counts`` =
        (greater, equal, n_finite, target_masked) of a chunked pass (``serve.topk.rank_catalog``)."""
        if counts is not None:
            g = counts[0]
            self._add(ranking_from_counts(*counts, self.ks, num_items), weight, len(g), g.device)
        else:
            self._add(ranking_scores(scores.float(), target, self.ks), weight, len(target), scores.device)

    def update_counts(self, greater: torch.Tensor, equal: torch.Tensor, n_finite: torch.Tensor, masked: torch.Tensor,
                      num_items: int, weight: Optional[torch.Tensor] = None) -> None:
        """Same as ``update`` from per-row counts (see ``ranking_from_counts``)."""
        self.update(None, None, weight, counts=(greater, equal, n_finite, masked), num_items=num_items)

    def _add(self, vals: dict, weight: Optional[torch.Tensor], n: int, device) -> None:
        w = torch.ones(n, dtype=torch.float64, device=device) if weight is None else weight.to(torch.float64)
        for name in self.names:
            attr = name.replace("@", "_")
            setattr(self, attr, getattr(self, attr) + (vals[name] * w).sum())
        self.count = self.count + w.sum()

    def compute(self) -> dict[str, torch.Tensor]:
        c = self.count.clamp(min=1)
        out = {name: (getattr(self, name.replace("@", "_")) / c).float() for name in self.names}
        if self.report_count:
            out["users"] = self.count.float()
        return out
