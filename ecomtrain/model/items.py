"""Item representations for ``model.items: id | text | hybrid`` (one place for every task, eval and export).

- ``id``: item tokens of the backbone's vocabulary (``backbone.ItemLM`` alone).
- ``text``: item i's vector is ``adapter(standardise(table[i]))``: the frozen text table
  (``item_text.py``) standardised per dimension (mean/std over the catalog, fixed
  buffers), then a trainable linear map or 2-layer MLP into the hidden size. Inputs and
  output scores use the same vectors, so an item never seen in training still gets a
  finite, text-dependent score.
- ``hybrid``: ID embedding + projected text, summed, for input and output. Items with no
  training occurrence (``train_count == 0``: cold items, known from the training split
  alone) are always scored by their text part only; their ID rows only ever received
  "negative" gradient. ``model.item_text.id_dropout`` drops an item's ID part during
  training (per input occurrence and per output column), so text alone must rank items.
  ``model.item_text.cold_head`` instead gives cold items their own text-only scorer (trained
  beside the model on detached hidden states), mixed with the hybrid's as probabilities at
  evaluation (``backbone.ItemLM.item_logits``).

``ItemTower.vectors(lo, hi)`` projects only table rows ``lo+1 .. hi`` (columns lo..hi-1):
scoring a catalog in chunks never projects all items at once.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


@torch.no_grad()
def text_pca_rows(table: torch.Tensor, hidden: int, std: float, seed: int = 0) -> torch.Tensor:
    """``model.item_text.id_init: text``: [N, hidden] starting ID rows for items 1..N (table row 0 is padding).

    The catalog's text vectors, standardised per dimension, projected on their top ``hidden``
    principal components (variance order kept, so the main directions of the text dominate),
    then scaled to overall std ``std`` (the backbone's own init scale: training dynamics stay
    those of a random init, but items with similar text start close). When ``hidden`` exceeds
    the text dimension or the catalog's rank, the remaining columns are random at that scale."""
    x = table[1:].double()
    x = (x - x.mean(0)) / x.std(0).clamp(min=1e-6) if len(x) > 1 else x - x.mean(0)
    k = min(hidden, x.shape[1], max(len(x) - 1, 0))
    gen = torch.Generator().manual_seed(seed)
    out = torch.randn(len(x), hidden, generator=gen, dtype=torch.float64) * std
    if k > 0:
        # the top-k right singular vectors (exact SVD of a D x D Gram matrix: D is the text width, a few hundred)
        evals, evecs = torch.linalg.eigh(x.T @ x)
        top = evecs[:, torch.argsort(evals, descending=True)[:k]]
        proj = x @ top
        keep = proj.std().item()
        if keep > 0:
            out[:, :k] = proj * (std / keep)
    return out.float()


class ItemTower(nn.Module):
    def __init__(self, table: torch.Tensor, hidden: int, adapter: str = "linear", id_free: Optional[torch.Tensor] = None,
                 out_std: Optional[float] = None, cold_head: bool = False, cold_share: float = 0.0):
        """``out_std``: None keeps nn.Linear's init; a float scales the last layer so projected text starts at that std;
        0 starts the last layer at zero (hybrid ``adapter_init: zero``: the model starts as its ID part).
        ``cold_head`` (hybrid ``model.item_text.cold_head``): a second linear map of the text, the cold items' own
        scorer, with ``cold_share`` (a checkpointed buffer) the prior share of targets that are cold items."""
        super().__init__()
        table = table.float()
        body = table[1:]
        # the table is data, not weights: never in checkpoints (export writes it once, next to the model)
        self.register_buffer("table", table, persistent=False)
        self.register_buffer("mu", body.mean(0), persistent=True)
        self.register_buffer("sd", body.std(0).clamp(min=1e-4) if len(body) > 1 else torch.ones(table.shape[1]), persistent=True)
        d = table.shape[1]
        if adapter == "mlp":
            self.adapter = nn.Sequential(nn.Linear(d, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))
        else:
            self.adapter = nn.Linear(d, hidden)
        if out_std is not None:
            # inputs are standardised (unit variance per dim): N(0, out_std^2 / fan_in) weights give
            # outputs of std ~out_std, the scale of the backbone's ID embeddings at init
            last = self.adapter if isinstance(self.adapter, nn.Linear) else self.adapter[-1]
            with torch.no_grad():
                if out_std > 0:
                    last.weight.normal_(0.0, out_std / last.weight.shape[1] ** 0.5)
                else:
                    last.weight.zero_()
                last.bias.zero_()
        self.cold_adapter = None
        if cold_head:
            # its own RNG stream: adding the head leaves every other weight's init (and the run) as it was
            with torch.random.fork_rng(devices=[]):
                self.cold_adapter = nn.Linear(d, hidden)
            self.register_buffer("cold_share", torch.tensor(float(cold_share)), persistent=True)
        # items scored by text alone in hybrid mode (index 0 = padding)
        free = id_free if id_free is not None else torch.zeros(table.shape[0], dtype=torch.bool)
        self.register_buffer("id_free", free.bool(), persistent=False)

    @property
    def num_items(self) -> int:
        return self.table.shape[0] - 1

    def embed(self, items: torch.Tensor) -> torch.Tensor:
        """Text vectors of item indices (0 = padding -> zeros)."""
        x = (self.table[items] - self.mu) / self.sd
        return self.adapter(x) * (items > 0).unsqueeze(-1).to(x.dtype)

    def vectors(self, lo: int = 0, hi: Optional[int] = None) -> torch.Tensor:
        """[hi - lo, H] text vectors of columns lo..hi-1 (items lo+1..hi)."""
        hi = self.num_items if hi is None else hi
        return self.adapter((self.table[1 + lo: 1 + hi] - self.mu) / self.sd)

    def cold_vectors(self, cols: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The cold head's [len(cols), H] vectors of item columns ``cols`` (column j = item j+1; None: every item)."""
        rows = self.table[1:] if cols is None else self.table[cols + 1]
        return self.cold_adapter((rows - self.mu) / self.sd)
