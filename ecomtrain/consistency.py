"""Consistency of recommendation lists across channels, time and runs (docs/recommend.md).

For two top-K lists A and B of one user (item columns, best first):

    Jaccard@K = |A ∩ B| / |A ∪ B|                                   in [0, 1]
    RBO@K     = (1-p)/(1-p^K) * sum_{d=1..K} p^(d-1) |A[:d] ∩ B[:d]| / d,  p = 0.9     in [0, 1]
                (rank-biased overlap truncated at depth K and normalised so identical lists give 1;
                 agreement at the top weighs most)

- channels: for users whose history spans two or more channels, the list from each channel's
  sub-history (items of that channel only, in order) vs the list of every other channel they used and
  vs the full history: ``consistency/channel/app~web/jaccard@10``, ``.../app~all/...``;
- time: the list at the history end vs the list after the next (held-out) event is appended, the new
  item excluded from both: ``consistency/time/jaccard@10``;
- days (temporal splits): the list from the user's events up to the end of day d vs up to the end of
  day d+1, where d+1 is the (UTC) day of the user's latest known event (the held-out one), the items
  of both days excluded from both lists: ``consistency/day/jaccard@10`` (users with an event before
  day d+1 only);
- runs: two checkpoints (or seeds) on the same users: ``consistency/runs/jaccard@10`` (churn = 1 - it).

All lists exclude the user's full history (what a shop would show). Sums and counts are torchmetrics
states (all-reduced by sum), so the figures are exact across ranks.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torchmetrics import Metric

RBO_P = 0.9


def jaccard(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row |A∩B| / |A∪B| of two [B, K] index lists (entries < 0 are empty slots)."""
    eq = (a.unsqueeze(2) == b.unsqueeze(1)) & (a.unsqueeze(2) >= 0)
    inter = eq.any(2).sum(1).to(torch.float64)
    union = (a >= 0).sum(1) + (b >= 0).sum(1) - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))


def rbo(a: torch.Tensor, b: torch.Tensor, p: float = RBO_P) -> torch.Tensor:
    """Per row truncated, normalised rank-biased overlap of two [B, K] index lists."""
    k = a.shape[1]
    eq = ((a.unsqueeze(2) == b.unsqueeze(1)) & (a.unsqueeze(2) >= 0)).to(torch.float64)
    overlap = eq.cumsum(1).cumsum(2).diagonal(dim1=1, dim2=2)  # |A[:d] ∩ B[:d]|, d = 1..K
    d = torch.arange(1, k + 1, dtype=torch.float64, device=a.device)
    w = p ** (d - 1)
    return (1 - p) / (1 - p**k) * (w * overlap / d).sum(1)


def _valid(res) -> torch.Tensor:
    """Top-K item columns with empty (-inf) slots set to -1."""
    return torch.where(torch.isfinite(res.values), res.indices, torch.full_like(res.indices, -1))


class ConsistencyMetric(Metric):
    """Mean Jaccard@K and RBO@K per named comparison (``add(name, A, B, weight)``)."""

    full_state_update = False

    def __init__(self, names: Sequence[str], k: int = 10, **kw):
        super().__init__(**kw)
        self.k, self.names = k, list(names)
        self.add_state("jac", default=torch.zeros(len(self.names), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("rbo", default=torch.zeros(len(self.names), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", default=torch.zeros(len(self.names), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, name: str, a: torch.Tensor, b: torch.Tensor, weight: Optional[torch.Tensor] = None) -> None:
        j = self.names.index(name)
        w = torch.ones(len(a), dtype=torch.float64, device=a.device) if weight is None else weight.to(torch.float64)
        a, b = a[:, : self.k], b[:, : self.k]
        self.jac[j] = self.jac[j] + (jaccard(a, b) * w).sum()
        self.rbo[j] = self.rbo[j] + (rbo(a, b) * w).sum()
        self.n[j] = self.n[j] + w.sum()

    def compute(self) -> dict[str, torch.Tensor]:
        out = {}
        for j, name in enumerate(self.names):
            if self.n[j] > 0:
                out[f"{name}/jaccard@{self.k}"] = (self.jac[j] / self.n[j]).float()
                out[f"{name}/rbo@{self.k}"] = (self.rbo[j] / self.n[j]).float()
                out[f"{name}/users"] = self.n[j].float()
        return out


def comparison_names(channels: Sequence[str], days: bool = False) -> list[str]:
    names = ["consistency/time"] + (["consistency/day"] if days else [])
    for i, a in enumerate(channels):
        names.append(f"consistency/channel/{a}~all")
        for b in channels[i + 1:]:
            names.append(f"consistency/channel/{a}~{b}")
    return names


def _pad(rows: list[list[int]]) -> torch.Tensor:
    width = max(1, max((len(r) for r in rows), default=1))
    out = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


DAY = 86400
# timestamps are epoch seconds or milliseconds (whatever the source held, data/importers._ts_expr):
# milliseconds exceed 1e11 for any date after 1973-03; seconds stay below it until the year 5138
_MS_ABOVE = 10**11


def day_of(ts: torch.Tensor) -> torch.Tensor:
    """UTC day number of epoch-second (or -millisecond) timestamps."""
    return torch.where(ts > _MS_ABOVE, torch.div(ts, DAY * 1000, rounding_mode="floor"), torch.div(ts, DAY, rounding_mode="floor"))


def day_histories(seen: torch.Tensor, ts: torch.Tensor, target_ts: torch.Tensor) -> tuple[torch.Tensor, list[list[int]]]:
    """For each row: the history events on (UTC) days before the target's day, i.e. what the user
    had done by the end of day d when the target falls on day d+1. Returns (rows that have such an
    event, their day-d histories)."""
    before = (seen > 0) & (day_of(ts) < day_of(target_ts).unsqueeze(1))
    rows = before.any(1).nonzero().squeeze(1)
    hist = [[i for i, b in zip(s, m) if b] for s, m in zip(seen[rows].tolist(), before[rows].tolist())]
    return rows, hist


def update_from_batch(metric: ConsistencyMetric, top_lists, batch: dict, channels: Sequence[str], max_history: int,
                      weight: Optional[torch.Tensor] = None, days: bool = False) -> None:
    """Channel, time and (``days``: temporal splits, batches with ``ts``/``target_ts``) day consistency
    for an eval batch.

    ``top_lists(items [B,T], seen [B,S]) -> RankResult`` ranks the catalog for right-padded histories
    excluding ``seen`` (the caller binds the model and the chunked ranking routine).
    """
    seen, target = batch["seen"], batch["target"]  # full history (1-based), next item (1-based)
    dev = seen.device
    w = torch.ones(len(seen), device=dev) if weight is None else weight
    hist = [[i for i in row if i > 0] for row in seen.tolist()]
    excl = torch.cat([seen, target.view(-1, 1)], 1)
    # time: history end vs after the next event, the new item excluded from both lists
    now = top_lists(_pad([h[-max_history:] for h in hist]).to(dev), excl)
    nxt = top_lists(_pad([(h + [t])[-max_history:] for h, t in zip(hist, target.tolist())]).to(dev), excl)
    metric.update("consistency/time", _valid(now), _valid(nxt), w)
    if days and "ts" in batch and "target_ts" in batch:
        # end of day d+1 = the history plus the held-out event (``nxt``); end of day d = the events
        # before the held-out event's day. Users without an earlier-day event have no day-d list.
        rows, prev = day_histories(seen, batch["ts"], batch["target_ts"])
        if len(rows):
            rows = rows.to(dev)
            before = top_lists(_pad([h[-max_history:] for h in prev]).to(dev), excl[rows])
            metric.update("consistency/day", _valid(before), _valid(nxt)[rows], w[rows])
    if "channels" not in batch or len(channels) < 2:
        return
    ch = batch["channels"].tolist()
    used = [sorted({c for c, i in zip(crow, row) if i > 0}) for crow, row in zip(ch, seen.tolist())]
    multi = [j for j, u in enumerate(used) if len(u) >= 2 and float(w[j]) > 0]
    if not multi:
        return
    rows = torch.tensor(multi, device=dev)
    full = top_lists(_pad([hist[j][-max_history:] for j in multi]).to(dev), seen[rows])
    per: dict[int, torch.Tensor] = {}
    for c in range(len(channels)):
        sub = [[i for cc, i in zip(ch[j], seen[j].tolist()) if i > 0 and cc == c][-max_history:] for j in multi]
        res = _valid(top_lists(_pad(sub).to(dev), seen[rows]))
        has = torch.tensor([len(s) > 0 for s in sub], device=dev)
        per[c] = (res, has)
        metric.update(f"consistency/channel/{channels[c]}~all", res, _valid(full), w[rows] * has)
    for a in range(len(channels)):
        for b in range(a + 1, len(channels)):
            (ra, ha), (rb, hb) = per[a], per[b]
            metric.update(f"consistency/channel/{channels[a]}~{channels[b]}", ra, rb, w[rows] * (ha & hb))


def prefix_kl(logits: torch.Tensor, mask: torch.Tensor, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Consistency regulariser: mean symmetric KL between the item distributions predicted after
    consecutive prefixes (positions t and t+1) of the same history.

    ``logits`` are the rows of ``mask.nonzero()`` in row-major order (what ``logits[mask]`` gives),
    so no [B, T, N] tensor beyond the one the loss already holds is built. 0 when no pair exists.
    """
    pos = mask.nonzero()
    if len(pos) < 2:
        return logits.sum() * 0.0
    pair = (pos[1:, 0] == pos[:-1, 0]) & (pos[1:, 1] == pos[:-1, 1] + 1)
    if position_ids is not None:  # packed rows: a restart of positions starts another user's segment
        p = position_ids[mask]
        pair &= p[1:] == p[:-1] + 1
    if not bool(pair.any()):
        return logits.sum() * 0.0
    lp = torch.log_softmax(logits.float(), -1)
    a, b = lp[:-1][pair], lp[1:][pair]
    return 0.5 * ((a.exp() * (a - b)).sum(-1) + (b.exp() * (b - a)).sum(-1)).mean()


def run_agreement(rec_a, rec_b, histories: list[list[int]], k: int = 10, batch_size: int = 256) -> dict[str, float]:
    """Across runs: mean Jaccard@K / RBO@K of two models' top-K (seen excluded) for the same users,
    and churn@K = 1 - Jaccard@K. ``rec_a``/``rec_b`` are ``serve.Recommender``s over one catalog."""
    if rec_a.item_ids != rec_b.item_ids:
        raise ValueError("the two models rank different catalogs; run agreement needs the same items")
    jac = rb = 0.0
    n = 0
    for (va, ia), (vb, ib) in zip(rec_a.rank_indices(histories, k, True, None, batch_size),
                                  rec_b.rank_indices(histories, k, True, None, batch_size)):
        a = torch.where(torch.isfinite(va), ia, torch.full_like(ia, -1))
        b = torch.where(torch.isfinite(vb), ib, torch.full_like(ib, -1))
        jac += float(jaccard(a, b).sum())
        rb += float(rbo(a, b).sum())
        n += len(a)
    return {f"jaccard@{k}": jac / max(1, n), f"rbo@{k}": rb / max(1, n), f"churn@{k}": 1 - jac / max(1, n), "users": float(n)}
