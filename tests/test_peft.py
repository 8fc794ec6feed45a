"""Fine-tuning methods (model/adapters.py, train/adalora.py, train/peft_export.py), single process.

    OMP_NUM_THREADS=1 pytest tests/test_peft.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from ecomtrain.config import RecipeError, validate_tree
from ecomtrain.model.adapters import (
    DEFAULT_TARGET_MODULES,
    FinetuneError,
    apply_finetune_method,
    check_method_supported,
    export_adapter,
    item_token_indices,
)
from ecomtrain.model.backbone import ItemLM, ItemVocab, build_causal_lm

N_ITEMS = 30


def cfg_for(method: str, **finetune):
    tree = {"data": {"path": "unused"}, "finetune": {"method": method, **finetune},
            "model": {"backbone": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64}}}
    return validate_tree(tree)


def tiny(method: str, tie: bool = True, **finetune):
    cfg = cfg_for(method, **finetune)
    cfg.model.backbone.tie_embeddings = tie
    torch.manual_seed(0)
    lm, vocab, _ = build_causal_lm(cfg.model, N_ITEMS)
    return cfg, lm, vocab


def batch():
    g = torch.Generator().manual_seed(1)
    items = torch.randint(1, N_ITEMS + 1, (4, 8), generator=g)
    items[0, 5:] = 0
    return items


def loss_of(net: ItemLM, items: torch.Tensor) -> torch.Tensor:
    labels = torch.roll(items, -1, dims=1)
    labels[:, -1] = 0
    mask = (labels > 0) & (items > 0)
    return torch.nn.functional.cross_entropy(net.item_logits(net.hidden(items)[mask]), labels[mask] - 1)


@pytest.mark.parametrize("method", ["lora", "dora", "adalora"])
@pytest.mark.parametrize("tie", [True, False])
def test_adapter_methods_freeze_backbone_and_train_item_rows(method, tie):
    cfg, lm, vocab = tiny(method, tie=tie)
    items = batch()
    with torch.no_grad():
        before = ItemLM(lm, vocab).eval()(items)
    lm = apply_finetune_method(lm, cfg, vocab)
    net = ItemLM(lm, vocab)
    with torch.no_grad():
        after = net.eval()(items)
    torch.testing.assert_close(after, before)  # adapters start as the identity (B=0 / E=0)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n or "trainable_tokens_delta" in n) for n in trainable), trainable
    for proj in DEFAULT_TARGET_MODULES["qwen2"]:
        assert any(f"{proj}.lora_A" in n for n in trainable), proj
    # item-token rows of the input embedding and of the head train (tied: one shared tensor)
    deltas = [n for n in trainable if "trainable_tokens_delta" in n]
    assert any("embed_tokens" in n for n in deltas)
    assert any("lm_head" in n for n in deltas) == (not tie)
    net.train()
    loss_of(net, items).backward()
    for n, p in net.named_parameters():
        if "trainable_tokens_delta" in n:
            assert p.shape == (N_ITEMS, 32) and p.grad is not None and p.grad.abs().sum() > 0, n
    # tied: the head reads the embedding's item rows (one tensor); untied: it has its own
    (head_to_embed,) = torch.autograd.grad(
        net.item_logits(torch.randn(2, 32)).sum(),
        [p for n, p in net.named_parameters() if "embed_tokens" in n and "trainable_tokens_delta" in n],
        allow_unused=True,
    )
    assert (head_to_embed is not None and head_to_embed.abs().sum() > 0) == tie


def test_full_trains_everything():
    cfg, lm, vocab = tiny("full")
    out = apply_finetune_method(lm, cfg, vocab)
    assert out is lm and all(p.requires_grad for p in out.parameters())


def test_pretrained_offset_only_item_rows_change():
    """A 'pretrained' vocabulary of 100 text tokens + items: only rows offset.. train."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = cfg_for("lora")
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(Qwen2Config(
        vocab_size=100 + N_ITEMS, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=0))
    vocab = ItemVocab(N_ITEMS, 100, 0)
    assert item_token_indices(vocab) == list(range(100, 100 + N_ITEMS))
    base_rows = lm.get_input_embeddings().weight.detach().clone()
    lm = apply_finetune_method(lm, cfg, vocab)
    net = ItemLM(lm, vocab)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1.0)
    loss_of(net, batch()).backward()
    opt.step()
    merged = lm.merge_and_unload().get_input_embeddings().weight.detach()
    assert torch.equal(merged[:100], base_rows[:100])  # text rows untouched
    assert not torch.allclose(merged[100:], base_rows[100:])  # item rows trained


def test_target_modules_custom_and_bad():
    cfg, lm, vocab = tiny("lora", target_modules=["q_proj", "v_proj"])
    lm = apply_finetune_method(lm, cfg, vocab)
    names = {n for n, _ in lm.named_parameters() if "lora_A" in n}
    assert names and all(("q_proj" in n or "v_proj" in n) for n in names)
    cfg, lm, vocab = tiny("lora", target_modules=["no_such_proj"])
    with pytest.raises(FinetuneError, match="finetune.target_modules"):
        apply_finetune_method(lm, cfg, vocab)


def test_qlora_needs_cuda():
    cfg = cfg_for("qlora")
    with pytest.raises(FinetuneError, match="qlora.*CUDA"):
        check_method_supported(cfg, cuda_available=False)
    assert isinstance(FinetuneError("x"), RecipeError)  # the CLI prints it as a recipe error


def test_adalora_schema():
    with pytest.raises(RecipeError, match="target_r"):
        cfg_for("adalora", adalora={"init_r": 4, "target_r": 8})


def _trained_peft(method: str):
    """A peft model whose every trainable tensor moved (a stand-in for training)."""
    cfg, lm, vocab = tiny(method, **({"adalora": {"init_r": 4, "target_r": 2}} if method == "adalora" else {}))
    lm = apply_finetune_method(lm, cfg, vocab)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, p in lm.named_parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    if method == "adalora":  # a pruned pattern: rank 1 of 4 everywhere, 0 in the first module
        tuner = lm.base_model
        pattern = {}
        for i, (n, p) in enumerate((n, p) for n, p in tuner.model.named_parameters() if "lora_E" in n):
            keep = [j < (0 if i == 0 else 1) for j in range(p.shape[0])]
            with torch.no_grad():
                p[[not k for k in keep]] = 0
            pattern[n] = keep
        tuner.peft_config["default"].rank_pattern = pattern
    return lm, vocab


def test_export_reloads_with_plain_peft_and_merges(tmp_path):
    """Adapter -> fresh process, plain transformers + peft (no ecomtrain) -> same logits; merged too."""
    items = batch()
    refs, paths = {}, {}
    for method in ("lora", "dora", "adalora"):
        lm, vocab = _trained_peft(method)
        with torch.no_grad():
            refs[method] = ItemLM(lm, vocab).eval()(items)
        paths[method] = export_adapter(lm, tmp_path / method, merge=True)
        assert (tmp_path / method / "adapter" / "adapter_model.safetensors").is_file()
        assert not list((tmp_path / method / "adapter").glob("*.bin"))
    torch.save({"items": items, "refs": refs}, tmp_path / "ref.pt")
    code = textwrap.dedent(f"""
        import json, torch, peft, transformers
        d = torch.load({str(tmp_path / 'ref.pt')!r})
        items = d["items"]; mask = (items > 0).long(); out = {{}}
        for method, p in {paths!r}.items():
            base = transformers.AutoModelForCausalLM.from_pretrained(p["base"])
            pm = peft.PeftModel.from_pretrained(base, p["adapter"]).eval()
            merged = transformers.AutoModelForCausalLM.from_pretrained(p["merged"]).eval()
            with torch.no_grad():
                a = pm(input_ids=items, attention_mask=mask).logits[..., 1:{N_ITEMS + 1}]
                b = merged(input_ids=items, attention_mask=mask).logits[..., 1:{N_ITEMS + 1}]
            ref = d["refs"][method]
            out[method] = [(a - ref).abs().max().item(), (b - ref).abs().max().item()]
        print(json.dumps(out))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    err = json.loads(out.stdout.strip().splitlines()[-1])
    for method, ref in refs.items():
        assert ref.abs().max() > 0.1
        assert max(err[method]) < 1e-5, (method, err[method])


def test_adalora_allocates_once_per_optimizer_step(tiny_dataset, tmp_path):
    """accumulate_grad_batches=2: one allocation per optimizer step, budget init_r -> target_r per module."""
    import lightning as L

    from ecomtrain.data.build import load_manifest
    from ecomtrain.train.adalora import AdaLoraAllocator
    from ecomtrain.train.datamodule import ShardDataModule
    from ecomtrain.train.module import RecModule, make_task

    tree = {
        "data": {"path": str(tiny_dataset), "batch_size": 16, "shuffle_buffer": 0},
        "model": {"backbone": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}},
        "finetune": {"method": "adalora", "adalora": {"init_r": 4, "target_r": 1, "tinit": 1, "tfinal": 1}},
        "trainer": {"accelerator": "cpu", "accumulate_grad_batches": 2, "max_epochs": 1},
    }
    cfg = validate_tree(tree)
    manifest = load_manifest(tiny_dataset)
    n = int(manifest["num_items"])
    module = RecModule(tree, n)
    alloc = AdaLoraAllocator()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, accumulate_grad_batches=2, limit_val_batches=0,
        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[alloc], default_root_dir=str(tmp_path),
    )
    trainer.fit(module, datamodule=ShardDataModule(cfg, make_task(cfg, n), manifest))
    steps = trainer.global_step
    assert steps >= 4 and [h["step"] for h in alloc.history] == list(range(1, steps + 1))
    tuner = module.net.lm.base_model
    assert tuner.peft_config["default"].total_step == steps  # from estimated_stepping_batches
    modules = 7  # one layer x q,k,v,o,gate,up,down
    budgets = [h["budget"] for h in alloc.history]
    assert budgets[0] == 4 * modules and budgets[-1] == 1 * modules
    assert all(a >= b for a, b in zip(budgets, budgets[1:]))
    pattern = tuner.peft_config["default"].rank_pattern
    assert sum(sum(v) for v in pattern.values()) == modules
    for name, p in tuner.model.named_parameters():  # pruned singular values are exactly zero
        if "lora_E" in name:
            keep = torch.tensor(pattern[name])
            assert torch.all(p.detach()[~keep] == 0)
