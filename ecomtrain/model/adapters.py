"""Fine-tuning methods (peft): which parameters of the backbone train.

``finetune.method`` in the recipe:

- ``full``     every parameter trains (no peft wrapper);
- ``lora``     peft LoRA on ``target_modules``;
- ``dora``     LoRA with weight decomposition (peft ``use_dora=True``);
- ``adalora``  peft AdaLoRA; the budget schedule is driven once per optimizer
               step by ``train/adalora.py`` (a Lightning callback, ZeRO-aware);
- ``qlora``    LoRA over 4-bit NF4 base weights (bitsandbytes); CUDA only.

Item tokens. Under every adapter method the item-token rows train, through
peft's ``trainable_token_indices`` on ``embed_tokens`` (and ``lm_head`` when the
head is not tied; with ``tie_word_embeddings`` peft ties the head's wrapper to
the same rows, so input and output item vectors stay one tensor as in the base
model). Why not ``modules_to_save=[embed_tokens, lm_head]``: it deep-copies and
trains the whole vocabulary (Qwen2-0.5B: 151,936 x 896 = 136M parameters, 27 %
of the model, x2 when untied), breaks the embedding/head tie and stores both
matrices in every adapter. The item rows are ``ItemVocab.offset ..
offset + num_items - 1``: all rows but padding for a random-init backbone,
the rows appended after the base vocabulary for a pretrained one. The base
vocabulary rows are never read by ``ItemLM`` (only item tokens go in, only item
columns come out), so nothing is lost by freezing them. The saved adapter holds
the N x hidden item rows (``trainable_tokens_delta``), which peft writes into
the base embedding on load or merge.

Model code: nothing here imports torch.distributed or DeepSpeed; ZeRO
specifics live in ``train/``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..config import Recipe, RecipeError

# Linear layers of one decoder block, per ``config.model_type``. Attention and MLP
# both: on the 2-layer test model LoRA on q,v only trains 2x fewer adapter weights
# and (QLoRA paper, sec. 4) all-linear adapters are needed to match full fine-tuning.
_DECODER_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "qwen2": _DECODER_LINEARS,
    "qwen3": _DECODER_LINEARS,
    "llama": _DECODER_LINEARS,
    "mistral": _DECODER_LINEARS,
}
ADAPTER_METHODS = ("lora", "dora", "adalora", "qlora")


class FinetuneError(RecipeError):
    """A fine-tuning method that cannot run here (names the recipe field)."""


def default_target_modules(lm: nn.Module) -> list[str] | str:
    """Target modules for ``lm``'s architecture; peft's ``all-linear`` (every Linear but the head) otherwise."""
    return list(DEFAULT_TARGET_MODULES.get(getattr(lm.config, "model_type", ""), "all-linear"))


def item_token_indices(vocab) -> list[int]:
    if not getattr(vocab, "tokens", True):
        return []  # model.items=text: items are not tokens (the text adapter trains outside peft)
    return list(range(vocab.offset, vocab.offset + vocab.num_items))


def check_method_supported(cfg: Recipe, cuda_available: Optional[bool] = None) -> None:
    """Fail early, naming the field, when the method cannot run on this machine."""
    if cfg.finetune.method != "qlora":
        return
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if cfg.trainer.accelerator == "cpu" or not cuda_available:
        raise FinetuneError(
            "finetune.method 'qlora' needs a CUDA GPU (bitsandbytes 4-bit kernels) and "
            f"{'trainer.accelerator is cpu' if cfg.trainer.accelerator == 'cpu' else 'no CUDA device is visible'}; "
            "use finetune.method=lora (same adapter, full-precision base) or dora on this machine"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise FinetuneError("finetune.method 'qlora' needs the bitsandbytes package: pip install bitsandbytes") from None


def _peft_config(lm: nn.Module, cfg: Recipe, vocab):
    import peft

    ft = cfg.finetune
    targets = ft.target_modules or default_target_modules(lm)
    rows = item_token_indices(vocab)
    tied = bool(getattr(lm.config, "tie_word_embeddings", False))
    # tied: one wrapper on embed_tokens, peft ties lm_head to it; untied: both get their own rows
    tokens = {"embed_tokens": rows} if tied else {"embed_tokens": rows, "lm_head": rows}
    common = dict(target_modules=targets, trainable_token_indices=tokens if rows else None, bias="none", task_type="CAUSAL_LM")
    if ft.method == "adalora":
        a = ft.adalora
        # total_step is a placeholder here (peft requires one > 0); train/adalora.py sets the
        # real value from trainer.estimated_stepping_batches before the first step.
        return peft.AdaLoraConfig(
            init_r=a.init_r, target_r=a.target_r, tinit=a.tinit, tfinal=a.tfinal, deltaT=a.delta_t,
            beta1=a.beta1, beta2=a.beta2, orth_reg_weight=a.orth_reg_weight, lora_alpha=a.alpha,
            lora_dropout=a.dropout, total_step=max(1, a.tinit + a.tfinal + 1), **common,
        )
    lc = ft.lora
    return peft.LoraConfig(
        r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, use_rslora=lc.use_rslora,
        use_dora=ft.method == "dora", **common,
    )


def _quantize_4bit(lm: nn.Module, cfg: Recipe) -> nn.Module:
    """QLoRA: every decoder Linear becomes a bitsandbytes 4-bit Linear holding the trained-so-far
    weights (the head stays full precision: its item columns are read for every score).
    bitsandbytes quantises a ``Params4bit`` when it moves to the GPU."""
    import bitsandbytes as bnb
    from peft import prepare_model_for_kbit_training

    q = cfg.finetune.qlora
    dtype = getattr(torch, q.compute_dtype)
    for name, module in list(lm.named_modules()):
        if type(module) is not nn.Linear or name.split(".")[-1] == "lm_head":
            continue
        new = bnb.nn.Linear4bit(
            module.in_features, module.out_features, bias=module.bias is not None, compute_dtype=dtype,
            compress_statistics=q.double_quant, quant_type=q.quant_type,
        )
        new.weight = bnb.nn.Params4bit(
            module.weight.data.to(torch.float32).contiguous(), requires_grad=False,
            compress_statistics=q.double_quant, quant_type=q.quant_type,
        )
        if module.bias is not None:
            new.bias = nn.Parameter(module.bias.data.clone(), requires_grad=False)
        lm.set_submodule(name, new)
    lm = lm.cuda()
    return prepare_model_for_kbit_training(lm, use_gradient_checkpointing=cfg.model.activation_checkpointing)


def apply_finetune_method(lm: nn.Module, cfg: Recipe, vocab) -> nn.Module:
    """Return ``lm`` ready to train with ``finetune.method`` (a peft model for adapter methods)."""
    method = cfg.finetune.method
    if method == "full":
        return lm
    if method not in ADAPTER_METHODS:
        raise FinetuneError(f"finetune.method: unknown method '{method}'")
    check_method_supported(cfg)
    import peft

    pc = _peft_config(lm, cfg, vocab)
    if method == "qlora":
        lm = _quantize_4bit(lm, cfg)
    try:
        return peft.get_peft_model(lm, pc)
    except ValueError as exc:
        if "Target modules" in str(exc) or "target_modules" in str(exc):
            raise FinetuneError(f"finetune.target_modules {pc.target_modules!r}: {exc}") from None
        raise


def peft_model(lm: nn.Module):
    """The ``peft.PeftModel`` inside ``lm`` (or None for full fine-tuning)."""
    return lm if hasattr(lm, "peft_config") and hasattr(lm, "base_model") else None


def adalora_tuner(lm: nn.Module):
    """peft's ``AdaLoraModel`` (holds ``rankallocator``) when ``lm`` is an AdaLoRA model, else None."""
    pm = peft_model(lm)
    tuner = getattr(pm, "base_model", None) if pm is not None else None
    return tuner if tuner is not None and hasattr(tuner, "rankallocator") else None


def adapter_regularization(lm: nn.Module) -> Optional[torch.Tensor]:
    """AdaLoRA's orthogonality penalty on P (lora_A) and Q (lora_B), weighted by ``orth_reg_weight``.

    peft adds it inside ``AdaLoraModel.forward`` only when the HF model returns a
    loss; ``ItemLM`` calls the decoder directly and computes its own loss, so the
    penalty is added here instead (same formula: mean over matrices of
    ||P P^T - I||_F and ||Q^T Q - I||_F). The weights are read through their
    ParameterDicts (``layer.lora_A[name]``) rather than ``named_parameters`` so that
    DeepSpeed ZeRO-3's attribute hook gathers partitioned weights inside forward.
    """
    tuner = adalora_tuner(lm)
    if tuner is None:
        return None
    name = tuner.trainable_adapter_name
    weight = tuner.peft_config[name].orth_reg_weight
    if weight <= 0:
        return None
    terms = []
    for module in tuner.model.modules():
        if hasattr(module, "lora_E") and name in getattr(module, "lora_A", {}):
            a, b = module.lora_A[name], module.lora_B[name]
            if a.shape[0] == 0:  # all ranks pruned away by a resize
                continue
            for cov in (a @ a.T, b.T @ b):
                eye = torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)
                terms.append(torch.linalg.matrix_norm(cov - eye, ord="fro"))
    if not terms:
        return None
    return weight * torch.stack(terms).mean()


def trainable_parameter_count(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; peft's trainable-token rows count as N x hidden."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.parameters())
    return trainable, total


def set_rank_pattern(lm: nn.Module, rank_pattern: Optional[dict]) -> None:
    """Restore a trained AdaLoRA rank pattern (from a checkpoint) so save_pretrained trims to it."""
    tuner = adalora_tuner(lm)
    if tuner is not None and rank_pattern:
        tuner.peft_config[tuner.trainable_adapter_name].rank_pattern = dict(rank_pattern)


def save_adapter(lm: nn.Module, adapter_dir, base_model_path: Optional[str] = None) -> None:
    """peft ``save_pretrained`` as safetensors; the item-token rows travel in the adapter
    (``trainable_tokens_delta``), the embedding matrix is not copied (``save_embedding_layers=False``:
    the exported base already has the resized vocabulary). An AdaLoRA adapter is trimmed to its
    ``rank_pattern``, which goes into adapter_config.json."""
    pm = peft_model(lm)
    if pm is None:
        raise FinetuneError("finetune.method is 'full': there is no adapter to save")
    if base_model_path is not None:
        for pc in pm.peft_config.values():
            pc.base_model_name_or_path = base_model_path  # lets AutoPeftModelForCausalLM find the base
    pm.save_pretrained(str(adapter_dir), safe_serialization=True, save_embedding_layers=False)


def strip_adapter(lm: nn.Module, merge: bool) -> nn.Module:
    """The plain HF model: adapters folded in (``merge``) or removed (the original base weights)."""
    pm = peft_model(lm)
    if pm is None:
        return lm
    return pm.merge_and_unload() if merge else pm.unload()


def export_adapter(lm: nn.Module, out_dir, tokenizer=None, merge: bool = False) -> dict[str, str]:
    """``out_dir/adapter`` + ``out_dir/base`` (+ ``out_dir/merged``) from an in-memory peft model.

    ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)`` rebuilds
    the trained model with plain peft. ``lm`` is consumed (unloaded). The CLI's
    ``ecomtrain export`` (export.py) writes the same adapter next to the base or merged model.
    """
    from pathlib import Path

    out = Path(out_dir)
    paths = {"adapter": str(out / "adapter"), "base": str(out / "base")}
    save_adapter(lm, paths["adapter"])
    base = strip_adapter(lm, merge=False)
    base.save_pretrained(paths["base"], safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(paths["base"])
    if merge:
        import peft

        paths["merged"] = str(out / "merged")
        merged = peft.PeftModel.from_pretrained(base, paths["adapter"]).merge_and_unload()
        merged.save_pretrained(paths["merged"], safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(paths["merged"])
    return paths
