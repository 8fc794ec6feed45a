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

    def to_tokens(self, items: torch.Tensor) -> torch.Tensor:
        return torch.where(items > 0, items + (self.offset - 1), torch.full_like(items, self.pad_token_id))

    def item_token(self, i: int) -> str:
        return f"<item_{i}>"


def build_causal_lm(cfg: ModelConfig, num_items: int):
    """Return (hf_model, ItemVocab, tokenizer or None)."""
    from transformers import AutoModelForCausalLM

    bb = cfg.backbone
    if bb.pretrained:
        from transformers import AutoTokenizer

        lm = AutoModelForCausalLM.from_pretrained(bb.pretrained, local_files_only=True, attention_dropout=cfg.attention_dropout)
        tok = AutoTokenizer.from_pretrained(bb.pretrained, local_files_only=True)
        tok.add_tokens([f"<item_{i}>" for i in range(1, num_items + 1)])
        base = tok.convert_tokens_to_ids("<item_1>")
        if tok.convert_tokens_to_ids(f"<item_{num_items}>") != base + num_items - 1:
            raise ValueError(f"{bb.pretrained}: item tokens did not get contiguous ids in the tokenizer")
        # real checkpoints often pad the embedding past len(tokenizer) (Qwen2: 151,936 rows for
        # 151,665 tokens); never shrink it, grow it to hold the last item token
        lm.resize_token_embeddings(max(len(tok), lm.get_input_embeddings().weight.shape[0]))
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        return lm, ItemVocab(num_items, base, pad), tok

    if bb.arch == "qwen2":
        from transformers import Qwen2Config as Cfg
    else:
        from transformers import LlamaConfig as Cfg
    conf = Cfg(
        vocab_size=num_items + 1,
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
    return lm, ItemVocab(num_items, 1, 0), None


def causal_core(lm: nn.Module) -> nn.Module:
    """The underlying *ForCausalLM, under a peft wrapper or not."""
    get = getattr(lm, "get_base_model", None)
    return get() if callable(get) else lm


class ItemLM(nn.Module):
    """Item indices in, item logits out."""

    def __init__(self, lm: nn.Module, vocab: ItemVocab, dropout: float = 0.0, tokenizer=None, hidden_dropout: float = 0.0,
                 side: Optional[nn.Module] = None):
        super().__init__()
        self.lm = lm
        self.side = side  # model/side_inputs.SideInputs (event type, channel, time gap) or None
        self.vocab = vocab
        self.tokenizer = tokenizer
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

    def item_embeddings(self, items: torch.Tensor) -> torch.Tensor:
        """Input embeddings of item indices (0 = padding)."""
        return causal_core(self.lm).get_input_embeddings()(self.vocab.to_tokens(items))

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

    def item_logits(self, hidden: torch.Tensor, lo: int = 0, hi: Optional[int] = None) -> torch.Tensor:
        """Logits of item columns ``lo .. hi-1`` (column j = item j+1): ``[..., hi-lo]``.

        A plain ``nn.Linear`` head (tied or not) is sliced to rows ``offset+lo .. offset+hi`` and
        only those are multiplied, so scoring a chunk of a 1 M-item catalog costs the chunk, not the
        vocabulary. A wrapped head (peft trainable tokens) or a ZeRO-3-partitioned weight runs whole
        and is sliced after (correct, not cheaper).
        """
        hi = self.vocab.num_items if hi is None else hi
        a, b = self.vocab.offset + lo, self.vocab.offset + hi
        head = causal_core(self.lm).lm_head
        full = lo == 0 and hi == self.vocab.num_items
        if not full and type(head) is nn.Linear and head.weight.dim() == 2 and head.weight.shape[0] >= b:
            bias = head.bias[a:b] if head.bias is not None else None
            return nn.functional.linear(hidden, head.weight[a:b], bias)
        return head(hidden)[..., a:b]

    def forward(self, items: torch.Tensor, positions: Optional[torch.Tensor] = None, side: Optional[dict] = None) -> torch.Tensor:
        """Item logits at every position ([B,T,N]) or at ``positions`` ([B,N])."""
        h = self.hidden(items, side=side)
        if positions is not None:
            h = h[torch.arange(len(h), device=h.device), positions]
        return self.item_logits(h)
