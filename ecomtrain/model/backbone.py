"""Backbone: a Hugging Face causal LM whose vocabulary holds the items.

Two ways in (``model.backbone`` in the recipe):
- ``pretrained: PATH`` loads a local ``save_pretrained`` folder (never the
  hub at run time) and appends N item tokens ``<item_1> .. <item_N>`` to its
  vocabulary; item i is token ``base_vocab + i - 1``;
- otherwise a Qwen2 or Llama config of any size is built with random init and
  vocabulary ``[<pad>] + items``: item i is token i.

``ItemLM`` feeds item indices through the LM and returns item logits only,
computing the (vocab-sized) head on the positions that are needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..config import ModelConfig


@dataclass
class ItemVocab:
    num_items: int
    offset: int  # token id of item 1
    pad_token_id: int
    tokens: bool = True  # False for model.items=text: no item tokens in the vocabulary

    def to_tokens(self, items: torch.Tensor) -> torch.Tensor:
        return torch.where(items > 0, items + (self.offset - 1), torch.full_like(items, self.pad_token_id))

    def item_token(self, i: int) -> str:
        return f"<item_{i}>"


def build_causal_lm(cfg: ModelConfig, num_items: int, item_texts: Optional[list[str]] = None, text_max_length: int = 64):
    """Return (hf_model, ItemVocab, tokenizer or None).

    ``model.items=text`` adds no item tokens (items enter as text vectors). A pretrained
    backbone in id/hybrid mode with ``item_texts`` starts each item token at the mean of its
    own input embeddings of the item's text tokens (``backbone.init_items_from_text``).
    """
    from transformers import AutoModelForCausalLM

    bb = cfg.backbone
    with_tokens = cfg.items != "text"
    if bb.pretrained:
        from transformers import AutoTokenizer

        from .item_text import pad_ready_tokenizer, resolve_model

        folder = resolve_model(bb.pretrained)
        try:
            lm = AutoModelForCausalLM.from_pretrained(str(folder), attention_dropout=cfg.attention_dropout)
            tok = pad_ready_tokenizer(AutoTokenizer.from_pretrained(str(folder)), bb.pretrained)
        except (OSError, ValueError) as exc:
            from ..config import RecipeError

            raise RecipeError(f"model.backbone.pretrained: '{bb.pretrained}' could not be loaded as a causal LM + tokenizer: {exc}") from None
        if not with_tokens:
            return lm, ItemVocab(num_items, 0, tok.pad_token_id, tokens=False), tok
        base_rows = lm.get_input_embeddings().weight.shape[0]
        tok.add_tokens([f"<item_{i}>" for i in range(1, num_items + 1)])
        base = tok.convert_tokens_to_ids("<item_1>")
        if tok.convert_tokens_to_ids(f"<item_{num_items}>") != base + num_items - 1:
            raise ValueError(f"{bb.pretrained}: item tokens did not get contiguous ids in the tokenizer")
        # real checkpoints often pad the embedding past len(tokenizer) (Qwen2: 151,936 rows for
        # 151,665 tokens); never shrink it, grow it to hold the last item token
        lm.resize_token_embeddings(max(len(tok), base_rows))
        if item_texts is not None and bb.init_items_from_text:
            init_item_rows_from_text(lm, tok, base, item_texts, min(base, base_rows), text_max_length)
        return lm, ItemVocab(num_items, base, tok.pad_token_id), tok

    if bb.arch == "qwen2":
        from transformers import Qwen2Config as Cfg
    else:
        from transformers import LlamaConfig as Cfg
    conf = Cfg(
        vocab_size=num_items + 1 if with_tokens else 1,
        hidden_size=bb.hidden_size,
        intermediate_size=bb.intermediate_size,
        num_hidden_layers=bb.num_layers,
        num_attention_heads=bb.num_heads,
        num_key_value_heads=bb.num_kv_heads or bb.num_heads,
        max_position_embeddings=bb.max_position_embeddings,
        rope_theta=bb.rope_theta,
        attention_dropout=cfg.attention_dropout,
        tie_word_embeddings=bb.tie_embeddings,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    lm = AutoModelForCausalLM.from_config(conf)
    return lm, ItemVocab(num_items, 1, 0, tokens=with_tokens), None


@torch.no_grad()
def init_item_rows_from_text(lm, tok, first_row: int, texts: list[str], base_rows: int, max_length: int, chunk: int = 4096) -> None:
    """Item token i := mean of the base input embeddings of its text's tokens (chunked, EmbeddingBag)."""
    emb = lm.get_input_embeddings().weight
    out_emb = lm.get_output_embeddings().weight if lm.get_output_embeddings() is not None else None
    for lo in range(0, len(texts), chunk):
        ids = tok(texts[lo: lo + chunk], add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
        ids = [[t for t in row if t < base_rows] or [tok.pad_token_id] for row in ids]
        flat = torch.tensor([t for row in ids for t in row], dtype=torch.long)
        offsets = torch.tensor([0] + [len(r) for r in ids[:-1]], dtype=torch.long).cumsum(0)
        means = nn.functional.embedding_bag(flat, emb[:base_rows], offsets, mode="mean")
        emb[first_row + lo: first_row + lo + len(ids)] = means.to(emb.dtype)
        if out_emb is not None and out_emb.data_ptr() != emb.data_ptr():
            out_emb[first_row + lo: first_row + lo + len(ids)] = nn.functional.embedding_bag(
                flat, out_emb[:base_rows], offsets, mode="mean").to(out_emb.dtype)


@torch.no_grad()
def set_item_rows(lm, first_row: int, rows: torch.Tensor) -> None:
    """Overwrite the input (and an untied output) embedding rows of items 1..N, starting at token ``first_row``.
    A ZeRO-3-partitioned weight is gathered, written on rank 0 and re-partitioned (every rank calls this)."""
    weights = [lm.get_input_embeddings().weight]
    out = lm.get_output_embeddings()
    if out is not None and out.weight is not weights[0]:  # tied heads share the Parameter
        weights.append(out.weight)
    for w in weights:
        if hasattr(w, "ds_id"):
            import deepspeed
            import torch.distributed as dist

            with deepspeed.zero.GatheredParameters([w], modifier_rank=0):
                if not dist.is_initialized() or dist.get_rank() == 0:
                    w[first_row: first_row + len(rows)] = rows.to(w.dtype)
        else:
            w[first_row: first_row + len(rows)] = rows.to(w.device, w.dtype)


def causal_core(lm: nn.Module) -> nn.Module:
    """The underlying *ForCausalLM, under a peft wrapper or not."""
    get = getattr(lm, "get_base_model", None)
    return get() if callable(get) else lm


class ItemLM(nn.Module):
    """Item indices in, item logits out (``model.items`` id, text or hybrid; see model/items.py)."""

    def __init__(self, lm: nn.Module, vocab: ItemVocab, dropout: float = 0.0, tokenizer=None, hidden_dropout: float = 0.0,
                 mode: str = "id", tower: Optional[nn.Module] = None, id_dropout: float = 0.0, side: Optional[nn.Module] = None):
        super().__init__()
        if mode != "id" and tower is None:
            raise ValueError(f"model.items={mode} needs an item text table")
        self.lm = lm
        self.side = side  # model/side_inputs.SideInputs (event type, channel, time gap) or None
        self.vocab = vocab
        self.tokenizer = tokenizer
        self.mode = mode
        self.tower = tower
        self.id_dropout = id_dropout
        # a hybrid with a cold head and some items without training occurrence scores by the mixture (_mix_cold)
        self.mixes_cold = bool(mode == "hybrid" and getattr(tower, "cold_adapter", None) is not None and bool(tower.id_free[1:].any()))
        if self.mixes_cold:
            self.register_buffer("_cold_cols", torch.nonzero(tower.id_free[1:]).squeeze(1), persistent=False)
        self.embed_dropout = nn.Dropout(dropout)
        self.hidden_dropout = hidden_dropout
        if hidden_dropout > 0:
            # Qwen2/Llama decoder layers have no residual dropout; on small catalogues
            # (Beauty: 12k items, 150k training tokens) it is the main regulariser
            for layer in getattr(causal_core(lm).model, "layers", []):
                for branch in (layer.self_attn, layer.mlp):
                    branch.register_forward_hook(self._drop_branch)

    def _drop_branch(self, module: nn.Module, args, out):
        if not self.training:
            return out
        if isinstance(out, tuple):
            return (nn.functional.dropout(out[0], self.hidden_dropout, True), *out[1:])
        return nn.functional.dropout(out, self.hidden_dropout, True)

    def _id_keep(self, idx: torch.Tensor) -> torch.Tensor:
        """1 where an item's ID part counts (hybrid): never for ID-free (cold) items; id_dropout in training."""
        keep = ~self.tower.id_free[idx]
        if self.training and self.id_dropout > 0:
            keep = keep & (torch.rand(idx.shape, device=idx.device) >= self.id_dropout)
        return keep

    def item_embeddings(self, items: torch.Tensor) -> torch.Tensor:
        core = causal_core(self.lm)
        if self.mode == "text":
            return self.tower.embed(items)
        emb = core.get_input_embeddings()(self.vocab.to_tokens(items))
        if self.mode == "hybrid":
            emb = emb * self._id_keep(items).unsqueeze(-1).to(emb.dtype) + self.tower.embed(items).to(emb.dtype)
        return emb

    def hidden(self, items: torch.Tensor, position_ids: Optional[torch.Tensor] = None, side: Optional[dict] = None,
               extra: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Last hidden states [B,T,H]. With ``position_ids`` (packed rows, see tasks/next_item.pack_rows)
        no 2-D mask is passed: transformers then derives a block-diagonal causal mask from the
        restarting positions, so segments never attend to each other. ``side``: per-position
        index tensors (events / channels / gaps, see model/side_inputs.py) added to the embeddings;
        ``extra``: a task's own per-position input embeddings [B,T,H] (e.g. past ratings), added too."""
        core = causal_core(self.lm)
        mask = (items > 0).long() if position_ids is None else None
        emb = self.item_embeddings(items)
        if self.side is not None and side:
            more = self.side(side)
            if more is not None:
                emb = emb + more.to(emb.dtype)
        if extra is not None:
            emb = emb + extra.to(emb.dtype)
        emb = self.embed_dropout(emb)
        out = core.model(inputs_embeds=emb, attention_mask=mask, position_ids=position_ids, use_cache=False)
        return out.last_hidden_state

    def _id_head(self, hidden: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """ID-token logits of item columns lo..hi-1. A plain ``nn.Linear`` head (tied or not) is sliced to
        rows ``offset+lo .. offset+hi`` and only those are multiplied, so scoring a chunk of a 1 M-item
        catalog costs the chunk, not the vocabulary. A wrapped head (peft trainable tokens) or a
        ZeRO-3-partitioned weight runs whole and is sliced after (correct, not cheaper)."""
        a, b = self.vocab.offset + lo, self.vocab.offset + hi
        head = causal_core(self.lm).lm_head
        full = lo == 0 and hi == self.vocab.num_items
        if not full and type(head) is nn.Linear and head.weight.dim() == 2 and head.weight.shape[0] >= b:
            bias = head.bias[a:b] if head.bias is not None else None
            return nn.functional.linear(hidden, head.weight[a:b], bias)
        return head(hidden)[..., a:b]

    def item_logits(self, hidden: torch.Tensor, lo: int = 0, hi: Optional[int] = None,
                    norm: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """Scores of item columns lo..hi-1 (column j = item j+1): [..., hi - lo].

        text/hybrid project only the text rows lo..hi-1, never the whole catalog. A hybrid with a cold head
        (``mixes_cold``) scores by log-probabilities at evaluation (see ``_mix_cold``); ``norm``: its
        per-row normalisers from ``score_norm``, which chunked callers compute once per batch."""
        hi = self.vocab.num_items if hi is None else hi
        if self.mode == "text":
            return self._unseen_out(hidden @ self.tower.vectors(lo, hi).to(hidden.dtype).T, lo, hi)
        logits = self._id_logits(hidden, lo, hi)
        if self.mixes_cold and not self.training:
            logits = self._mix_cold(hidden, logits, lo, hi, norm)
        return logits

    def _id_logits(self, hidden: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """id: the ID head; hybrid: ID (where kept) + text scores."""
        logits = self._id_head(hidden, lo, hi)
        if self.mode == "hybrid":
            cols = torch.arange(lo + 1, hi + 1, device=hidden.device)
            keep = self._id_keep(cols).to(logits.dtype)
            logits = self._unseen_out(logits * keep + hidden @ self.tower.vectors(lo, hi).to(hidden.dtype).T, lo, hi)
        return logits

    # -- cold head (model.item_text.cold_head, hybrid): cold items get their own text-only scorer
    def _cold_scores(self, hidden: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return hidden @ self.tower.cold_vectors(cols).to(hidden.dtype).T

    def cold_loss(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Training signal of the cold head: full-catalog cross-entropy of its text-only scores on the model's
        *detached* hidden states (``target``: item columns), over the items that have training occurrences.
        The model itself gets no gradient from it, and its weights no say in it."""
        logits = (hidden.detach() @ self.tower.cold_vectors().to(hidden.dtype).T).float()
        return nn.functional.cross_entropy(logits.masked_fill(self.tower.id_free[1:], float("-inf")), target)

    def score_norm(self, hidden: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row log-normalisers of the two parts of the mixture, the catalog taken ``chunk`` columns at a time:
        logsumexp of the hybrid's scores over warm items, and of the cold head's over cold items."""
        n = self.vocab.num_items
        free = self.tower.id_free[1:]
        warm = torch.full(hidden.shape[:-1], float("-inf"), device=hidden.device)
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            s = self._id_logits(hidden, lo, hi).float()
            warm = torch.logaddexp(warm, s.masked_fill(free[lo:hi], float("-inf")).logsumexp(-1))
        return warm, self._cold_norm(hidden, chunk)

    def _cold_norm(self, hidden: torch.Tensor, chunk: int) -> torch.Tensor:
        cold_cols = self._cold_cols
        out = torch.full(hidden.shape[:-1], float("-inf"), device=hidden.device)
        for a in range(0, len(cold_cols), chunk):
            out = torch.logaddexp(out, self._cold_scores(hidden, cold_cols[a: a + chunk]).float().logsumexp(-1))
        return out

    def _mix_cold(self, hidden: torch.Tensor, logits: torch.Tensor, lo: int, hi: int,
                  norm: Optional[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """log[(1 - s) P_hybrid(item | warm items)] for warm columns, log[s P_cold(item | cold items)] for cold ones
        (s = ``tower.cold_share``). The hybrid ranks warm items as before; a cold item ranks among them by how sure
        the cold head is of it, weighted by how often targets are cold."""
        free = self.tower.id_free[lo + 1: hi + 1]
        cols = torch.nonzero(free).squeeze(1)
        cold = self._cold_scores(hidden, cols + lo).float() if len(cols) else None
        if norm is None:
            if lo != 0 or hi != self.vocab.num_items:
                raise ValueError("ItemLM.item_logits: a chunk of a cold-head model's scores needs norm=score_norm(hidden, chunk)")
            # the whole catalog (mixes_cold: it has cold columns): both normalisers from the scores at hand
            norm = (logits.float().masked_fill(free, float("-inf")).logsumexp(-1), cold.logsumexp(-1))
        share = self.tower.cold_share.float()
        out = logits.float() - (norm[0] - torch.log1p(-share)).unsqueeze(-1)
        if cold is not None:
            out = out.index_copy(out.dim() - 1, cols, cold - (norm[1] - torch.log(share)).unsqueeze(-1))
        return out

    def _unseen_out(self, logits: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Training only: items with no training occurrence leave the softmax. They are never a training
        label, so as negatives they would only be pushed down -- through their text features too, which
        hashed or high-dimensional text lets the adapter memorise per item (measured on the synthetic
        quickstart: cold HR@10 0.0 for text mode before this). At evaluation they rank like any item."""
        if not self.training:
            return logits
        free = self.tower.id_free[lo + 1: hi + 1]
        return logits.masked_fill(free, float("-inf")) if bool(free.any()) else logits

    def forward(self, items: torch.Tensor, positions: Optional[torch.Tensor] = None, side: Optional[dict] = None) -> torch.Tensor:
        """Item logits at every position ([B,T,N]) or at ``positions`` ([B,N])."""
        h = self.hidden(items, side=side)
        if positions is not None:
            h = h[torch.arange(len(h), device=h.device), positions]
        return self.item_logits(h)
