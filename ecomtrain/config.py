"""Recipe schema, YAML loading, dotted overrides and validation.

A recipe is plain YAML (always ``yaml.safe_load``-ed) validated against the
pydantic models below *before* anything heavy is imported or built. Every
problem is collected and reported at once, with the dotted path of the key, a
did-you-mean suggestion for unknown keys and the expected type for wrong ones.

    cfg = load_recipe("recipes/quickstart.yaml", ["trainer.max_epochs=3"])
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class RecipeError(ValueError):
    """A recipe that cannot be used; the message lists every problem found."""


class _Section(BaseModel):
    # Unknown keys are errors (typos must not be silently ignored).
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- run
class RunConfig(_Section):
    name: str = Field("run", description="Run name; RUN_DIR is out_dir/name-<timestamp> unless run.dir is set.")
    out_dir: str = Field("runs", description="Parent folder of run directories.")
    dir: Optional[str] = Field(None, description="Exact RUN_DIR (overrides out_dir/name); needed for resume=auto across restarts.")
    seed: int = Field(0, description="Global seed: model init, data order, dropout.")


# -------------------------------------------------------------------------- data
class SynthConfig(_Section):
    num_users: int = Field(2000, gt=0)
    num_items: int = Field(600, gt=1)
    num_categories: int = Field(12, gt=0)
    num_brands: int = Field(40, gt=0)
    days: int = Field(120, gt=0, description="Time span of the log.")
    sessions_per_user: float = Field(6.0, gt=0, description="Mean sessions per user (Poisson).")
    seed: int = 0
    behaviour_signal: bool = Field(False, description="Plant a behaviour signal: the funnel stage decides the next item; abandoned carts come back and are bought (data/synth.py).")
    channel_signal: bool = Field(False, description="Plant a channel signal: conversion x1.6 on app, x0.5 on web (data/synth.py).")
    ratings: bool = Field(False, description="Emit a structured 1..5 'rating' event after every purchase (data/synth.py).")


class BuildConfig(_Section):
    """How ``ecomtrain data build`` turns raw events into shards (CLI flags have the same names)."""

    source: str = Field("synth", description="Importer: synth, table, seq, movielens, amazon-reviews, retailrocket, taobao.")
    input: Optional[str] = Field(None, description="Input path for the importer (file, folder or glob).")
    synth: SynthConfig = Field(default_factory=SynthConfig, description="Used when source=synth and input is unset.")
    columns: Optional[dict[str, str]] = Field(None, description="table: our field (user, item, ts, event, channel, value) -> the file's column name.")
    items: Optional[str] = Field(None, description="Item catalog file (item, title, category, brand, price, ...) for table / seq / amazon-reviews.")
    timestamp_format: Optional[str] = Field(None, description="strptime format when timestamps are date strings (default: numeric epoch).")
    separator: Optional[str] = Field(None, description="table: CSV separator (default ',' or tab for .tsv).")
    event_types: Optional[list[str]] = Field(None, description="Keep only these event types (default: all).")
    event_weights: Optional[dict[str, float]] = Field(None, description="Per-event-type weight stored per position ('weights') and target ('target_weight').")
    min_user_events: int = Field(3, ge=2, description="Users with fewer sequence positions are dropped (leave-one-out needs 3, temporal 2).")
    kcore_users: int = Field(0, ge=0, description="k-core: users keep only if they have at least this many events (repeated until stable; 0 = off).")
    kcore_items: int = Field(0, ge=0, description="k-core: items keep only if they have at least this many events (0 = off).")
    max_history: int = Field(200, gt=1, description="Longest history stored per sample (most recent kept; longer training input becomes several windows).")
    collapse_repeats: bool = Field(True, description="Merge consecutive events on the same item into one position (furthest funnel stage wins).")
    split: Literal["leave_one_out", "temporal"] = Field("leave_one_out", description="leave_one_out per user, or one global time cut for val and test.")
    temporal_val_fraction: float = Field(0.1, gt=0, lt=1, description="temporal: share of events (by time) in the validation period.")
    temporal_test_fraction: float = Field(0.1, gt=0, lt=1, description="temporal: share of events (by time) in the test period.")
    session_gap: Optional[int] = Field(None, gt=0, description="Inactivity gap (in timestamp units) that starts a new session; adds a 'sessions' list to samples.")
    pseudonymise_users: bool = Field(False, description="Replace user ids by HMAC-SHA256 keyed from the env var pseudonym_key_env.")
    pseudonym_key_env: str = Field("ECOMTRAIN_PSEUDONYM_KEY", description="Environment variable holding the HMAC key (never stored).")
    shard_max_samples: int = Field(5000, gt=0, description="Most samples per shard (a split needs at least ranks x workers non-empty shards to train).")
    shard_max_bytes: int = Field(64 * 1024 * 1024, gt=0, description="Most bytes per shard.")
    partition_events: int = Field(4_000_000, gt=0, description="Events per user hash partition; bounds build memory (~1-2 GB per 4 M events).")
    shard_format: Literal["npy", "json"] = Field(
        "npy", description="Shard members: npy (schema 2: .npy arrays per block of samples, ~2x smaller and faster to build) or "
        "json (schema 1: one JSON member per sample, the earlier format). Both decode to the same samples, so it is not part "
        "of the dataset fingerprint (docs/data.md).",
    )
    seed: int = Field(0, description="Shuffle seed of the sample order inside shards (independent of run.seed, so runs with other seeds share one dataset).")
    cold_items: float = Field(
        0.0, ge=0, lt=1,
        description="Cold-start evaluation: this fraction of the catalog (seeded, drawn from items that are some user's "
        "val/test target) is removed from all training input and kept only as val/test targets (see ecomtrain/data/cold.py).",
    )

    # The one definition of the build options: `ecomtrain data build` derives its
    # flags (names, types, defaults, help) from these fields, `data.build` in a
    # recipe is this model, and ecomtrain.data.build.build() takes it validated.
    def importer_options(self) -> dict:
        return {"columns": self.columns, "items": self.items, "timestamp_format": self.timestamp_format, "separator": self.separator}

    def build_options(self) -> dict:
        """The options that shape the built samples (everything but where the events come from)."""
        skip = {"source", "input", "synth", *self.importer_options()}
        return {k: v for k, v in self.model_dump().items() if k not in skip}

    def identity(self) -> dict:
        """Canonical options recorded in (and compared against) manifest.json's fingerprint.

        ``synth`` counts only when it generates the input (source synth, no input).
        """
        d = self.model_dump(mode="json")
        if not (self.source == "synth" and self.input is None):
            d.pop("synth")
        d.pop("shard_format")  # how samples are stored, not which: both formats decode to the same samples
        return d


class ItemTextConfig(_Section):
    """How each catalog row becomes text (see docs/language.md)."""

    template: str = Field(
        "{title}; brand: {brand}; category: {category}; price: {price}",
        description="Rendered per item from items.parquet columns; ';'-separated segments whose fields are empty are dropped.",
    )
    max_length: int = Field(64, gt=0, description="Tokens kept per item text when it is tokenised / encoded.")


class DataConfig(_Section):
    path: str = Field(..., description="Built dataset folder (holds manifest.json).")
    build: Optional[BuildConfig] = Field(None, description="If set and path has no manifest.json, build it first; if path holds a dataset built with other options, see data.rebuild.")
    rebuild: Literal["error", "auto"] = Field(
        "error", description="When data.path holds a dataset whose fingerprint differs from data.build: 'error' stops naming the differing options, 'auto' rebuilds it (atomically) from data.build.")
    max_history: int = Field(50, gt=0, description="History length fed to the model (most recent items).")
    batch_size: int = Field(64, gt=0, description="Per-device micro-batch size for training.")
    packing: bool = Field(
        False, description="Pack several users' training histories into one row (block-diagonal causal attention, "
        "positions restart per segment): same loss, far fewer padded slots on skewed lengths (docs/perf.md)."
    )
    eval_batch_size: int = Field(256, gt=0)
    num_workers: int = Field(0, ge=0, description="Loader worker processes for training (0 = read in the training process).")
    prefetch_batches: int = Field(
        2, ge=0, description="num_workers=0: batches read and collated ahead in a background thread while the model trains (0 = off)."
    )
    shuffle_buffer: int = Field(2000, ge=0, description="Sample shuffle buffer (0 = no shuffle).")
    max_corrupt_fraction: float = Field(0.0, ge=0, le=1, description="Fraction of shards that may be unreadable (skipped and counted) before the run fails.")
    item_text: ItemTextConfig = Field(default_factory=ItemTextConfig, description="Item text template (used by model.items text/hybrid and by id-mode init from text).")


# ------------------------------------------------------------------------- model
class BackboneConfig(_Section):
    arch: Literal["qwen2", "llama"] = "qwen2"
    pretrained: Optional[str] = Field(
        None,
        description="Local save_pretrained folder or Hugging Face Hub id (HF cache; HF_HUB_OFFLINE=1 respected); "
        "in id/hybrid mode its vocabulary is extended with item tokens.",
    )
    init_items_from_text: bool = Field(
        True, description="Pretrained backbone, id/hybrid: item-token rows start as the mean of the backbone's embeddings of the item's text tokens."
    )
    hidden_size: int = Field(64, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(2, gt=0)
    num_kv_heads: Optional[int] = Field(None, gt=0)
    intermediate_size: int = Field(256, gt=0)
    max_position_embeddings: int = Field(512, gt=0)
    rope_theta: float = Field(10000.0, gt=0)
    tie_embeddings: bool = True


class ModelInputsConfig(_Section):
    """Per-step side inputs added to the item embeddings (ID mode; see model/side_inputs.py).

    Off by default so that existing recipes keep their figures and checkpoints; the task
    recipes under recipes/quickstart/ turn them on (docs/tasks.md measures what each adds).
    """

    event_types: bool = Field(False, description="Learned embedding of each history step's event type (view, click, cart, purchase, ...).")
    channels: bool = Field(False, description="Learned embedding of each history step's channel (app, web, mini_program, ...).")
    time_gaps: bool = Field(False, description="Learned embedding of the log-bucketed time since the previous step (12 buckets, seconds).")
class TextEncoderConfig(_Section):
    """The frozen encoder that turns item text into the table [N, D] (computed once, cached next to the data)."""

    encoder: str = Field(
        "hashing",
        description="'hashing' (built-in feature hashing of words, no model), 'backbone' (the pretrained backbone, mean-pooled), "
        "or a local Hugging Face encoder folder / Hub id (mean-pooled last hidden state, e.g. all-MiniLM-L6-v2).",
    )
    dim: int = Field(256, gt=0, description="encoder=hashing: vector size.")
    batch_size: int = Field(256, gt=0, description="Items encoded per chunk (bounds activation memory).")
    adapter: Literal["linear", "mlp"] = Field("linear", description="Trainable map from the (standardised) text table into the hidden size.")
    id_dropout: float = Field(
        0.0, ge=0, lt=1,
        description="hybrid: probability that an item's ID embedding is dropped (per item, per step) in training, so "
        "text alone must rank it; cold items are always scored by text alone.",
    )
    adapter_init: Literal["torch", "matched", "zero"] = Field(
        "torch",
        description="Initial scale of the adapter: 'torch' (nn.Linear's default: projected text starts ~30x larger than an ID "
        "embedding), 'matched' (output std = the backbone's init std, the scale of an ID embedding), 'zero' (hybrid only: the "
        "adapter's last layer starts at zero, so the model starts as its ID part and the text part is learned from there).",
    )
    adapter_lr: float = Field(
        1.0, gt=0,
        description="text/hybrid: the adapter's learning rate as a multiple of optim.lr. The adapter is shared by every item, so "
        "each Adam step moves all items' text parts at once; values below 1 keep it from swamping the per-item ID rows.",
    )
    cold_head: bool = Field(
        False,
        description="hybrid: a second, text-only scorer for items with no training occurrence (cold items), trained beside the "
        "model on its detached hidden states (CE over the items with history). At evaluation a cold item is scored by it, a "
        "warm item by the hybrid, mixed as probabilities: (1 - cold_share) * P_hybrid(warm) + cold_share * P_text(cold).",
    )
    cold_share: Union[Literal["auto"], float] = Field(
        "auto",
        description="cold_head: the prior share of targets that are cold items. 'auto' estimates it from the validation split "
        "(targets with no training occurrence, add-one smoothed); a number in (0, 1) sets it.",
    )
    id_init: Literal["random", "text"] = Field(
        "random",
        description="id/hybrid with a random-init backbone: 'text' starts each item's ID row at the item text table's top "
        "principal components (PCA to the hidden size, scaled to the backbone's init std), so items with similar text start "
        "close; 'random' is the backbone's own init. (A pretrained backbone uses model.backbone.init_items_from_text.)",
    )


class ModelConfig(_Section):
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    inputs: ModelInputsConfig = Field(default_factory=ModelInputsConfig)
    items: Literal["id", "text", "hybrid"] = Field(
        "id",
        description="Item representation: id (item tokens), text (frozen text table -> trainable adapter), hybrid (ID embedding + projected text).",
    )
    item_text: TextEncoderConfig = Field(default_factory=TextEncoderConfig, description="Text encoder for items text/hybrid.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout on input embeddings (item-token dropout regularises tiny data).")
    attention_dropout: float = Field(0.0, ge=0, lt=1)
    hidden_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on each attention and MLP output (the residual branches); HF Qwen2/Llama have none of their own.")
    activation_checkpointing: bool = False


class _TaskBase(_Section):
    weight: float = Field(1.0, gt=0, description="Weight of this task's loss in a multi-task recipe (sum of weight x loss).")


class PromptConfig(_Section):
    """A text-mode task's prompt (``task.input: text``; tasks/prompts.py, docs/tasks.md). Unset templates take
    the task's default; fields in braces are filled per sample, every piece is tokenised once and assembled."""

    system: Optional[str] = Field(None, description="System message for the chat template (None: the template's own default).")
    header: Optional[str] = Field(None, description="Text before the history steps (no fields).")
    step: Optional[str] = Field(
        None, description="One history step; fields {item} (prompt.item of the step's item), {event}, {channel}, {gap} (', a day later'), {rating} (', rated 4').")
    question: Optional[str] = Field(
        None, description="Text after the steps; fields {candidate} (purchase_intent, rating), {candidates} (candidate_ranking), {min}, {max} (rating).")
    item: str = Field("{title}", description="How an item reads in a prompt: a template over items.parquet columns (as data.item_text.template).")
    candidate: str = Field("\n{index}. {item}", description="candidate_ranking: one listed candidate; fields {index} (1..K) and {item}.")
    max_prompt_tokens: int = Field(
        128, gt=0, description="Token budget of a whole prompt (chat template included); history truncation keeps the most recent steps that fit.")
    max_steps: int = Field(20, gt=0, description="At most this many (most recent) history steps before the token budget applies.")
    chat_template: Literal["auto", "on", "off"] = Field(
        "auto", description="Wrap the prompt in the tokenizer's chat template (auto: when it has one; on: error if it has none).")


class _TextTask(_TaskBase):
    input: Literal["items", "text"] = Field(
        "items", description="items: item-token rows (ID mode); text: a text prompt rendered from item text and per-step words "
        "(needs model.backbone.pretrained, i.e. a tokenizer).")
    prompt: PromptConfig = Field(default_factory=PromptConfig, description="The text prompt (task.input: text).")


class NextItemTaskConfig(_TaskBase):
    """Next item over the whole catalog (full-softmax cross-entropy at every position)."""

    name: Literal["next_item"] = "next_item"
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    exclude_seen: bool = Field(
        False, description="Leave the items already in the user's history (up to each position) out of the training softmax, "
        "as eval.exclude_seen leaves them out of the ranking; a label that repeats an earlier item stays in. "
        "For catalogs where users rarely re-buy an item.")
    consistency_weight: float = Field(0.0, ge=0, description="Weight of the time-consistency regulariser: symmetric KL between the item distributions predicted from consecutive prefixes of a user's history (0 = off).")


class PurchaseIntentTaskConfig(_TextTask):
    """Will the user buy this candidate? Labels from the logs (tasks/purchase_intent.py)."""

    name: Literal["purchase_intent"] = "purchase_intent"
    positive_events: list[str] = Field(default_factory=lambda: ["purchase"], min_length=1, description="Event types that make a candidate a positive.")
    negative_events: list[str] = Field(
        default_factory=lambda: ["view", "click", "fav", "cart"],
        description="Event types of interacted-but-not-bought candidates (negatives unless bought in the same window).",
    )
    sampled_negatives: int = Field(1, ge=0, description="Non-interacted items sampled (seeded) per interacted candidate (train) and per eval target.")
    negative_sampling: Literal["uniform", "popularity"] = Field("uniform", description="How non-interacted negatives are drawn from the catalog.")
    head: Literal["auto", "binary", "yes_no"] = Field(
        "auto", description="binary: a learned logit head; yes_no (TALLRec): logit(answer_tokens[0]) - logit(answer_tokens[1]) of the LM head, "
        "needs a tokenizer (pretrained backbone); auto: yes_no with a tokenizer, else binary.",
    )
    answer_tokens: tuple[str, str] = Field(("Yes", "No"), description="yes_no head: the positive and negative answer; each must be one token.")
    ece_bins: int = Field(15, gt=1, description="Equal-width probability bins of the expected calibration error.")

    @model_validator(mode="after")
    def _text_head(self) -> "PurchaseIntentTaskConfig":
        if self.input == "text" and self.head == "binary":
            raise ValueError("input: text is answered by the LM (head yes_no or auto); head: binary needs input: items")
        return self


class RatingTaskConfig(_TextTask):
    """Explicit rating of the next rated item (samples' 'ratings' field; tasks/rating.py)."""

    name: Literal["rating"] = "rating"
    min_rating: float = Field(1.0, description="Lowest rating of the scale (predictions are clipped to the scale).")
    max_rating: float = Field(5.0, description="Highest rating of the scale.")
    answer_tokens: Optional[list[str]] = Field(
        None, description="input: text: one answer per scale step min_rating, min_rating+1, ..., max_rating (default the digits); each must be one token.")

    @model_validator(mode="after")
    def _scale(self) -> "RatingTaskConfig":
        if self.max_rating <= self.min_rating:
            raise ValueError(f"max_rating ({self.max_rating}) must exceed min_rating ({self.min_rating})")
        if self.input == "text":
            steps = self.max_rating - self.min_rating
            if steps != int(steps) or steps > 20:
                raise ValueError(f"input: text needs an integer scale of at most 21 steps (one answer token per step), got {self.min_rating}..{self.max_rating}")
            if self.answer_tokens is not None and len(self.answer_tokens) != int(steps) + 1:
                raise ValueError(f"answer_tokens: {len(self.answer_tokens)} given, the scale {self.min_rating:g}..{self.max_rating:g} has {int(steps) + 1} steps")
        return self


class CandidateRankingTaskConfig(_TextTask):
    """LLaRA-style choice among K candidates: the target plus K-1 sampled negatives (tasks/candidate_ranking.py)."""

    name: Literal["candidate_ranking"] = "candidate_ranking"
    num_candidates: int = Field(20, ge=2, description="K: candidates per query (the target + K-1 negatives); at most the catalog size.")
    negative_sampling: Literal["uniform", "popularity"] = Field("uniform", description="How the K-1 negatives are drawn (seeded, never the target).")
    text_scoring: Literal["likelihood", "generative"] = Field(
        "likelihood", description="input: text: rank the K candidates by the mean log-likelihood of each one's text after the prompt, "
        "or greedily decode an answer and parse it to a candidate (reports valid_ratio).")
    max_answer_tokens: int = Field(32, gt=0, description="text_scoring: generative: tokens decoded per answer at most.")


TASK_CONFIGS = (NextItemTaskConfig, PurchaseIntentTaskConfig, RatingTaskConfig, CandidateRankingTaskConfig)
TaskConfig = Annotated[Union[TASK_CONFIGS], Field(discriminator="name")]


class LoraConfig(_Section):
    """LoRA / DoRA / QLoRA adapter shape (peft ``LoraConfig``)."""

    r: int = Field(8, gt=0, description="Adapter rank.")
    alpha: int = Field(16, gt=0, description="Scaling numerator: the update is (alpha / r) * B @ A.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha / sqrt(r) instead of alpha / r.")


class AdaLoraConfig(_Section):
    """AdaLoRA (peft ``AdaLoraConfig``): rank budget shrinks from init_r to target_r per module on average.

    The schedule runs over the trainer's optimizer steps (``total_step`` = Lightning's
    ``estimated_stepping_batches``): ``tinit`` warm-up steps at full budget, a cubic
    decrease, then ``tfinal`` steps at the final budget with the rank pattern fixed.
    """

    init_r: int = Field(12, gt=0, description="Starting rank of every adapted module.")
    target_r: int = Field(4, gt=0, description="Average final rank per module (total budget = target_r x modules).")
    tinit: int = Field(0, ge=0, description="Optimizer steps at full budget before pruning starts.")
    tfinal: int = Field(0, ge=0, description="Last optimizer steps trained with the final, fixed rank pattern.")
    delta_t: int = Field(1, gt=0, description="Re-allocate the budget every delta_t optimizer steps.")
    beta1: float = Field(0.85, gt=0, lt=1, description="EMA coefficient of the sensitivity score.")
    beta2: float = Field(0.85, gt=0, lt=1, description="EMA coefficient of the uncertainty score.")
    orth_reg_weight: float = Field(0.5, ge=0, description="Weight of the orthogonality penalty on P and Q, added to the training loss.")
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)

    @model_validator(mode="after")
    def _shrinks(self) -> "AdaLoraConfig":
        if self.target_r > self.init_r:
            raise ValueError(f"target_r ({self.target_r}) must not exceed init_r ({self.init_r})")
        return self


class QLoraConfig(_Section):
    """4-bit base weights (bitsandbytes) under a LoRA adapter; CUDA only."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = Field(True, description="Also quantise the quantisation constants (saves ~0.4 bit/param).")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


class FinetuneConfig(_Section):
    """Which parameters train (see docs/peft.md).

    ``full`` trains everything. ``lora``, ``dora``, ``adalora`` and ``qlora`` freeze the
    backbone and train peft adapters on ``target_modules``; under every method the
    item-token rows of the input embedding (and of the output head, tied or not)
    train too, through peft's ``trainable_token_indices``.
    """

    method: Literal["full", "lora", "adalora", "dora", "qlora"] = "full"
    target_modules: Optional[list[str]] = Field(
        None,
        description="Module names (suffixes) that get adapters; default per architecture "
        "(Qwen2/Llama/Mistral: q,k,v,o,gate,up,down _proj; otherwise every Linear but the head).",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="Used by lora, dora and qlora.")
    adalora: AdaLoraConfig = Field(default_factory=AdaLoraConfig)
    qlora: QLoraConfig = Field(default_factory=QLoraConfig)


# --------------------------------------------------------------------- optimiser
class OptimConfig(_Section):
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-8, gt=0)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)


# ----------------------------------------------------------------------- trainer
class StrategyConfig(_Section):
    """How the model is spread over processes (see docs/dist.md).

    ``auto``/``single``: one process. ``ddp``: a full replica per process, gradients all-reduced.
    ``deepspeed``: ZeRO stage 1 (optimizer state sharded), 2 (+ gradients) or 3 (+ parameters).
    The same recipe runs on CPU (gloo) and CUDA (nccl); the backend follows the accelerator.
    """

    name: Literal["auto", "single", "ddp", "deepspeed"] = "auto"
    zero_stage: Literal[1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage (only for name=deepspeed).")
    offload_optimizer: bool = Field(False, description="ZeRO: keep optimizer states (and the step) in CPU memory (stage 1-3).")
    offload_params: bool = Field(False, description="ZeRO-3 only: keep parameters in CPU memory between uses.")
    offload_device: Literal["cpu", "nvme"] = Field("cpu", description="Where offloaded tensors live.")
    nvme_path: str = Field("/local_nvme", description="Folder for offload_device=nvme.")
    process_group_timeout_s: int = Field(1800, gt=0, description="Collective timeout; a hung rank fails after this many seconds.")
    find_unused_parameters: bool = Field(False, description="DDP: tolerate parameters without gradients (slower; needed for some adapters).")
    deepspeed_config: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra DeepSpeed config keys, deep-merged on top of the generated config "
        "(e.g. {zero_optimization: {reduce_bucket_size: 5e7}}). gradient_accumulation_steps is "
        "set from trainer.accumulate_grad_batches and may not appear here.",
    )

    @field_validator("deepspeed_config")
    @classmethod
    def _no_grad_accum(cls, v: dict) -> dict:
        if "gradient_accumulation_steps" in v:
            raise ValueError("set trainer.accumulate_grad_batches instead of deepspeed_config.gradient_accumulation_steps")
        return v


class CheckpointConfig(_Section):
    """Checkpoints in RUN_DIR/checkpoints, each written under a temporary name and renamed when complete."""

    every_n_steps: Optional[int] = Field(None, gt=0, description="Also checkpoint every N optimizer steps (step<N>.ckpt).")
    keep_last: int = Field(2, gt=0, description="How many periodic step checkpoints to keep (oldest deleted first).")
    save_last: bool = Field(True, description="Keep checkpoints/last.ckpt pointing at the newest complete checkpoint.")


class NonFiniteConfig(_Section):
    """What every rank does when the training loss is NaN/inf on any rank."""

    action: Literal["stop", "skip"] = Field(
        "stop", description="stop: end the run with an error (no checkpoint is written); skip: drop that batch's update."
    )
    max_skips: int = Field(10, ge=0, description="action=skip: stop once more than this many steps were skipped in the run.")


class EarlyStoppingConfig(_Section):
    enabled: bool = False
    monitor: Optional[str] = Field(None, description="Validation metric to watch; default: the primary task's monitor (next_item: val/ndcg@10).")
    patience: int = Field(3, gt=0)
    mode: Optional[Literal["max", "min"]] = Field(None, description="Default: the direction the task's monitor proposes.")


class PreemptionConfig(_Section):
    """Checkpoint-and-stop on a signal, for Slurm requeue and torchrun restarts (see launch/README.md)."""

    signal: Literal["SIGUSR1", "SIGUSR2", "none"] = Field(
        "SIGUSR1",
        description="On this signal every rank checkpoints at the same step and the run exits with status 75 "
        "(launch/slurm.sbatch then requeues it; resume=auto continues). 'none': the signal keeps its default action.",
    )


class WeightAveragingConfig(_Section):
    """An average of the weights over training, used for every validation, the checkpoints' weights
    (``state_dict``; the live weights ride along for resume) and the final test (see docs/dist.md)."""

    kind: Literal["none", "ema", "swa"] = Field(
        "none",
        description="ema: exponential moving average, updated after every optimizer step; swa: equal-weight "
        "average of the weights at the end of each epoch from start_epoch on; none: off.",
    )
    decay: float = Field(
        0.999, gt=0, lt=1,
        description="ema: weight of the old average at each step; it spans about 1/(1-decay) steps (0.99: 100).",
    )
    start_epoch: int = Field(0, ge=0, description="swa: the first epoch (0-based) whose end weights enter the average.")


class TrainerConfig(_Section):
    accelerator: Literal["auto", "cpu", "gpu", "cuda"] = "auto"
    devices: Union[int, Literal["auto"]] = 1
    num_nodes: int = Field(1, gt=0)
    precision: Literal["32", "16-mixed", "bf16-mixed", "bf16-true"] = Field(
        "32", description="32: fp32. bf16-mixed / 16-mixed: autocast (fp16 adds loss scaling; CUDA only). bf16-true: weights in bf16."
    )
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    max_epochs: int = Field(1, gt=0)
    max_steps: int = Field(-1, ge=-1)
    accumulate_grad_batches: int = Field(1, gt=0, description="Micro-batches per optimizer step (global batch = batch_size x devices x nodes x this).")
    gradient_clip_val: Optional[float] = Field(1.0, ge=0, description="Clip the global gradient norm to this value (None or 0 = off); DeepSpeed clips internally.")
    check_val_every_n_epoch: int = Field(1, gt=0)
    log_every_n_steps: int = Field(10, gt=0)
    limit_train_batches: Optional[Union[int, float]] = None
    limit_val_batches: Optional[Union[int, float]] = None
    limit_test_batches: Optional[Union[int, float]] = Field(
        None, description="Smoke runs only: test on this many batches (int) or this fraction; metrics.json then covers part of the test split."
    )
    progress_bar: bool = True
    peak_tflops: Optional[float] = Field(
        None, gt=0, description="Dense bf16 peak TFLOP/s of one device for the MFU figure (default: known from the CUDA device name; CPU: no MFU)."
    )
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    nonfinite: NonFiniteConfig = Field(default_factory=NonFiniteConfig)
    preemption: PreemptionConfig = Field(default_factory=PreemptionConfig)
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    weight_averaging: WeightAveragingConfig = Field(default_factory=WeightAveragingConfig)
    resume: Optional[str] = Field(
        None, description="'auto' (newest complete checkpoint in RUN_DIR/checkpoints, or a fresh start if none) or a checkpoint path (file, or folder for DeepSpeed)."
    )
    test_ckpt: Literal["best", "last"] = Field("best", description="Checkpoint used for the final test: best on the validation monitor, or the last weights.")

    @field_validator("precision", mode="before")
    @classmethod
    def _precision_int(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v


class EvalConfig(_Section):
    ks: list[int] = Field(default_factory=lambda: [5, 10, 20], min_length=1, description="Cut-offs K of HR@K and NDCG@K (at least one).")
    @field_validator("ks")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(k <= 0 for k in v):
            raise ValueError("every K must be a positive integer")
        return v

    exclude_seen: bool = Field(False, description="Primary protocol: drop the user's history items from the ranking. Both are reported.")
    score_memory_mb: float = Field(256.0, gt=0, description="Memory budget for scoring the catalog in chunks (batch x chunk floats); bounds eval and recommend on large catalogs.")
    beyond_accuracy: bool = Field(True, description="Also report coverage@K, gini@K, ild@K, novelty@K and HR/NDCG by item-popularity and user-activity bucket.")
    consistency: bool = Field(True, description="Test split: channel and time consistency of the top-K lists (extra forward passes: ~2 + channels per batch).")
    consistency_k: int = Field(10, gt=0, description="List length K for Jaccard@K and RBO@K.")
    sample_users: int = Field(8, ge=0, description="Rows of the W&B table of sample users (history -> top-10, hits marked) per evaluation; 0 = off.")


class WandbConfig(_Section):
    enabled: bool = True
    mode: Literal["auto", "online", "offline", "disabled"] = Field("auto", description="auto = WANDB_MODE if set, else online if WANDB_API_KEY is set, else offline.")
    project: str = "ecomtrain"
    entity: Optional[str] = None
    tags: list[str] = Field(default_factory=list)


class LoggingConfig(_Section):
    wandb: WandbConfig = Field(default_factory=WandbConfig)


class Recipe(_Section):
    run: RunConfig = Field(default_factory=RunConfig)
    data: DataConfig
    task: list[TaskConfig] = Field(
        default_factory=lambda: [NextItemTaskConfig()],
        description="One task (a mapping) or several sharing the backbone (a list); the first is the primary one.",
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @field_validator("task", mode="before")
    @classmethod
    def _task_list(cls, v: Any) -> Any:
        # `task: {name: next_item}` (one task) and `task: [{...}, {...}]` (multi-task) are both valid
        if v is None:
            return [{"name": "next_item"}]
        if isinstance(v, dict):
            v = [v]
        if isinstance(v, list):
            v = [({"name": "next_item", **e} if isinstance(e, dict) and "name" not in e else e) for e in v]
        return v

    @field_validator("task")
    @classmethod
    def _task_unique(cls, v: list) -> list:
        if not v:
            raise ValueError("needs at least one task")
        seen = [t.name for t in v]
        dup = sorted({n for n in seen if seen.count(n) > 1})
        if dup:
            raise ValueError(f"task '{dup[0]}' appears more than once")
        return v

    @model_validator(mode="after")
    def _text_tasks_need_a_tokenizer(self) -> "Recipe":
        for i, t in enumerate(self.task):
            if getattr(t, "input", "items") == "text" and not self.model.backbone.pretrained:
                where = f"task[{i}]" if len(self.task) > 1 else "task"
                raise ValueError(f"{where}.input: text needs a tokenizer: set model.backbone.pretrained (a local folder or Hub id)")
        return self

    @model_validator(mode="after")
    def _id_init_needs_id_rows(self) -> "Recipe":
        m = self.model
        if m.item_text.id_init == "text":
            if m.items == "text":
                raise ValueError("model.item_text.id_init: text initialises item ID rows, which model.items=text has none of; use items id or hybrid")
            if m.backbone.pretrained:
                raise ValueError("model.item_text.id_init: text is for random-init backbones; a pretrained backbone initialises "
                                 "item tokens from its own embeddings (model.backbone.init_items_from_text)")
        if m.item_text.cold_head and m.items != "hybrid":
            raise ValueError(f"model.item_text.cold_head: true scores cold items apart from a hybrid's ID+text scores; "
                             f"model.items={m.items}: {'text mode scores every item by text already' if m.items == 'text' else 'use hybrid'}")
        cs = m.item_text.cold_share
        if cs != "auto" and not 0 < cs < 1:
            raise ValueError(f"model.item_text.cold_share: {cs} is not 'auto' or a share strictly between 0 and 1")
        if m.item_text.adapter_init == "zero" and m.items != "hybrid":
            raise ValueError(f"model.item_text.adapter_init: zero starts the text part at zero, which only a hybrid has an ID part "
                             f"to start from; model.items={m.items}: use torch or matched")
        return self

    @property
    def primary_task(self):
        return self.task[0]

    @model_validator(mode="after")
    def _averaging_needs_whole_weights(self) -> "Recipe":
        wa, st = self.trainer.weight_averaging, self.trainer.strategy
        if wa.kind != "none" and st.name == "deepspeed":
            raise ValueError(
                f"trainer.weight_averaging.kind: {wa.kind} keeps a full copy of the weights in each process, which "
                f"trainer.strategy.name=deepspeed (ZeRO-{st.zero_stage}) shards and checkpoints by its own format; "
                "use strategy auto/single/ddp, or weight_averaging.kind: none"
            )
        return self

    @model_validator(mode="after")
    def _monitor_is_logged(self) -> "Recipe":
        # checked here, not after the first epoch: Lightning's EarlyStopping only fails once
        # validation has run and the metric is missing
        from .tasks import val_metrics

        es = self.trainer.early_stopping
        if es.monitor is not None:
            logged = [m for t in self.task for m in val_metrics(t.name, self.eval.ks)]  # any task's validation metric
            if es.monitor not in logged:
                raise ValueError(
                    f"trainer.early_stopping.monitor: '{es.monitor}' is not logged with eval.ks={self.eval.ks}; "
                    f"choose one of {', '.join(logged)}"
                )
        return self


# ------------------------------------------------------------------ loading API
def _task_models() -> dict[str, type[BaseModel]]:
    return {get_args(c.model_fields["name"].annotation)[0]: c for c in TASK_CONFIGS}


def _model_at(loc: tuple) -> Optional[type[BaseModel]]:
    """The pydantic model class whose fields live at ``loc`` (for suggestions)."""
    model: Any = Recipe
    loc = tuple(p for p in loc if not isinstance(p, int))  # list indices
    if loc[:1] == ("task",):  # task entries are a union tagged by name: loc is (task, i, <name>, ...)
        if len(loc) < 2 or loc[1] not in _task_models():
            return None
        model, loc = _task_models()[loc[1]], loc[2:]
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        nxt = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nxt is None:
            return None
        model = nxt
    return model


def _path(loc: tuple) -> str:
    out = ""
    for i, p in enumerate(loc):
        if isinstance(p, int):
            out += f"[{p}]"
        elif loc[:1] == ("task",) and i == 2 and p in _task_models():
            continue  # the union tag (the task's name) is not a key the user wrote
        else:
            out += ("." if out else "") + str(p)
    return out


def _describe(err: dict) -> str:
    loc = tuple(err["loc"])
    path = _path(loc)
    kind = err["type"]
    if kind == "union_tag_invalid":
        tag = str(err.get("ctx", {}).get("tag", err.get("input")))
        known = sorted(_task_models())
        guess = difflib.get_close_matches(tag, known, n=1, cutoff=0.5)
        return f"{path}.name: unknown task '{tag}'" + (f"; did you mean '{guess[0]}'?" if guess else f"; known tasks: {', '.join(known)}")
    if kind == "extra_forbidden":
        parent = _model_at(loc[:-1])
        names = list(parent.model_fields) if parent else []
        guess = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.5)
        hint = f"; did you mean '{guess[0]}'?" if guess else (f"; allowed: {', '.join(names)}" if names else "")
        return f"{path}: unknown key{hint}"
    if kind == "missing":
        return f"{path}: required field is missing"
    if not loc and kind == "value_error":  # a whole-recipe check: its message names the key
        return str(err["msg"]).removeprefix("Value error, ")
    got = err.get("input")
    shown = repr(got)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{path}: {err['msg']} (got {shown} of type {type(got).__name__})"


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        if node.get(p) is None:
            node[p] = {}
        if not isinstance(node[p], dict):
            raise RecipeError(f"override '{dotted}': '{p}' is not a section")
        node = node[p]
    node[parts[-1]] = value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides; values are parsed as YAML (safe)."""
    tree = copy.deepcopy(tree)
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override '{item}' is not of the form dotted.key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise RecipeError(f"override '{item}' has an empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as exc:
            raise RecipeError(f"override '{item}': the value is not valid YAML ({_yaml_problem(exc)}); quote it if it is a string") from None
        _set_dotted(tree, key, value)
    return tree


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error on one line: what is wrong and where (PyYAML's own message spans several)."""
    what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    return f"{what} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else what


def validate_tree(tree: Any, source: str = "<recipe>") -> Recipe:
    if not isinstance(tree, dict):
        raise RecipeError(f"{source}: a recipe must be a YAML mapping, got {type(tree).__name__}")
    try:
        return Recipe.model_validate(tree)
    except ValidationError as exc:
        lines = [_describe(e) for e in exc.errors()]
        n = len(lines)
        if n == 1:  # one problem, one line: "recipe.yaml: trainer.max_epocs: unknown key; did you mean ..."
            raise RecipeError(f"{source}: {lines[0]}") from None
        raise RecipeError(
            f"{source}: {n} problem{'s' if n != 1 else ''} in the recipe:\n" + "\n".join(f"  - {ln}" for ln in lines)
        ) from None


def read_yaml(path: str | os.PathLike) -> Any:
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe file not found: {p}")
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"{p}: not valid YAML: {_yaml_problem(exc)}") from None
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{p}: not UTF-8 text (byte {exc.start}); a recipe is a YAML file") from None


def load_recipe(path: str | os.PathLike, overrides: Optional[list[str]] = None) -> Recipe:
    tree = read_yaml(path)
    if not isinstance(tree, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping, got {type(tree).__name__}")
    tree = apply_overrides(tree, overrides or [])
    return validate_tree(tree, source=str(path))


# Field names that hold credentials: api_key, wandb_token, secret, password ...
_SECRET_KEY = re.compile(r"(^|_)(api_?key|key|token|secret|password|passwd)$", re.IGNORECASE)


def redact(tree: Any) -> Any:
    """Copy of a config tree with secret-looking values removed (for logs/dumps)."""
    if isinstance(tree, dict):
        return {
            k: ("<redacted>" if _SECRET_KEY.search(str(k)) and v not in (None, "") else redact(v))
            for k, v in tree.items()
        }
    if isinstance(tree, list):
        return [redact(v) for v in tree]
    return tree


def dump_recipe(cfg: Recipe, path: str | os.PathLike) -> None:
    data = redact(cfg.model_dump(mode="json"))
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
