"""Bounded-memory full-catalog ranking: one routine for ``eval`` and ``recommend``.

A query batch is never scored against the whole catalog at once. Items are scored in
column chunks ``lo .. hi-1`` (``scorer(lo, hi) -> [B, hi-lo]``); per chunk we

- mask seen / filtered-out items with ``-inf``,
- merge the chunk's ``torch.topk`` into a running top-K (values + item columns), and
- when targets are given, count items scored strictly above the target, items tied
  with it and items with a finite score: exactly what ``metrics.ranking_from_counts``
  needs, so metrics equal those of the full score matrix (see tests/test_topk.py).

Memory: B x chunk floats per chunk (plus a few same-sized temporaries), with the chunk
size derived from a budget: ``chunk_for_budget(B, budget_mb)``. 1 M items x 256 queries
would be 1 GB as one fp32 matrix; with the default 256 MB budget it is ~16 chunks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

Scorer = Callable[..., torch.Tensor]  # scorer(lo, hi, rows=None) -> [B or len(rows), hi-lo] float

# live B x chunk tensors per chunk: scores, a masked copy, two comparison masks, topk scratch
_TEMPS = 5


def chunk_for_budget(batch: int, budget_mb: float, num_items: int, min_chunk: int = 256) -> int:
    """Items per chunk so that ~_TEMPS float32 [batch, chunk] tensors fit ``budget_mb``."""
    per_col = max(1, batch) * 4 * _TEMPS
    chunk = int(budget_mb * 2**20 // per_col)
    return max(1, min(num_items, max(min_chunk, chunk)))


@dataclass
class RankResult:
    values: torch.Tensor  # [B, k] top scores, descending (-inf where fewer than k items are rankable)
    indices: torch.Tensor  # [B, k] item columns (item index - 1)
    greater: Optional[torch.Tensor] = None  # [B] items scored strictly above the target
    equal: Optional[torch.Tensor] = None  # [B] other items tied with the target
    n_finite: Optional[torch.Tensor] = None  # [B] items with a finite score
    target_masked: Optional[torch.Tensor] = None  # [B] the target's own score is -inf


def _seen_mask(seen: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column-in-chunk) of seen items (1-based, 0 = pad) that fall in lo..hi-1."""
    col = seen - 1 - lo
    keep = (seen > 0) & (col >= 0) & (col < hi - lo)
    rows = torch.arange(len(seen), device=seen.device).unsqueeze(1).expand_as(seen)
    return rows[keep], col[keep]


def target_scores(scorer: Scorer, target: torch.Tensor, num_items: int, chunk: int) -> torch.Tensor:
    """Score of each row's target column, computed with the same chunk boundaries as the main pass."""
    out = torch.empty(len(target), dtype=torch.float32, device=target.device)
    cid = torch.div(target, chunk, rounding_mode="floor")
    for c in torch.unique(cid).tolist():
        rows = (cid == c).nonzero().squeeze(1)
        lo, hi = c * chunk, min(num_items, (c + 1) * chunk)
        s = scorer(lo, hi, rows).float()
        out[rows] = s.gather(1, (target[rows] - lo).view(-1, 1)).squeeze(1)
    return out


def rank_catalog(
    scorer: Scorer,
    batch: int,
    num_items: int,
    k: int,
    chunk: int,
    seen: Optional[torch.Tensor] = None,
    allowed: Optional[torch.Tensor] = None,
    target: Optional[torch.Tensor] = None,
    device: Optional[torch.device] = None,
) -> RankResult:
    """Top-``k`` item columns per row, and (with ``target``, 0-based columns) the rank counts.

    ``seen``: [B, S] item indices (1-based, 0 = padding) to exclude. ``allowed``: bool [num_items]
    catalog filter (False = never recommended, and not counted in the ranking).
    """
    device = device or (target.device if target is not None else torch.device("cpu"))
    k = min(k, num_items)
    top_v = torch.full((batch, 0), float("-inf"), device=device)
    top_i = torch.zeros((batch, 0), dtype=torch.long, device=device)
    counting = target is not None
    if counting:
        greater = torch.zeros(batch, dtype=torch.long, device=device)
        equal = torch.zeros(batch, dtype=torch.long, device=device)
        n_finite = torch.zeros(batch, dtype=torch.long, device=device)
        # one chunk: the target's score is read from the very matrix that is counted (bit-identical
        # to the full-matrix path); several: from a call with the same chunk boundaries
        t = None if chunk >= num_items else target_scores(scorer, target, num_items, chunk)
        t_masked = torch.zeros(batch, dtype=torch.bool, device=device)
    for lo in range(0, num_items, chunk):
        hi = min(num_items, lo + chunk)
        s = scorer(lo, hi).float()
        if seen is not None:
            r, c = _seen_mask(seen, lo, hi)
            s[r, c] = float("-inf")
        if allowed is not None:
            s.masked_fill_(~allowed[lo:hi].to(s.device).unsqueeze(0), float("-inf"))
        if counting:
            in_chunk = (target >= lo) & (target < hi)
            col = (target - lo).clamp(0, hi - lo - 1).view(-1, 1)
            here = s.gather(1, col).squeeze(1)
            if t is None:
                t = here
            # the target's own (possibly masked) value decides whether it is masked
            t_masked |= in_chunk & ~torch.isfinite(here)
            tt = t.view(-1, 1)
            own = torch.zeros_like(s, dtype=torch.bool)
            own.scatter_(1, col, in_chunk.view(-1, 1))
            greater += ((s > tt) & ~own).sum(1)
            equal += ((s == tt) & ~own).sum(1)
            n_finite += torch.isfinite(s).sum(1)
        kk = min(k, hi - lo)
        cv, ci = torch.topk(s, kk, dim=1)
        top_v, idx = torch.topk(torch.cat([top_v, cv], 1), min(k, top_v.shape[1] + kk), dim=1)
        top_i = torch.cat([top_i, ci + lo], 1).gather(1, idx)
    res = RankResult(top_v, top_i)
    if counting:
        # a masked target is a miss; its counts are irrelevant (metrics are zeroed)
        res.greater = greater.masked_fill(t_masked, 0)
        res.equal = equal.masked_fill(t_masked, 0)
        res.n_finite, res.target_masked = n_finite, t_masked
    return res


class HiddenScorer:
    """``scorer(lo, hi, rows)`` over a model's item interface: ``net.item_logits(h, lo, hi)``."""

    def __init__(self, net, hidden: torch.Tensor):
        self.net, self.hidden = net, hidden

    def __call__(self, lo: int, hi: int, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.hidden if rows is None else self.hidden[rows]
        return self.net.item_logits(h, lo, hi).float()


class VectorScorer:
    """The same score vector for every row (e.g. popularity): ``[num_items]`` -> chunk views."""

    def __init__(self, vec: torch.Tensor, batch: int):
        self.vec, self.batch = vec.float(), batch

    def __call__(self, lo: int, hi: int, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        n = self.batch if rows is None else len(rows)
        return self.vec[lo:hi].unsqueeze(0).expand(n, -1).clone()


def last_hidden(net, items: torch.Tensor, lengths: torch.Tensor, side: Optional[dict] = None) -> torch.Tensor:
    """[B, H] hidden state at each row's last history position (right-padded ``items``); ``side``:
    the batch's per-step side inputs (model.inputs), aligned with ``items``."""
    h = net.hidden(items, side=side) if side else net.hidden(items)
    return h[torch.arange(len(h), device=h.device), lengths - 1]
