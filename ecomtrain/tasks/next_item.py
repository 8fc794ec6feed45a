"""Task ``next_item``: predict the next item of a user's history.

Samples (JSON in the shards, see ``data/build.py``) carry item indices
1..N (0 = padding). Training is causal over the whole history: the item at
position t predicts the item at t+1, so one sample trains every prefix.
Evaluation ranks the whole catalog at the last position.

The task knows nothing of tokens: the model maps item indices to its
vocabulary and returns ``[..., N]`` item logits (column j = item j+1).
"""

from __future__ import annotations

import itertools
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..model.side_inputs import side_fields
from . import register_task
from .base import Task, TaskContext
from .common import side_batch


def _pad(rows: list[list[int]], value: int = 0) -> torch.Tensor:
    """Right-padded [len(rows), longest] long tensor. One flat array scattered through a length
    mask: 40 us for 64 rows of ~20 items, against 200 us for a tensor built from padded lists
    (and ~4x more for a tensor per row); collate runs once per training step."""
    lens = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    width = max(1, int(lens.max()))
    flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(lens.sum()))
    out = np.full((len(rows), width), value, dtype=np.int64)
    out[np.arange(width) < lens[:, None]] = flat
    return torch.from_numpy(out)


def _first_fit(lengths: list[int], order: list[int], width: int, rows: int) -> Optional[list[list[int]]]:
    """First-fit decreasing of segments into ``rows`` rows of ``width`` slots (None if they do not fit)."""
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = lengths[i]
        for j, f in enumerate(free):
            if n <= f:
                bins[j].append(i)
                free[j] -= n
                break
        else:
            if len(bins) == rows:
                return None
            bins.append([i])
            free.append(width - n)
    return bins


def pack_rows(inputs: list[list[int]], labels: list[list[int]], max_width: int, extras: Optional[dict] = None) -> dict:
    """Pack variable-length (input, label) segments into few rows (``data.packing``).

    Each row holds several users' segments back to back; ``position_ids`` restart at 0 for
    every segment, which makes transformers build a block-diagonal causal mask (its
    packed-sequence detection, used when no 2-D attention mask is given), so no token attends
    across segments and rotary positions equal the unpacked ones. Rows are as few and as
    narrow as first-fit-decreasing allows: for R = ceil(total / max_width), R + 1, ... the
    narrowest width >= the longest segment that fits all segments in R rows is used, so the
    token efficiency (real tokens / slots) is typically > 95 %. Padding after the last
    segment of a row gets its own restarted positions (a separate segment, never attended
    by real tokens under the causal mask) and label 0 (no loss). ``extras``: per-position lists
    aligned with ``inputs`` (side inputs), packed the same way into ``out['side']``.
    """
    extras = extras or {}
    lengths = [len(x) for x in inputs]
    total, longest = sum(lengths), max(1, max(lengths))
    order = sorted(range(len(inputs)), key=lambda i: (-lengths[i], i))
    rows = max(1, -(-total // max(max_width, longest)))
    bins = None
    while bins is None:
        for width in range(max(longest, -(-total // rows)), max(max_width, longest) + 1):
            bins = _first_fit(lengths, order, width, rows)
            if bins is not None:
                break
        else:
            rows += 1
    width = max(sum(lengths[i] for i in b) for b in bins)
    rows_i, rows_l, rows_p = [], [], []
    rows_x: dict[str, list] = {k: [] for k in extras}
    for b in sorted(bins, key=min):
        ri, rl, rp = [], [], []
        rx: dict[str, list] = {k: [] for k in extras}
        for i in sorted(b):
            ri += inputs[i]
            rl += labels[i]
            rp += range(lengths[i])
            for k in extras:
                rx[k] += extras[k][i]
        pad = width - len(ri)
        rows_i.append(ri + [0] * pad)
        rows_l.append(rl + [0] * pad)
        rows_p.append(rp + list(range(pad)))
        for k in extras:
            rows_x[k].append(rx[k] + [0] * pad)
    items, labs, pos = (torch.tensor(x, dtype=torch.long) for x in (rows_i, rows_l, rows_p))
    out = {"items": items, "labels": labs, "position_ids": pos}
    if extras:
        out["side"] = {k: torch.tensor(v, dtype=torch.long) for k, v in rows_x.items()}
    return out


# model.item_text.cold_head: the weight of its loss (see NextItemTask.loss; any value leaves its Adam updates the same)
COLD_LOSS_SCALE = 0.01


def smoothed_cross_entropy(logits: torch.Tensor, target: torch.Tensor, eps: float) -> torch.Tensor:
    """Mean cross-entropy with label smoothing ``eps`` spread over the columns that can be predicted.

    text/hybrid training sets the logits of items with no training occurrence to -inf (ItemLM._unseen_out);
    torch's ``label_smoothing`` would put mass on them and give an infinite loss at step 0. Here those columns
    leave the smoothing term; with no -inf column this is exactly ``F.cross_entropy(..., label_smoothing=eps)``."""
    if eps <= 0:
        return F.cross_entropy(logits, target)
    off = torch.isneginf(logits)
    if not bool(off.any()):
        return F.cross_entropy(logits, target, label_smoothing=eps)
    lp = logits.log_softmax(-1)
    nll = -lp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    smooth = -lp.masked_fill(off, 0.0).sum(-1) / (~off).sum(-1).clamp(min=1)
    return ((1 - eps) * nll + eps * smooth).mean()


def history_columns(items: torch.Tensor, pos: Optional[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """[M, K] item columns (item - 1; -1 = none) of the history of each of the M labelled positions ``mask`` of
    right-padded or packed rows ``items`` ([R, W]; ``pos``: position_ids, restarting at 0 for each packed segment;
    None: every row is one segment from column 0). The history of position t is its segment's inputs 0..t."""
    rows, cols = mask.nonzero(as_tuple=True)
    p = pos[rows, cols] if pos is not None else cols
    back = torch.arange(int(p.max()) + 1 if len(p) else 1, device=items.device)
    valid = back.unsqueeze(0) <= p.unsqueeze(1)
    return items[rows.unsqueeze(1), (cols.unsqueeze(1) - back).clamp(min=0)] * valid - 1


def drop_history(logits: torch.Tensor, target: torch.Tensor, hist: torch.Tensor) -> torch.Tensor:
    """``logits`` ([M, N]) with the ``hist`` columns ([M, K], -1 = none) at -inf, except each row's ``target``
    column (a label that repeats an earlier item stays in the softmax). One out-of-place copy, no [M, N] mask."""
    t = target.unsqueeze(1)
    keep = logits.gather(1, t)
    return logits.scatter(1, torch.where(hist < 0, t, hist), float("-inf")).scatter(1, t, keep)


@register_task("next_item")
class NextItemTask(Task):
    """Full-catalog next-item ranking; metrics.json keys are the contract's (test/ndcg@10, ...)."""

    def __init__(self, cfg=None, ctx: Optional[TaskContext] = None, *, num_items: Optional[int] = None, max_history: Optional[int] = None,
                 label_smoothing: Optional[float] = None, packing: Optional[bool] = None, consistency_weight: Optional[float] = None):
        if isinstance(cfg, int):  # NextItemTask(num_items, max_history) -- the pre-registry form
            num_items, cfg = cfg, None
            if isinstance(ctx, int):
                max_history, ctx = ctx, None
        if ctx is None:  # direct construction (tests, benches): NextItemTask(num_items=..., max_history=...)
            ctx = TaskContext(num_items=num_items, max_history=max_history, manifest={}, item_counts=[0] * num_items)
        super().__init__(cfg, ctx)
        self.label_smoothing = label_smoothing if label_smoothing is not None else float(getattr(cfg, "label_smoothing", 0.0))
        self.exclude_seen = bool(getattr(cfg, "exclude_seen", False))
        self.packing = packing if packing is not None else ctx.packing
        self.flags = dict(ctx.inputs)
        # task.consistency_weight (see consistency.prefix_kl)
        self.consistency_weight = consistency_weight if consistency_weight is not None else float(getattr(cfg, "consistency_weight", 0.0))
        self.last_consistency = None
        self.last_cold = None  # the cold head's unscaled loss (model.item_text.cold_head)
        # a harmless row for padding eval batches (its weight is 0)
        self.pad_sample = {"items": [1], "target": 1}

    @classmethod
    def monitor(cls, ks) -> str:
        """Validation metric that picks the best checkpoint (see ``tasks.monitor``)."""
        from . import monitor

        return monitor(cls.name, ks)

    # -- tensors
    def collate_train(self, samples: list[dict]) -> dict:
        L = self.max_history
        inputs, labels, bounds = [], [], []
        for s in samples:
            lo = max(0, len(s["items"]) - (L + 1))
            seq = s["items"][lo:]
            inputs.append(seq[:-1])
            labels.append(seq[1:])
            bounds.append((lo, len(s["items"]) - 1))
        side = side_batch(samples, bounds, self.flags, _pad)
        if self.packing:
            extras = {k: [v[: len(x)] for v, x in zip(t.tolist(), inputs)] for k, t in side.items()} if side else None
            return pack_rows(inputs, labels, self.max_history, extras)
        out = {"items": _pad(inputs), "labels": _pad(labels)}
        if side:
            out["side"] = side
        return out

    def train_fields(self) -> set[str]:
        return {"items", *side_fields(self.flags)}

    def collate_eval(self, samples: list[dict]) -> dict:
        n = [len(s["items"]) for s in samples]
        hist = [s["items"][-self.max_history:] for s in samples]
        out = {
            "items": _pad(hist),
            "lengths": torch.tensor([max(1, len(h)) for h in hist]),
            "target": torch.tensor([s["target"] for s in samples], dtype=torch.long),
            "seen": _pad([s["items"] for s in samples]),
            # aligned with "seen" (indices into manifest["channels"]); used by consistency metrics
            "channels": _pad([s.get("channels") or [0] * len(s["items"]) for s in samples]),
            # aligned with "seen" too: consecutive-day consistency on temporal splits
            "ts": _pad([s.get("ts") or [0] * len(s["items"]) for s in samples]),
            "target_ts": torch.tensor([int(s.get("target_ts") or 0) for s in samples], dtype=torch.long),
        }
        side = side_batch(samples, [(max(0, k - self.max_history), k) for k in n], self.flags, _pad)
        if side:
            out["side"] = side
        return out

    # -- loss and scores (``net`` is a model.backbone.ItemLM)
    def loss(self, net, head=None, batch: Optional[dict] = None) -> torch.Tensor:
        """Full-softmax cross-entropy over the catalog at every real position.

        The vocab-sized head runs only on non-padding positions.
        """
        if batch is None:  # loss(net, batch): the pre-registry call form
            head, batch = None, head
        labels = batch["labels"]
        mask = labels > 0
        pos = batch.get("position_ids")
        h = net.hidden(batch["items"], position_ids=pos, side=batch.get("side"))[mask]
        logits = net.item_logits(h)
        target = labels[mask] - 1
        ce_logits = logits.float()
        if self.exclude_seen:  # task.exclude_seen: history items leave the softmax (never the label itself)
            ce_logits = drop_history(ce_logits, target, history_columns(batch["items"], pos, mask))
        loss = smoothed_cross_entropy(ce_logits, target, self.label_smoothing)
        if getattr(net, "mixes_cold", False):
            # the cold head learns on detached hidden states (ItemLM.cold_loss). Its loss enters scaled by COLD_LOSS_SCALE:
            # Adam's step does not depend on a gradient's scale, and so the head's gradient barely adds to the norm
            # that gradient clipping computes over all parameters (the model's own updates stay as without the head)
            self.last_cold = net.cold_loss(h, target)
            loss = loss + COLD_LOSS_SCALE * self.last_cold
        if self.consistency_weight > 0:
            from ..consistency import prefix_kl

            # packed rows: consecutive slots of different users are no pair (position_ids restart)
            self.last_consistency = prefix_kl(logits, mask, pos)
            loss = loss + self.consistency_weight * self.last_consistency
        return loss

    def train_logs(self) -> dict:
        out = {}
        if self.consistency_weight > 0 and self.last_consistency is not None:
            out["train/consistency_kl"] = self.last_consistency.detach()
        if self.last_cold is not None:
            out["train/cold_head_loss"] = self.last_cold.detach()
        return out

    def scores(self, net, batch: dict) -> torch.Tensor:
        """Item scores [B, N] at each user's last history position."""
        return net(batch["items"], positions=batch["lengths"] - 1, side=batch.get("side")).float()

    @staticmethod
    def mask_seen(scores: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        """Set already-seen items to -inf (column j is item j+1; 0 is padding)."""
        scores = scores.clone()
        rows = torch.arange(len(seen), device=seen.device).unsqueeze(1).expand_as(seen)
        keep = seen > 0
        scores[rows[keep], seen[keep] - 1] = float("-inf")
        return scores

    # -- metrics
    def evaluator(self, stage: str) -> nn.Module:
        return NextItemEvaluator(self, stage)

    @classmethod
    def val_metrics(cls, ks: Sequence[int]) -> list[str]:
        return [f"val/{m}@{k}" for k in ks for m in ("hr", "ndcg")] + ["val/mrr", "val/auc"]

    @classmethod
    def monitor(cls, ks: Sequence[int]) -> tuple[str, str]:
        """NDCG@10 (the field's headline cut-off) when 10 is among eval.ks, else NDCG at the largest K."""
        return f"val/ndcg@{10 if 10 in ks else max(ks)}", "max"


class NextItemEvaluator(nn.Module):
    """Full-catalog ranking through serve/evaluation.EvalSuite (chunked, bounded memory): the primary
    protocol, the other seen-items protocol, the popularity baseline, beyond-accuracy and consistency."""

    def __init__(self, task: NextItemTask, stage: str):
        super().__init__()
        from ..serve.evaluation import EvalSuite

        ctx = task.ctx
        self.task, self.stage = task, stage
        counts = torch.tensor(ctx.item_counts, dtype=torch.float32)
        cat = ctx.catalog.get("category")
        self.suite = EvalSuite(ctx.eval_cfg, ctx.num_items, ctx.max_history, counts, stage,
                               torch.tensor(cat, dtype=torch.long) if cat is not None else None,
                               ctx.manifest.get("channels") or [], ctx.catalog.get("titles"),
                               cold=torch.tensor(ctx.catalog["cold"], dtype=torch.bool) if ctx.catalog.get("cold") is not None else None,
                               days=(ctx.manifest.get("split") or {}).get("method") == "temporal")
        self.register_buffer("popularity", counts, persistent=False)

    @torch.no_grad()
    def update(self, net, head, batch: dict) -> None:
        self.suite.update(net, batch, self.popularity)

    def compute(self) -> dict:
        return self.suite.compute(self.stage)

    def log_extra(self, loggers, values: dict, step: int) -> None:
        from ..serve.evaluation import log_to_wandb

        if self.task.ctx.eval_cfg.sample_users:
            log_to_wandb(loggers, self.stage, self.suite, values, step)

    def reset(self) -> None:
        self.suite.reset()
