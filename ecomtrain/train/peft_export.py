"""Checkpoint -> peft adapter (+ base, + merged) folders, in one plain process.

    from ecomtrain.train.peft_export import export_checkpoint
    export_checkpoint("runs/x/checkpoints/last.ckpt", "runs/x/export", merge=True)

Works from any checkpoint a run wrote: a Lightning file (single/DDP) or a
DeepSpeed ZeRO-1/2/3 folder, which ``checkpointing.load_lightning_state``
consolidates to full fp32 tensors first, so no saved tensor is an empty ZeRO-3
partition. The model is rebuilt from the recipe stored in the checkpoint, the
weights loaded strictly, and the AdaLoRA rank pattern taken from the
``AdaLoraAllocator`` callback state (peft then trims the saved matrices to it).

Output (``model/adapters.export_adapter``): ``adapter/`` (adapter_config.json +
adapter_model.safetensors), ``base/`` (HF model, item tokens appended, no
adapters) and with ``merge`` ``merged/`` (a plain HF model, adapters folded in).
Full fine-tuning writes ``merged/`` only (the model itself).
"""

from __future__ import annotations

from pathlib import Path


def load_trained_module(ckpt: str | Path):
    """A RecModule with the checkpoint's weights, built on CPU in this process (no strategy)."""
    from ..model.adapters import set_rank_pattern
    from .adalora import rank_pattern_from_checkpoint
    from .checkpointing import load_lightning_state
    from .module import RecModule

    state = load_lightning_state(Path(ckpt))
    hp = state.get("hyper_parameters") or {}
    if "recipe" not in hp or "num_items" not in hp:
        raise FileNotFoundError(f"{ckpt}: not an ecomtrain checkpoint (no recipe/num_items in hyper_parameters)")
    module = RecModule(hp["recipe"], int(hp["num_items"]))
    module.configure_model()
    module.load_state_dict(state["state_dict"], strict=True)
    set_rank_pattern(module.net.lm, rank_pattern_from_checkpoint(state))
    return module.eval()


def export_checkpoint(ckpt: str | Path, out: str | Path, merge: bool = False) -> dict[str, str]:
    from ..model.adapters import export_adapter, peft_model

    module = load_trained_module(ckpt)
    lm, tok = module.net.lm, module.net.tokenizer
    out = Path(out)
    if peft_model(lm) is None:
        path = out / "merged"
        lm.save_pretrained(path, safe_serialization=True)
        if tok is not None:
            tok.save_pretrained(path)
        return {"merged": str(path)}
    return export_adapter(lm, out, tokenizer=tok, merge=merge)
