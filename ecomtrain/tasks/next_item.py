"""Task ``next_item``: predict the next item of a user's history.

Samples (JSON in the shards, see ``data/build.py``) carry item indices
1..N (0 = padding). Training is causal over the whole history: the item at
position t predicts the item at t+1, so one sample trains every prefix.
Evaluation ranks the whole catalog at the last position.

The task knows nothing of tokens: the model maps item indices to its
vocabulary and returns ``[..., N]`` item logits (column j = item j+1).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _pad(rows: list[list[int]], value: int = 0) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    # one tensor from padded lists: ~4x faster than a torch.tensor per row (collate is on the step's path)
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=torch.long)


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


def pack_rows(inputs: list[list[int]], labels: list[list[int]], max_width: int) -> dict:
    """Pack variable-length (input, label) segments into few rows (``data.packing``).

    Each row holds several users' segments back to back; ``position_ids`` restart at 0 for
    every segment, which makes transformers build a block-diagonal causal mask (its
    packed-sequence detection, used when no 2-D attention mask is given), so no token attends
    across segments and rotary positions equal the unpacked ones. Rows are as few and as
    narrow as first-fit-decreasing allows: for R = ceil(total / max_width), R + 1, ... the
    narrowest width >= the longest segment that fits all segments in R rows is used, so the
    token efficiency (real tokens / slots) is typically > 95 %. Padding after the last
    segment of a row gets its own restarted positions (a separate segment, never attended
    by real tokens under the causal mask) and label 0 (no loss).
    """
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
    for b in sorted(bins, key=min):
        ri, rl, rp = [], [], []
        for i in sorted(b):
            ri += inputs[i]
            rl += labels[i]
            rp += range(lengths[i])
        pad = width - len(ri)
        rows_i.append(ri + [0] * pad)
        rows_l.append(rl + [0] * pad)
        rows_p.append(rp + list(range(pad)))
    items, labs, pos = (torch.tensor(x, dtype=torch.long) for x in (rows_i, rows_l, rows_p))
    return {"items": items, "labels": labs, "position_ids": pos}


class NextItemTask:
    name = "next_item"

    def __init__(self, num_items: int, max_history: int, label_smoothing: float = 0.0, packing: bool = False,
                 consistency_weight: float = 0.0):
        self.num_items = num_items
        self.consistency_weight = consistency_weight  # task.consistency_weight (see consistency.prefix_kl)
        self.last_consistency = None
        self.max_history = max_history
        self.label_smoothing = label_smoothing
        self.packing = packing
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
        inputs, labels = [], []
        for s in samples:
            seq = s["items"][-(L + 1):]
            inputs.append(seq[:-1])
            labels.append(seq[1:])
        if self.packing:
            return pack_rows(inputs, labels, self.max_history)
        return {"items": _pad(inputs), "labels": _pad(labels)}

    @staticmethod
    def batch_tokens(batch: dict) -> tuple[int, int, int]:
        """(samples, real input tokens, slots) of a training batch, for throughput figures."""
        items = batch["items"]
        real = items > 0
        pos = batch.get("position_ids")
        samples = int(((pos == 0) & real).sum()) if pos is not None else len(items)
        return samples, int(real.sum()), int(items.numel())

    def collate_eval(self, samples: list[dict]) -> dict:
        hist = [s["items"][-self.max_history:] for s in samples]
        return {
            "items": _pad(hist),
            "lengths": torch.tensor([max(1, len(h)) for h in hist]),
            "target": torch.tensor([s["target"] for s in samples], dtype=torch.long),
            "seen": _pad([s["items"] for s in samples]),
            # aligned with "seen" (indices into manifest["channels"]); used by consistency metrics
            "channels": _pad([s.get("channels") or [0] * len(s["items"]) for s in samples]),
        }

    # -- loss and scores (``net`` is a model.backbone.ItemLM)
    def loss(self, net, batch: dict) -> torch.Tensor:
        """Full-softmax cross-entropy over the catalog at every real position.

        The vocab-sized head runs only on non-padding positions.
        """
        labels = batch["labels"]
        mask = labels > 0
        pos = batch.get("position_ids")
        logits = net.item_logits(net.hidden(batch["items"], position_ids=pos)[mask])
        loss = F.cross_entropy(logits.float(), labels[mask] - 1, label_smoothing=self.label_smoothing)
        if self.consistency_weight > 0:
            from ..consistency import prefix_kl

            # packed rows: consecutive slots of different users are no pair (position_ids restart)
            self.last_consistency = prefix_kl(logits, mask, pos)
            loss = loss + self.consistency_weight * self.last_consistency
        return loss

    def scores(self, net, batch: dict) -> torch.Tensor:
        """Item scores [B, N] at each user's last history position."""
        return net(batch["items"], positions=batch["lengths"] - 1).float()

    @staticmethod
    def mask_seen(scores: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        """Set already-seen items to -inf (column j is item j+1; 0 is padding)."""
        scores = scores.clone()
        rows = torch.arange(len(seen), device=seen.device).unsqueeze(1).expand_as(seen)
        keep = seen > 0
        scores[rows[keep], seen[keep] - 1] = float("-inf")
        return scores
