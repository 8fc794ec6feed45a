"""Text prompts for the point-wise and candidate tasks (``task.input: text``).

    task:
      name: purchase_intent
      input: text
      prompt: {max_prompt_tokens: 128, step: "\\n- {item} ({event} on {channel}{gap})"}

A prompt is ``chat-template prefix + header + history steps + question + chat-template suffix``
(the suffix ends with the assistant turn's opening, so the next token is the answer). Every
piece is tokenised once, when the task is built, never per training step:

- the chat template is rendered once around a sentinel and split into a prefix and a suffix;
- each item's prompt text (``prompt.item`` over items.parquet, rendered vectorised by
  data/catalog.render) is tokenised for the whole catalog in one batch call, truncated to
  ``data.item_text.max_length`` tokens;
- event types, channels, time-gap buckets and rating values have a handful of words each;
- the templates' literal text between fields is tokenised once.

A step is then the concatenation of a few precomputed id lists. A field that follows a space
carries that space (``" Brand03 Kalomi"``), so byte-level BPE tokenisers see words as in
running text. Pieces are tokenised separately, so a prompt's ids can differ from tokenising
the rendered string in one go at piece boundaries; train and eval assemble them the same way
(``tests/test_prompts.py`` checks the chat-template prefix/suffix equal the tokenizer's own
``apply_chat_template`` ids).

Truncation keeps the most recent steps (at most ``max_steps``) whose tokens fit
``max_prompt_tokens`` beside the fixed parts. When the task is built, the longest possible
one-step prompt (longest item text, longest words, longest question) is computed from the
token tables: if it exceeds the model's context (``max_position_embeddings``) or
``max_prompt_tokens``, or ``max_prompt_tokens`` exceeds the context, one RecipeError names
the key -- before any model is built.
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..config import RecipeError
from ..model.side_inputs import gap_bucket

DEFAULT_HEADER = "A shopper's recent actions, oldest first:"
DEFAULT_STEP = "\n- {item} ({event} on {channel}{gap})"
DEFAULTS = {
    "purchase_intent": {"question": "\nWill the shopper buy {candidate}? Answer Yes or No."},
    "rating": {"step": "\n- {item} ({event} on {channel}{gap}{rating})",
               "question": "\nHow will the shopper rate {candidate} on a scale of {min} to {max}? Answer with one number."},
    "candidate_ranking": {"question": "\nCandidates:{candidates}\nWhich candidate will the shopper choose next? Answer with its name."},
}
FIELDS = {"step": {"item", "event", "channel", "gap", "rating"}, "header": set(),
          "question": {"candidate", "candidates", "min", "max"}, "candidate": {"index", "item"}}
#: event types as words in a prompt (others are used as they are, '_' -> ' ')
EVENT_WORDS = {"view": "viewed", "click": "clicked", "cart": "added to cart", "purchase": "bought", "fav": "saved",
               "rating": "rated", "review": "reviewed", "search": "searched"}
#: gap buckets (model/side_inputs.gap_bucket: 1 + floor(log2(1 + seconds) / 2)) as words
GAP_WORDS = {1: "", 2: ", seconds later", 3: ", a minute later", 4: ", minutes later", 5: ", minutes later",
             6: ", an hour later", 7: ", hours later", 8: ", hours later", 9: ", a day later", 10: ", days later",
             11: ", weeks later", 12: ", months later"}
SENTINEL = "\u2063ECOMTRAIN_PROMPT\u2063"


def load_tokenizer(pretrained: str):
    """The backbone's tokenizer (no item tokens: prompts use the base vocabulary only) and its context length."""
    from transformers import AutoConfig, AutoTokenizer

    from ..model.item_text import pad_ready_tokenizer, resolve_model

    folder = resolve_model(pretrained)
    try:
        tok = pad_ready_tokenizer(AutoTokenizer.from_pretrained(str(folder)), pretrained)
        conf = AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise RecipeError(f"model.backbone.pretrained: the tokenizer of '{pretrained}' could not be loaded: {exc}") from None
    ctx = getattr(conf, "max_position_embeddings", None) or getattr(conf, "n_positions", None) or 2048
    return tok, int(ctx)


def item_prompt_texts(data_path: str, manifest: dict, template: str) -> list[str]:
    """``prompt.item`` rendered for items 1..N (vectorised; data/catalog.render)."""
    from ..data.catalog import load_catalog, render
    from ..data.importers import DataError

    try:
        return render(load_catalog(data_path, manifest), template, log=lambda *_: None).to_list()
    except DataError as exc:
        raise RecipeError(f"task.prompt.item: {exc}") from None
    except FileNotFoundError:
        raise RecipeError(f"task.input: text needs the item catalog of {data_path} (items.parquet); none found") from None


def _parts(template: str, allowed: set, key: str) -> list[tuple[str, str, str]]:
    """[(kind, text, lead)]: kind 'lit' (text) or 'field' (name in text); a field after a space takes that space as lead."""
    out: list[tuple[str, str, str]] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise RecipeError(f"{key}: {exc} in {template!r}") from None
    for lit, name, spec, conv in parsed:
        lead = ""
        if name is not None and lit.endswith(" "):
            lit, lead = lit[:-1], " "
        if lit:
            out.append(("lit", lit, ""))
        if name is not None:
            if name not in allowed:
                raise RecipeError(f"{key}: unknown field {{{name}}} in {template!r}; fields here: "
                                  + (", ".join("{%s}" % f for f in sorted(allowed)) or "none"))
            out.append(("field", name, lead))
    return out


class PromptBuilder:
    """Token ids of a task's prompts, assembled from pieces tokenised once (see the module docstring)."""

    def __init__(self, task: str, pcfg, tokenizer, item_texts: Sequence[str], event_types: Sequence[str], channels: Sequence[str],
                 context: int, item_max_length: int = 64, num_candidates: int = 0, scale: Optional[tuple[int, int]] = None,
                 key: str = "task.prompt"):
        self.tok, self.cfg, self.key, self.context = tokenizer, pcfg, key, int(context)
        d = DEFAULTS.get(task, {})
        self.max_tokens, self.max_steps = pcfg.max_prompt_tokens, pcfg.max_steps
        if self.max_tokens > self.context:
            raise RecipeError(f"{key}.max_prompt_tokens: {self.max_tokens} exceeds the model's context of {self.context} tokens "
                              f"(max_position_embeddings); set it to at most {self.context}")
        header = pcfg.header if pcfg.header is not None else DEFAULT_HEADER
        step = pcfg.step if pcfg.step is not None else d.get("step", DEFAULT_STEP)
        question = pcfg.question if pcfg.question is not None else d.get("question", "")
        if scale is not None:
            question = question.replace("{min}", str(scale[0])).replace("{max}", str(scale[1]))
        self.item_max_length = item_max_length
        self._ids_cache: dict[str, list[int]] = {}
        self.n_items = len(item_texts)
        self._item_texts = list(item_texts)
        self._item_tables: dict[str, list[list[int]]] = {}
        # chat template: rendered once around a sentinel, split into prefix / suffix
        self.pre, self.post, self.chat = self._wrap(pcfg.system, pcfg.chat_template)
        self.header = self._ids(header) if header else []
        _parts(header, FIELDS["header"], f"{key}.header")
        parts = (_parts(step, FIELDS["step"], f"{key}.step"), _parts(question, FIELDS["question"], f"{key}.question"),
                 _parts(pcfg.candidate, FIELDS["candidate"], f"{key}.candidate"))
        self.K = num_candidates
        self.scale = scale
        self._words = {"event": [EVENT_WORDS.get(e, str(e).replace("_", " ")) for e in event_types] + ["did something"],
                       "channel": [str(c).replace("_", " ") for c in channels] + ["an unknown channel"],
                       "gap": [GAP_WORDS.get(b, "") for b in range(13)],
                       "rating": [""] + [f", rated {v}" for v in range(scale[0], scale[1] + 1)] if scale else [""] + [f", rated {v}" for v in range(1, 6)]}
        self._tables: dict = {}
        self.step_parts, self.q_parts = self._compile(parts[0]), self._compile(parts[1])
        self.cand_parts = self._compile(parts[2]) if num_candidates else []
        self.fixed = len(self.pre) + len(self.header) + len(self.post)
        worst = self.fixed + self._max_len(self.step_parts) + self._max_len(self.q_parts)
        if worst > self.context:
            raise RecipeError(f"{key}: a prompt with one history step can take {worst} tokens, more than the model's context of "
                              f"{self.context} (max_position_embeddings); shorten {key}.item / the templates or data.item_text.max_length")
        if worst > self.max_tokens:
            raise RecipeError(f"{key}.max_prompt_tokens: {self.max_tokens} cannot hold a prompt with one history step "
                              f"(up to {worst} tokens with the longest item text); raise it (at most {self.context}) or shorten "
                              f"{key}.item / the templates or data.item_text.max_length")
        self.worst_one_step = worst

    # -- tokenising (once)
    def _ids(self, text: str) -> list[int]:
        if text not in self._ids_cache:
            self._ids_cache[text] = list(self.tok(text, add_special_tokens=False)["input_ids"]) if text else []
        return self._ids_cache[text]

    def _wrap(self, system: Optional[str], mode: str) -> tuple[list[int], list[int], bool]:
        has = bool(getattr(self.tok, "chat_template", None))
        if mode == "on" and not has:
            raise RecipeError(f"{self.key}.chat_template: 'on' but the backbone's tokenizer has no chat template; use auto or off")
        if mode == "off" or not has:
            bos = self.tok.bos_token_id
            return ([bos] if bos is not None else []), [], False
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": SENTINEL}]
        text = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        if text.count(SENTINEL) != 1:
            raise RecipeError(f"{self.key}.chat_template: the tokenizer's chat template does not place the user message once; use off")
        pre, post = text.split(SENTINEL)
        return self._ids(pre), self._ids(post), True

    def item_table(self, lead: str) -> list[list[int]]:
        """Token ids of every item's prompt text (index i = item i; 0 = padding), tokenised in one call."""
        if lead not in self._item_tables:
            enc = self.tok([lead + t for t in self._item_texts], add_special_tokens=False)["input_ids"] if self._item_texts else []
            self._item_tables[lead] = [[]] + [list(r[: self.item_max_length]) for r in enc]
        return self._item_tables[lead]

    def table(self, name: str, lead: str) -> list[list[int]]:
        """Token ids of every value a word field can take (event, channel, gap, rating), with the field's lead."""
        if (name, lead) not in self._tables:
            self._tables[name, lead] = [self._ids(lead + w) if w else [] for w in self._words[name]]
        return self._tables[name, lead]

    def _compile(self, parts) -> list[tuple]:
        out = []
        for kind, text, lead in parts:
            if kind == "lit":
                out.append(("lit", self._ids(text)))
            elif text in ("item", "candidate"):
                out.append(("item", self.item_table(lead)))
            elif text in self._words:
                out.append((text, self.table(text, lead)))
            else:  # candidates (the listed candidates), index (a candidate's number)
                out.append((text, lead))
        return out

    def _max_len(self, parts) -> int:
        n = 0
        for p in parts:
            if p[0] == "lit":
                n += len(p[1])
            elif p[0] == "candidates":
                n += self.K * self._max_len(self.cand_parts)
            elif p[0] == "index":
                n += len(self._ids(p[1] + str(max(self.K, 1))))
            else:
                n += max((len(r) for r in p[1]), default=0)
        return n

    # -- assembling (per sample; list concatenation only)
    def _value(self, name: str, s: dict, t: int) -> int:
        """Row of a word table for step t of sample s (the last row = unknown event / channel)."""
        if name == "gap":
            ts = s.get("ts") or []
            return gap_bucket(ts[t] - ts[t - 1]) if 0 < t < len(ts) else 1
        if name == "rating":
            rs = s.get("ratings") or []
            r = rs[t] if t < len(rs) else None
            if r is None:
                return 0
            lo, hi = self.scale or (1, 5)
            return 1 + min(hi - lo, max(0, int(round(float(r))) - lo))
        v = s.get("events" if name == "event" else "channels") or []
        x = v[t] if t < len(v) else None
        n = len(self._words[name]) - 1
        return x if x is not None and 0 <= x < n else n

    @staticmethod
    def _render(parts: list, item: int, other) -> list[int]:
        """Token ids of compiled template parts: literals as they are, ``{item}`` fields from their
        per-item table at ``item``, every other field through ``other(kind, value)``."""
        out: list[int] = []
        for kind, val in parts:
            if kind == "lit":
                out += val
            elif kind == "item":
                out += val[item]
            else:
                out += other(kind, val)
        return out

    def step_ids(self, s: dict, t: int) -> list[int]:
        return self._render(self.step_parts, s["items"][t], lambda kind, table: table[self._value(kind, s, t)])

    def question_ids(self, candidate: int = 0, candidates: Sequence[int] = ()) -> list[int]:
        def other(kind, _):  # {candidates}: the listed candidates, numbered from 1
            return [i for j, c in enumerate(candidates) for i in self.candidate_ids(j + 1, c)] if kind == "candidates" else []
        return self._render(self.q_parts, candidate, other)

    def candidate_ids(self, index: int, item: int) -> list[int]:
        return self._render(self.cand_parts, item, lambda kind, prefix: self._ids(prefix + str(index)) if kind == "index" else [])

    def prompt(self, s: dict, lo: int, hi: int, question: list[int]) -> tuple[list[int], int]:
        """(ids, steps kept): the most recent steps of lo..hi-1 (at most max_steps) that fit max_prompt_tokens."""
        budget = self.max_tokens - self.fixed - len(question)
        steps: list[list[int]] = []
        used = 0
        for t in range(hi - 1, max(lo, hi - self.max_steps) - 1, -1):
            ids = self.step_ids(s, t)
            if used + len(ids) > budget:
                break
            steps.append(ids)
            used += len(ids)
        out = self.pre + self.header
        for ids in reversed(steps):
            out = out + ids
        return out + question + self.post, len(steps)

    def answer_ids(self, item: int) -> list[int]:
        """A generative answer: the item's prompt text, then end-of-sequence (candidate_ranking training)."""
        eos = self.tok.eos_token_id
        return self.item_table("")[item] + ([eos] if eos is not None else [])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)


def single_token_ids(tok, answers: Sequence[str], key: str, model: str = "the backbone") -> list[int]:
    """The one token id of each answer; a RecipeError naming the key when one is several tokens or unknown."""
    ids = []
    for a in answers:
        got = tok(a, add_special_tokens=False)["input_ids"]
        if len(got) == 1 and tok.unk_token_id is not None and got[0] == tok.unk_token_id:
            raise RecipeError(f"{key}: answer token '{a}' is not in the tokenizer's vocabulary (it maps to the unknown token); "
                              "choose answer tokens the tokenizer knows")
        if len(got) != 1:
            raise RecipeError(f"{key}: answer token '{a}' is {len(got)} tokens in the tokenizer of {model} (ids {got}); "
                              "choose answer tokens that are single tokens")
        ids.append(got[0])
    return ids


def pad_rows(rows: list[list[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [R, T], attention mask [R, T]) right-padded (or left-padded for generation)."""
    width = max(1, max((len(r) for r in rows), default=1))
    ids = [([pad_id] * (width - len(r)) + list(r)) if left else (list(r) + [pad_id] * (width - len(r))) for r in rows]
    mask = [([0] * (width - len(r)) + [1] * len(r)) if left else ([1] * len(r) + [0] * (width - len(r))) for r in rows]
    if not rows:
        return torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, 1, dtype=torch.long)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)


def lm_hidden(net, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states [R, T, H] of token rows through the backbone (LoRA and other peft layers included)."""
    from ..model.backbone import causal_core

    core = causal_core(net.lm)
    return core.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state


def lm_logits(net, h: torch.Tensor) -> torch.Tensor:
    """LM-head logits of hidden states (only the positions given: never the whole [R, T, V])."""
    from ..model.backbone import causal_core

    return causal_core(net.lm).get_output_embeddings()(h)


def normalise_answer(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def parse_choice(answer: str, candidate_texts: Sequence[str]) -> int:
    """Index (0..K-1) of the candidate an answer names, or -1: its text (normalised: lower case, words
    only), its number in the list ('3', '3.'), or its text after a leading number ('3. Brand03 ...')."""
    a = normalise_answer(answer)
    norm = [normalise_answer(c) for c in candidate_texts]
    if a in norm:
        return norm.index(a)
    m = re.fullmatch(r"(\d+)(?: (.*))?", a)
    if m:
        k = int(m.group(1)) - 1
        if 0 <= k < len(norm) and (m.group(2) is None or m.group(2) == norm[k]):
            return k
    return -1


def builder_for(task, pcfg, num_candidates: int = 0, scale: Optional[tuple[int, int]] = None) -> PromptBuilder:
    """The PromptBuilder of a task built from a recipe (tokenizer of model.backbone.pretrained, catalog of data.path)."""
    ctx = task.ctx
    tok = ctx.tokenizer
    context = ctx.context
    if tok is None:
        if not ctx.pretrained:
            raise RecipeError(f"task '{task.name}': input: text needs a tokenizer: set model.backbone.pretrained")
        tok, context = load_tokenizer(ctx.pretrained)
        ctx.tokenizer, ctx.context = tok, context
    texts = ctx.catalog.get("prompt_texts") if ctx.catalog.get("prompt_texts_template") == pcfg.item else None
    if texts is None:
        if not ctx.data_path or not (Path(ctx.data_path) / ctx.manifest.get("item_file", "items.parquet")).is_file():
            texts = [f"item {i}" for i in range(1, ctx.num_items + 1)]  # no catalog (unit tests on a bare manifest)
        else:
            texts = item_prompt_texts(ctx.data_path, ctx.manifest, pcfg.item)
    return PromptBuilder(task.name, pcfg, tok, texts, ctx.manifest.get("event_types") or [], ctx.manifest.get("channels") or [],
                         context or 2048, ctx.text_max_length, num_candidates, scale, key="task.prompt")
