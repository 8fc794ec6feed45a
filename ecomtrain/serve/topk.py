"""Bounded-memory full-catalog ranking: one routine for ``eval`` and ``recommend``.

A query batch is never scored against the whole catalog at once. Items are scored in
column chunks ``lo .. hi-1`` (``scorer(lo, hi) -> [B, hi-lo]``); per chunk we

- mask seen / filtered-out items with ``-inf`` (seen pairs sorted by column once per call, so each
  chunk masks only its own slice),
- merge the chunk into a running top-K, touching only the rows whose chunk maximum beats the row's
  current K-th best score (after the first few chunks most rows skip the chunk entirely), and
- when targets are given, count items scored strictly above the target, items tied with it and
  items with a finite score: exactly what ``metrics.ranking_from_counts`` needs, so metrics equal
  those of the full score matrix (see tests/test_topk.py).

Order of the lists: score descending, ties by item column ascending -- the same as a stable sort of
the full masked score row, whatever the chunk size (tests/test_topk_exact.py). Slots beyond the
rankable items hold ``-inf`` (their column is 0 and means nothing).

Speed (bench/recommend.py, 1 M items, hidden 64, CPU): scoring is a [B, 64] x [64, chunk] matmul,
~0.13 GFLOP per user. On CPU the chunk is capped at 4,096 items (and 32 MB per [B, chunk] fp32 block):
a block that size is reused by the allocator instead of taking the page-fault path of a fresh
large allocation and stays in cache for the passes that read it (measured, one thread, 200 k items,
B 256: the matmul ran at 87 GFLOP/cpu-s with 2-8 k-item chunks vs 25 with the former 52 k-item
chunks); much smaller chunks pay Python overhead per chunk. Memory:
B x chunk floats per chunk (plus a few same-sized temporaries), at most ``budget_mb``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

Scorer = Callable[..., torch.Tensor]  # scorer(lo, hi, rows=None) -> [B or len(rows), hi-lo] float

# live B x chunk tensors per chunk: scores, a comparison mask, topk / sort scratch
_TEMPS = 5
# CPU: chunks of CPU_CHUNK items, fewer when a [B, chunk] fp32 block would pass CPU_BLOCK_BYTES
# (see the module docstring)
CPU_CHUNK = 4096
CPU_BLOCK_BYTES = 32 * 2**20
NEG_INF = float("-inf")
# columns per block for the candidate scan (chunks on CPU are multiples of it)
BLOCK = 64


def chunk_for_budget(batch: int, budget_mb: float, num_items: int, min_chunk: int = 256,
                     device: Optional[torch.device | str] = None) -> int:
    """Items per chunk so that ~_TEMPS float32 [batch, chunk] tensors fit ``budget_mb``; on CPU
    (``device`` None or cpu) also at most ``CPU_CHUNK`` items and ``CPU_BLOCK_BYTES`` per block."""
    per_col = max(1, batch) * 4 * _TEMPS
    chunk = int(budget_mb * 2**20 // per_col)
    if device is None or torch.device(device).type == "cpu":
        chunk = min(chunk, CPU_CHUNK, CPU_BLOCK_BYTES // (4 * max(1, batch)))
    chunk = max(min_chunk, chunk)
    if chunk >= num_items:
        return max(1, num_items)
    return max(1, chunk // BLOCK * BLOCK if chunk >= BLOCK else chunk)


@dataclass
class RankResult:
    values: torch.Tensor  # [B, k] top scores, descending (-inf where fewer than k items are rankable)
    indices: torch.Tensor  # [B, k] item columns (item index - 1); ties by column ascending
    greater: Optional[torch.Tensor] = None  # [B] items scored strictly above the target
    equal: Optional[torch.Tensor] = None  # [B] other items tied with the target
    n_finite: Optional[torch.Tensor] = None  # [B] items with a finite score
    target_masked: Optional[torch.Tensor] = None  # [B] the target's own score is -inf


def _seen_by_column(seen: torch.Tensor, num_items: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Seen (row, column) pairs (1-based items, 0 = pad) sorted by column, and per chunk the slice
    bounds: chunk j masks pairs ``bounds[j]:bounds[j+1]``."""
    rows, pos = (seen > 0).nonzero(as_tuple=True)
    cols = seen[rows, pos] - 1
    order = torch.argsort(cols)
    rows, cols = rows[order], cols[order]
    edges = torch.arange(0, num_items + chunk, chunk, device=cols.device)
    return rows, cols, torch.searchsorted(cols, edges).tolist()


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


def _order_ties(v: torch.Tensor, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of (values, columns) sorted by value descending, ties by column ascending."""
    i, p = torch.sort(i, dim=1)
    v = v.gather(1, p)
    v, p = torch.sort(v, dim=1, descending=True, stable=True)
    return v, i.gather(1, p)


def _chunk_top(sub: torch.Tensor, kk: int, floor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``kk`` of each row of ``sub`` under (value desc, column asc), as far as it matters
    above ``floor`` (the row's current K-th best: only entries strictly above it can enter)."""
    cv, ci = torch.topk(sub, kk, dim=1)
    # topk picks among entries tied with its kk-th value arbitrarily; that choice matters only when
    # the tied value can still enter (above the floor) and more entries tie than fit
    vk = cv[:, -1]
    live = (vk > floor).nonzero().squeeze(1)
    if len(live):
        over = (sub.index_select(0, live) >= vk[live].unsqueeze(1)).sum(1) > kk
        if bool(over.any()):
            bad = live[over]
            sv, si = torch.sort(sub.index_select(0, bad), dim=1, descending=True, stable=True)
            cv[bad], ci[bad] = sv[:, :kk], si[:, :kk]
    return _order_ties(cv, ci)


def _merge(top_v, top_i, rows, cv, ci, k):
    """Merge candidates (value desc, ties by column asc; all columns above the old ones) into the
    running top-k of ``rows`` (None = every row). Old entries come first and have smaller columns,
    so a stable sort keeps ties by column ascending."""
    old_v, old_i = (top_v, top_i) if rows is None else (top_v[rows], top_i[rows])
    mv, p = torch.sort(torch.cat([old_v, cv], 1), dim=1, descending=True, stable=True)
    mv, mi = mv[:, :k], torch.cat([old_i, ci], 1).gather(1, p[:, :k])
    if rows is None:
        return mv, mi
    top_v, top_i = top_v.clone(), top_i.clone()
    top_v[rows], top_i[rows] = mv, mi
    return top_v, top_i


def _block_candidates(s: torch.Tensor, floor: torch.Tensor, cap: int):
    """Entries of ``s`` [B, c] strictly above their row's ``floor``, found through the maxima of
    ``BLOCK``-column blocks (one cheap pass; only blocks whose maximum beats the floor are read
    again). Returns (rows, values [r, m], columns [r, m]) padded with -inf, (None, ..) when no entry
    qualifies, or None when more than ``cap`` blocks qualify (the caller uses topk instead).

    Why: over a random stream of N scores a row's running k-th best is beaten ~k(1 + ln(N/k))
    times in all, so after the first chunk almost every block is skipped."""
    B, c = s.shape
    blocks = s.reshape(B, c // BLOCK, BLOCK)  # a view for the (contiguous) scores of a linear layer
    q = blocks.amax(2) > floor.unsqueeze(1)
    rb = q.nonzero()
    if len(rb) == 0:
        return None, None, None
    if len(rb) * BLOCK > cap:
        return None
    vals = blocks[rb[:, 0], rb[:, 1]]  # [m, BLOCK]
    e = (vals > floor[rb[:, 0]].unsqueeze(1)).nonzero()  # row-major: by (row, block, offset)
    r = rb[e[:, 0], 0]
    col = rb[e[:, 0], 1] * BLOCK + e[:, 1]
    v = vals[e[:, 0], e[:, 1]]
    rows, counts = torch.unique_consecutive(r, return_counts=True)
    start = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(r), device=s.device) - torch.repeat_interleave(start, counts)
    which = torch.repeat_interleave(torch.arange(len(rows), device=s.device), counts)
    m = int(counts.max())
    cv = torch.full((len(rows), m), NEG_INF, device=s.device)
    ci = torch.zeros((len(rows), m), dtype=torch.long, device=s.device)
    cv[which, slot], ci[which, slot] = v, col
    # candidates are in column order; sort by value (stable) for the merge
    cv, p = torch.sort(cv, dim=1, descending=True, stable=True)
    return rows, cv, ci.gather(1, p)


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
    top_v = torch.full((batch, k), NEG_INF, device=device)
    top_i = torch.zeros((batch, k), dtype=torch.long, device=device)
    floor = torch.full((batch,), NEG_INF, device=device)  # each row's k-th best so far
    if seen is not None:
        s_rows, s_cols, s_bounds = _seen_by_column(seen.to(device), num_items, chunk)
    if allowed is not None:
        denied = ~allowed.to(device)
        # per chunk: does it deny anything (one pass here instead of a masked_fill on every chunk)
        any_denied = torch.nn.functional.pad(denied.long().cumsum(0), (1, 0))
        edges = torch.arange(0, num_items + chunk, chunk, device=device).clamp(max=num_items)
        any_denied = (any_denied[edges[1:]] > any_denied[edges[:-1]]).tolist()
    counting = target is not None
    if counting:
        greater = torch.zeros(batch, dtype=torch.long, device=device)
        equal = torch.zeros(batch, dtype=torch.long, device=device)
        n_finite = torch.zeros(batch, dtype=torch.long, device=device)
        # one chunk: the target's score is read from the very matrix that is counted (bit-identical
        # to the full-matrix path); several: from a call with the same chunk boundaries
        t = None if chunk >= num_items else target_scores(scorer, target, num_items, chunk)
        t_masked = torch.zeros(batch, dtype=torch.bool, device=device)
    for j, lo in enumerate(range(0, num_items, chunk)):
        hi = min(num_items, lo + chunk)
        s = scorer(lo, hi).float()
        if seen is not None and s_bounds[j + 1] > s_bounds[j]:
            a, b = s_bounds[j], s_bounds[j + 1]
            s[s_rows[a:b], s_cols[a:b] - lo] = NEG_INF
        if allowed is not None and any_denied[j]:
            s.masked_fill_(denied[lo:hi].unsqueeze(0), NEG_INF)
        if counting:
            in_chunk = (target >= lo) & (target < hi)
            col = (target - lo).clamp(0, hi - lo - 1).view(-1, 1)
            here = s.gather(1, col).squeeze(1)
            if t is None:
                t = here
            # the target's own (possibly masked) value decides whether it is masked
            t_masked |= in_chunk & ~torch.isfinite(here)
            tt = t.view(-1, 1)
            # counts over the whole chunk, minus the target's own column
            greater += (s > tt).sum(1) - (in_chunk & (here > t)).long()
            equal += (s == tt).sum(1) - (in_chunk & (here == t)).long()
            n_finite += torch.isfinite(s).sum(1)
        # only entries strictly above their row's current k-th best (``floor``) can enter
        if j > 0 and (hi - lo) % BLOCK == 0:
            cand = _block_candidates(s, floor, s.numel() // 4)
            if cand is not None:
                if cand[0] is None:
                    continue
                rows, cv, ci = cand
                top_v, top_i = _merge(top_v, top_i, rows, cv, ci + lo, k)
                floor = top_v[:, -1]
                continue
        cand = s.amax(1) > floor
        n = int(cand.sum())
        if n == 0:
            continue
        rows = None if n == batch else cand.nonzero().squeeze(1)
        sub = s if rows is None else s.index_select(0, rows)
        cv, ci = _chunk_top(sub, min(k, hi - lo), floor if rows is None else floor[rows])
        top_v, top_i = _merge(top_v, top_i, rows, cv, ci + lo, k)
        floor = top_v[:, -1]
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
        self.norm = None  # a cold-head hybrid's per-row normalisers (ItemLM.score_norm), one catalog pass per batch

    def __call__(self, lo: int, hi: int, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.hidden if rows is None else self.hidden[rows]
        norm = None
        if getattr(self.net, "mixes_cold", False) and not (lo == 0 and hi == self.net.vocab.num_items):
            if self.norm is None:
                self.norm = self.net.score_norm(self.hidden, hi - lo)
            norm = self.norm if rows is None else (self.norm[0][rows], self.norm[1][rows])
        return self.net.item_logits(h, lo, hi, norm=norm).float()


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
