"""Fine-tuning methods (peft): which parameters of the backbone train.

``full`` trains everything. Adapter methods (LoRA, AdaLoRA, DoRA, QLoRA) are
wired through peft; the item-token embeddings and output rows always train.
"""

from __future__ import annotations

from torch import nn

from ..config import Recipe


def apply_finetune_method(lm: nn.Module, cfg: Recipe, vocab) -> nn.Module:
    method = cfg.finetune.method
    if method == "full":
        return lm
    raise NotImplementedError(f"finetune.method '{method}' is not available yet in this build (use 'full')")
