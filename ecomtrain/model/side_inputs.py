"""Per-step side inputs: event type, channel and time gap of every history position (ID mode).

Samples carry, per history position, ``events`` and ``channels`` (indices into
``manifest['event_types']`` / ``manifest['channels']``, -1 = unknown) and ``ts``. With
``model.inputs.{event_types, channels, time_gaps}`` on, a learned embedding of each is added
to the item embedding of that position before the transformer (as BERT adds segment
embeddings). Index 0 of every table is padding / unknown (a zero row that never trains).

Time gaps are bucketed on a log scale of the seconds since the previous step:
bucket = 1 + min(11, floor(log2(1 + gap) / 2)), so 1 min -> 3, 1 h -> 6, 1 day -> 9,
1 week -> 10, a month or more -> 12; the first step of a window gets bucket 1 (gap 0).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

GAP_BUCKETS = 12
KEYS = {"event_types": "events", "channels": "channels", "time_gaps": "gaps"}


def gap_bucket(gap: float) -> int:
    return 1 + min(GAP_BUCKETS - 1, int(math.log2(1 + max(0.0, gap)) // 2))


def side_lists(sample: dict, lo: int, hi: int, flags: dict) -> dict[str, list[int]]:
    """Side-input index lists (0 = pad/unknown) for history positions lo..hi-1 of a sample."""
    out: dict[str, list[int]] = {}
    if flags.get("event_types"):
        out["events"] = [e + 1 if e is not None and e >= 0 else 0 for e in (sample.get("events") or [])[lo:hi]]
    if flags.get("channels"):
        out["channels"] = [c + 1 if c is not None and c >= 0 else 0 for c in (sample.get("channels") or [])[lo:hi]]
    if flags.get("time_gaps"):
        ts = sample.get("ts") or []
        out["gaps"] = [gap_bucket(ts[i] - ts[i - 1]) if i > 0 else 1 for i in range(max(0, lo), min(hi, len(ts)))]
    n = max(0, min(hi, len(sample["items"])) - max(0, lo))
    for k, v in out.items():  # a sample without the field: unknown at every position
        if len(v) != n:
            out[k] = (v + [0] * n)[:n]
    return out


def side_keys(flags: dict) -> list[str]:
    return [KEYS[k] for k in KEYS if flags.get(k)]


# the sample field each side input is computed from (side_lists)
SOURCES = {"event_types": "events", "channels": "channels", "time_gaps": "ts"}


def side_fields(flags: dict) -> set[str]:
    """The sample fields ``side_lists`` reads under ``flags``."""
    return {SOURCES[k] for k in SOURCES if flags.get(k)}


class SideInputs(nn.Module):
    def __init__(self, hidden_size: int, num_events: int, num_channels: int, flags: dict, init_std: float = 0.02):
        super().__init__()
        self.keys = side_keys(flags)
        sizes = {"events": num_events + 1, "channels": num_channels + 1, "gaps": GAP_BUCKETS + 1}
        self.tables = nn.ModuleDict({k: nn.Embedding(sizes[k], hidden_size, padding_idx=0) for k in self.keys})
        for emb in self.tables.values():
            nn.init.normal_(emb.weight, std=init_std)
            with torch.no_grad():
                emb.weight[0].zero_()

    def forward(self, side: dict) -> Optional[torch.Tensor]:
        out = None
        for k, emb in self.tables.items():
            if k in side:
                e = emb(side[k])
                out = e if out is None else out + e
        return out
