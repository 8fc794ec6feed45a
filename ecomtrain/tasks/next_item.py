"""Task ``next_item``: predict the next item of a user's history.

Samples (JSON in the shards, see ``data/build.py``) carry item indices
1..N (0 = padding). Training is causal over the whole history: the item at
position t predicts the item at t+1, so one sample trains every prefix.
Evaluation ranks the whole catalog at the last position.

The task knows nothing of tokens: the model maps item indices to its
vocabulary and returns ``[..., N]`` item logits (column j = item j+1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _pad(rows: list[list[int]], value: int = 0) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


class NextItemTask:
    name = "next_item"

    def __init__(self, num_items: int, max_history: int, label_smoothing: float = 0.0):
        self.num_items = num_items
        self.max_history = max_history
        self.label_smoothing = label_smoothing
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
        return {"items": _pad(inputs), "labels": _pad(labels)}

    def collate_eval(self, samples: list[dict]) -> dict:
        hist = [s["items"][-self.max_history:] for s in samples]
        return {
            "items": _pad(hist),
            "lengths": torch.tensor([max(1, len(h)) for h in hist]),
            "target": torch.tensor([s["target"] for s in samples], dtype=torch.long),
            "seen": _pad([s["items"] for s in samples]),
        }

    # -- loss and scores (``net`` is a model.backbone.ItemLM)
    def loss(self, net, batch: dict) -> torch.Tensor:
        """Full-softmax cross-entropy over the catalog at every real position.

        The vocab-sized head runs only on non-padding positions.
        """
        labels = batch["labels"]
        mask = labels > 0
        logits = net.item_logits(net.hidden(batch["items"])[mask])
        return F.cross_entropy(logits.float(), labels[mask] - 1, label_smoothing=self.label_smoothing)

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
