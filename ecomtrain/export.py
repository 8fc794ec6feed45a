"""``ecomtrain export RUN_DIR --out DIR``: a folder plain transformers loads, from any strategy.

    ecomtrain export runs/quickstart-... --out exported/ [--ckpt last|best|PATH] [--force]

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("exported/")    # no ecomtrain needed

DIR holds ``config.json`` + ``model.safetensors`` (save_pretrained), a tokenizer
(the backbone's, extended with item tokens; for a random-init backbone a word-level
one over ``<pad> <item_1> ...``), ``item_vocab.json`` (token id <-> raw item id from
the dataset's items.parquet), ``ecomtrain_export.json`` (provenance) and README.md.

Checkpoints of every strategy are read the same way: a DeepSpeed folder (ZeRO-1/2/3,
any world size) is consolidated to fp32 with DeepSpeed's zero_to_fp32 (through
Lightning's ``convert_zero_checkpoint_to_fp32_state_dict``); a plain file is loaded.

Adapter runs (finetune.method lora/dora/adalora/qlora) also get ``DIR/adapter/``
(peft adapter_config.json + adapter_model.safetensors; AdaLoRA trimmed to its final
rank pattern, read from the checkpoint). Without ``--merge`` DIR's weights are the
base model (item tokens appended, adapters removed), so plain peft rebuilds the
trained model::

    base = AutoModelForCausalLM.from_pretrained("exported/")
    model = PeftModel.from_pretrained(base, "exported/adapter")

With ``--merge`` DIR's weights are the adapters folded into a plain model (same
logits, no peft needed); ``adapter/`` is still written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

from .config import RecipeError, load_recipe

LM_PREFIX = "net.lm."


def lm_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """RecModule state dict -> the HF causal LM's (``net.lm.`` keys, prefix dropped)."""
    out = {k[len(LM_PREFIX):]: v for k, v in state_dict.items() if k.startswith(LM_PREFIX)}
    if not out:
        raise RecipeError(f"checkpoint holds no '{LM_PREFIX}*' weights (keys start with: {sorted(state_dict)[:3]})")
    return out


def load_run_state(run_dir: Path, ckpt: str = "last", overrides: Optional[list[str]] = None):
    """(recipe, checkpoint path, loaded checkpoint, num_items) of a run folder, without building any model."""
    from .train.checkpointing import load_lightning_state, resolve_checkpoint

    cfg = load_recipe(run_dir / "recipe.yaml", overrides or [])
    on = [k for k, v in cfg.model.inputs.model_dump().items() if v]
    if on:  # the side-input tables live beside the LM, not in it: a plain HF model would silently lose them
        raise RecipeError(f"{run_dir}: trained with model.inputs {on} (event-type / channel / time-gap embeddings); "
                          "export and recommend carry the language model only and would drop them: use `ecomtrain eval`")
    path = resolve_checkpoint(run_dir, ckpt)
    state = load_lightning_state(path)
    num_items = int(state.get("hyper_parameters", {}).get("num_items") or 0)
    if num_items <= 0:
        raise RecipeError(f"{path}: checkpoint has no hyper_parameters.num_items")
    return cfg, path, state, num_items


def load_trained_lm(run_dir: Path, ckpt: str = "last", overrides: Optional[list[str]] = None, loaded: Optional[tuple] = None):
    """(hf_model with trained weights, ItemVocab, tokenizer or None, recipe, checkpoint path, loaded checkpoint).
    ``loaded``: what ``load_run_state`` already returned for this run (the checkpoint is then not read again)."""
    from .model.backbone import build_causal_lm

    cfg, path, state, num_items = loaded if loaded is not None else load_run_state(run_dir, ckpt, overrides)
    lm, vocab, tok = build_causal_lm(cfg.model, num_items)
    from .model.adapters import apply_finetune_method

    lm = apply_finetune_method(lm, cfg, vocab)
    sd = lm_state_dict(state["state_dict"])
    missing, unexpected = lm.load_state_dict(sd, strict=False)
    tied = {"lm_head.weight"} if getattr(lm.config, "tie_word_embeddings", False) else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RecipeError(f"{path}: weights do not match the recipe's model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    lm.eval()
    return lm, vocab, tok, cfg, path, state


def finalize_for_export(lm, merge: bool = False, adapter_dir: Optional[Path] = None, state: Optional[dict] = None,
                        base_path: Optional[str] = None):
    """The model to save_pretrained. Full fine-tuning: as is. A peft model: its adapter is written to
    ``adapter_dir`` (AdaLoRA with the checkpoint's rank pattern), then merged in (``merge``) or removed."""
    from .model.adapters import peft_model, save_adapter, set_rank_pattern, strip_adapter

    if peft_model(lm) is None:
        return lm
    from .train.adalora import rank_pattern_from_checkpoint

    set_rank_pattern(lm, rank_pattern_from_checkpoint(state or {}))
    if adapter_dir is not None:
        save_adapter(lm, adapter_dir, base_model_path=base_path)
    return strip_adapter(lm, merge)


def item_tokenizer(num_items: int):
    """Word-level tokenizer over the random-init vocabulary: <pad>=0, <item_i>=i."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, **{f"<item_{i}>": i for i in range(1, num_items + 1)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", unk_token="<pad>")


def item_vocab_json(cfg, vocab) -> dict:
    import polars as pl

    from .data.build import load_manifest

    root = Path(cfg.data.path)
    manifest = load_manifest(root)
    items = pl.read_parquet(root / manifest.get("item_file", "items.parquet"), columns=["item", "idx"]).sort("idx")
    if items.height != vocab.num_items:
        raise RecipeError(f"{root}/items.parquet has {items.height} items but the model has {vocab.num_items}")
    tok_ids = [vocab.offset + int(i) - 1 for i in items["idx"]]
    raw = [v if isinstance(v, (int, str)) else str(v) for v in items["item"].to_list()]
    return {
        "num_items": vocab.num_items,
        "first_item_token_id": vocab.offset,
        "pad_token_id": vocab.pad_token_id,
        "token_format": "<item_{index}>",
        "note": "item index i (1..num_items, as in the dataset) is token first_item_token_id + i - 1; "
        "item scores are logits[..., first_item_token_id : first_item_token_id + num_items]",
        "token_id_to_item_id": {str(t): r for t, r in zip(tok_ids, raw)},
        "item_id_to_token_id": {str(r): t for t, r in zip(tok_ids, raw)},
    }


def copy_catalog(cfg, dest: Path) -> None:
    from .data.build import load_manifest

    root = Path(cfg.data.path)
    src = root / load_manifest(root).get("item_file", "items.parquet")
    if src.is_file():
        shutil.copyfile(src, dest)
TOWER_PREFIX = "net.tower."


def write_item_tower(out: Path, cfg, vocab, state: dict) -> None:
    """model.items text/hybrid: ``item_tower.safetensors`` (the item text table, the trained adapter,
    the standardisation and the ID-free mask) + ``item_tower.json``; ``load_exported`` reads them."""
    from safetensors.torch import save_file

    from .data.build import load_manifest
    from .model.item_text import prepare

    manifest = load_manifest(cfg.data.path)
    it = prepare(cfg, manifest, log=lambda *_: None)
    tower = {k[len(TOWER_PREFIX):]: v for k, v in state["state_dict"].items() if k.startswith(TOWER_PREFIX)}
    if not tower:
        raise RecipeError(f"checkpoint holds no '{TOWER_PREFIX}*' weights although model.items={cfg.model.items}")
    import polars as pl
    import torch

    counts = pl.read_parquet(Path(cfg.data.path) / manifest.get("item_file", "items.parquet"), columns=["idx", "train_count"]).sort("idx")
    id_free = torch.cat([torch.zeros(1, dtype=torch.bool), torch.tensor((counts["train_count"] == 0).to_list(), dtype=torch.bool)])
    tensors = {"table": it.table.contiguous(), "id_free": id_free.to(torch.uint8)}
    tensors.update({f"tower.{k}": v.detach().float().contiguous() for k, v in tower.items()})
    save_file(tensors, str(out / "item_tower.safetensors"))
    (out / "item_tower.json").write_text(json.dumps({
        "mode": cfg.model.items, "adapter": cfg.model.item_text.adapter, "num_items": vocab.num_items,
        "cold_head": bool(cfg.model.item_text.cold_head),
        "template": cfg.data.item_text.template, "encoder": cfg.model.item_text.encoder, "table_key": it.key,
        "note": "scores = ecomtrain.export.load_exported(DIR)(items, positions); text vectors = adapter((table - mu) / sd)",
    }, indent=1))


def load_exported(folder: str | Path, dtype=None):
    """An exported folder -> ``model.backbone.ItemLM`` in eval mode (id, text or hybrid; ``dtype``: of the LM weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    from .model.backbone import ItemLM, ItemVocab

    folder = Path(folder)
    lm = AutoModelForCausalLM.from_pretrained(str(folder), **({"dtype": dtype} if dtype is not None else {})).eval()
    meta_file = folder / "ecomtrain_export.json"
    info = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    # a folder without ecomtrain_export.json: an adapter/ subfolder is taken as non-merged
    adapter = info.get("adapter", "adapter" if (folder / "adapter").is_dir() else None)
    if adapter and not info.get("merged"):
        # a non-merged adapter export: DIR's weights are the base model, the trained model is base + adapter
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, str(folder / adapter)).eval()
    iv = json.loads((folder / "item_vocab.json").read_text())
    mode, tower = "id", None
    if (folder / "item_tower.json").is_file():
        from safetensors.torch import load_file

        from .model.items import ItemTower

        meta = json.loads((folder / "item_tower.json").read_text())
        t = load_file(str(folder / "item_tower.safetensors"))
        mode = meta["mode"]
        tower = ItemTower(t["table"], lm.config.hidden_size, meta["adapter"], t["id_free"].bool(), cold_head=meta.get("cold_head", False))
        missing, unexpected = tower.load_state_dict({k[len("tower."):]: v for k, v in t.items() if k.startswith("tower.")}, strict=False)
        if missing or unexpected:  # an adapter or cold head left at its random init would score silently wrong
            raise ValueError(f"{folder / 'item_tower.safetensors'} does not match {folder / 'item_tower.json'} "
                             f"(mode {mode}, adapter {meta['adapter']}): missing tower.{missing[:5]}, unexpected tower.{unexpected[:5]}")
    vocab = ItemVocab(iv["num_items"], iv["first_item_token_id"], iv["pad_token_id"], tokens=mode != "text")
    return ItemLM(lm, vocab, mode=mode, tower=tower).eval()


README = """# {name}: exported by ecomtrain

A Hugging Face causal LM whose vocabulary holds the shop's items as tokens. Loads with
plain transformers (no ecomtrain needed):

```python
import json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{out}").eval()
tok = AutoTokenizer.from_pretrained("{out}")
iv = json.load(open("{out}/item_vocab.json"))
first, n = iv["first_item_token_id"], iv["num_items"]
history = [iv["item_id_to_token_id"][str(i)] for i in RAW_ITEM_IDS]   # oldest first
with torch.no_grad():
    logits = model(input_ids=torch.tensor([history])).logits[0, -1, first:first + n]
top = [iv["token_id_to_item_id"][str(first + j)] for j in logits.topk(10).indices.tolist()]
```

- `item_vocab.json`: token id <-> raw item id (from the dataset's items.parquet).
- `items.parquet`: the dataset's catalog (ids, titles, columns), read by `ecomtrain recommend`.
- `ecomtrain_export.json`: run, checkpoint, step, strategy and precision it came from.
- Weights: fp32 consolidated from the checkpoint (DeepSpeed shards merged with zero_to_fp32).
- Training task: {task}; history length seen in training: {max_history} items.
"""


ADAPTER_README = """
## Adapter ({method})

{merged} `adapter/` is the peft adapter (safetensors; the item-token rows are in it):

```python
from peft import PeftModel
base = AutoModelForCausalLM.from_pretrained("{out}")
model = PeftModel.from_pretrained(base, "{out}/adapter").eval()   # the trained model, on a non-merged export
```
"""


def export(run_dir: str | Path, out: str | Path, ckpt: str = "last", merge: bool = False, force: bool = False,
           overrides: Optional[list[str]] = None) -> Path:
    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / "recipe.yaml").is_file():
        raise RecipeError(f"{run_dir}: not a run directory (no recipe.yaml)")
    if out.exists() and any(out.iterdir()) and not force:
        raise RecipeError(f"{out}: exists and is not empty (pass --force to replace it)")
    lm, vocab, tok, cfg, path, state = load_trained_lm(run_dir, ckpt, overrides)

    # write next to the target and rename when complete (a half-written export is never seen)
    tmp = out.with_name(".tmp-" + out.name)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    lm = finalize_for_export(lm, merge, adapter_dir=tmp / "adapter", state=state, base_path=str(out.resolve()))
    lm.config.pad_token_id = vocab.pad_token_id
    lm.save_pretrained(tmp, safe_serialization=True)
    (tok if tok is not None else item_tokenizer(vocab.num_items)).save_pretrained(tmp)
    (tmp / "item_vocab.json").write_text(json.dumps(item_vocab_json(cfg, vocab), indent=1))
    if cfg.model.items != "id":
        write_item_tower(tmp, cfg, vocab, state)
    tc = cfg.trainer
    meta = {
        "run_dir": str(run_dir.resolve()), "checkpoint": str(path), "global_step": state.get("global_step"),
        "epoch": state.get("epoch"), "strategy": tc.strategy.name,
        "zero_stage": tc.strategy.zero_stage if tc.strategy.name == "deepspeed" else None,
        "precision": tc.precision, "finetune": cfg.finetune.method, "merged": bool(merge),
        "adapter": "adapter" if (tmp / "adapter").is_dir() else None, "max_history": cfg.data.max_history,
    }
    copy_catalog(cfg, tmp / "items.parquet")  # ids, titles, columns for `ecomtrain recommend` filters
    (tmp / "ecomtrain_export.json").write_text(json.dumps(meta, indent=2))
    readme = README.format(name=run_dir.name, out=out, task=", ".join(t.name for t in cfg.task), max_history=cfg.data.max_history)
    if (tmp / "adapter").is_dir():
        readme += ADAPTER_README.format(out=out, method=cfg.finetune.method, merged=(
            "These weights have the adapter merged in: the snippet above is the trained model."
            if merge else "These weights are the base model (adapter removed): load the adapter on top of them."))
    (tmp / "README.md").write_text(readme)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
