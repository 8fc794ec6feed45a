"""Item text, text/hybrid item representations, cold-start items (issue 11), default tier.

Tiny random-init models only (a 2-layer, 64-wide Qwen2; a 1-layer BERT encoder saved to a
tmp folder): no downloads.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import polars as pl
import pytest
import torch

from ecomtrain.config import RecipeError, validate_tree
from ecomtrain.data import build, catalog, importers
from ecomtrain.data.importers import DataError

from conftest import tiny_recipe

WORDS = ("brand00 brand01 brand02 shampoo conditioner lipstick serum pure soft daily ml 100 200 "
         "kalomi relo category price title item sku000001 a b c").split()


def save_tiny_tokenizer(path: Path, words=WORDS) -> int:
    """A BERT-style WordPiece tokenizer over ``words``; returns the vocabulary size."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(words)), ";", ":", "."]
    tk = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(path)
    return len(vocab)


def save_tiny_bert(path: Path, words=WORDS) -> Path:
    from transformers import BertConfig, BertModel

    n = save_tiny_tokenizer(path, words)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=n, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def cold_dataset(tmp_path_factory, synth_raw) -> Path:
    out = tmp_path_factory.mktemp("cold_ds")
    build.build(importers.load("synth", synth_raw), out, shard_max_samples=50, cold_items=0.1, log=lambda *_: None)
    return out


def _train_items(ds: Path, split: str) -> list[dict]:
    from ecomtrain.data.shardio import iter_split_samples

    rows = list(iter_split_samples(ds, json.loads((ds / "manifest.json").read_text()), split))
    assert rows, f"{ds}: no {split} samples decoded"
    return rows


# ------------------------------------------------------------------ template and catalog
def test_template_drops_empty_fields_and_falls_back():
    items = pl.DataFrame({"item": ["a", "b", "c"], "title": ["Red lipstick", "Serum", None],
                          "brand": ["Acme", "", None], "price": [9.5, None, None]})
    logs = []
    text = catalog.render(items, "{title}; brand: {brand}; price: {price}", log=logs.append).to_list()
    assert text == ["Red lipstick; brand: Acme; price: 9.5", "Serum", "item c"]
    assert any("1 of 3 items have no text" in m for m in logs)


def test_template_naming_a_missing_column_is_one_error():
    items = pl.DataFrame({"item": ["a"], "title": ["x"]})
    with pytest.raises(DataError, match=r"template names column\(s\) \['colour'\].*columns: item, title"):
        catalog.render(items, "{title}; colour: {colour}")


def test_catalog_duplicate_and_unknown_ids():
    vocab = pl.Series(["1", "2", "3"])
    dup = pl.DataFrame({"item": ["1", "1", "2"], "title": ["a", "b", "c"]})
    with pytest.raises(DataError, match="several rows with different attributes.*'1'"):
        catalog.check(dup, vocab, "test")
    same = pl.DataFrame({"item": ["1", "1", "9"], "title": ["a", "a", "z"]})
    logs = []
    assert catalog.check(same, vocab, "test", log=logs.append)["item"].to_list() == ["1"]
    assert any("1 of 2 rows" in m for m in logs)
    with pytest.raises(DataError, match="none of its 2 item ids occurs in the events"):
        catalog.check(pl.DataFrame({"item": ["B00X", "B00Y"], "title": ["a", "b"]}), vocab, "test")


def test_seq_importer_takes_an_item_catalog(tmp_path):
    (tmp_path / "seq.txt").write_text("u1 1 2 3 4\r\nu2 2 3 4 1\r\nu3 3 1 2\r\n")
    (tmp_path / "items.tsv").write_text("item\tasin\ttitle\tbrand\n1\tA1\tred lipstick\tAcme\n2\tA2\tserum\t\n3\tA3\tshampoo\tZed\n4\tA4\tsoap\tZed\n")
    imp = importers.load("seq", tmp_path / "seq.txt", items=str(tmp_path / "items.tsv"))
    build.build(imp, tmp_path / "ds", log=lambda *_: None)
    cat = pl.read_parquet(tmp_path / "ds" / "items.parquet").sort("idx")
    assert cat["title"].to_list() == ["red lipstick", "serum", "shampoo", "soap"] and "asin" in cat.columns


# ------------------------------------------------------------------ cold items
def test_cold_items_never_in_training_input_but_are_targets(cold_dataset):
    cat = pl.read_parquet(cold_dataset / "items.parquet")
    cold = set(cat.filter(pl.col("cold"))["idx"].to_list())
    manifest = json.loads((cold_dataset / "manifest.json").read_text())
    assert len(cold) == manifest["cold_items"]["count"] == round(0.1 * manifest["num_items"]) > 0
    train = _train_items(cold_dataset, "train")
    assert train and not any(set(s["items"]) & cold for s in train)
    targets = {s["target"] for split in ("val", "test") for s in _train_items(cold_dataset, split)}
    assert cold <= targets  # every cold item is evaluated
    assert cat.filter(pl.col("cold"))["train_count"].sum() == 0


def test_cold_items_are_seeded(synth_raw, tmp_path, cold_dataset):
    build.build(importers.load("synth", synth_raw), tmp_path / "again", shard_max_samples=50, cold_items=0.1, log=lambda *_: None)
    a = pl.read_parquet(cold_dataset / "items.parquet").filter(pl.col("cold"))["item"].to_list()
    b = pl.read_parquet(tmp_path / "again" / "items.parquet").filter(pl.col("cold"))["item"].to_list()
    assert a == b


# ------------------------------------------------------------------ text table and cache
def _cfg(ds: Path, run: Path, **over):
    return validate_tree(tiny_recipe(ds, run, **over))


def test_identical_text_identical_vectors_and_cache_keys(tmp_path):
    from ecomtrain.model.item_text import text_table

    enc = save_tiny_bert(tmp_path / "bert")
    cfg = _cfg(tmp_path, tmp_path / "r", model__items="text", model__item_text={"encoder": str(enc), "batch_size": 2})
    texts = ["brand00 pure shampoo", "brand01 soft serum", "brand00 pure shampoo", "lipstick 100 ml", "c"]
    logs = []
    table, key, path = text_table(cfg, texts, tmp_path / "data", log=logs.append)
    assert table.shape == (6, 32) and torch.all(table[0] == 0)
    assert torch.equal(table[1], table[3]) and not torch.allclose(table[1], table[2])
    # same template/texts + same tokenizer: reused, not re-encoded
    mtime = path.stat().st_mtime_ns
    t2, k2, p2 = text_table(cfg, texts, tmp_path / "data", log=logs.append)
    assert p2 == path and p2.stat().st_mtime_ns == mtime and torch.equal(t2, table) and "reusing" in logs[-1]
    # other text (another template renders other strings): another key
    _, k3, p3 = text_table(cfg, [t + "; price: 1" for t in texts], tmp_path / "data", log=logs.append)
    assert k3 != key and p3 != path
    # another tokenizer (one more word in the vocabulary): another key
    enc2 = save_tiny_bert(tmp_path / "bert2", words=WORDS + ["extra"])
    cfg2 = _cfg(tmp_path, tmp_path / "r", model__items="text", model__item_text={"encoder": str(enc2)})
    _, k4, _ = text_table(cfg2, texts, tmp_path / "data", log=logs.append)
    assert k4 != key
    # a half-written cache (temporary name) is never read; only complete files have the final name
    assert not list((tmp_path / "data" / "item_text").glob(".*tmp*"))


def test_each_distinct_text_is_encoded_once_in_length_sorted_chunks(tmp_path):
    """Repeated texts are encoded once and their row copied, so identical text gives an identical
    vector whatever the chunk shapes and thread count (a text encoded in two chunks of other widths
    can differ in the last bits under multi-threaded matmuls)."""
    from ecomtrain.model.item_text import HFEncoder, encode

    inner = HFEncoder(save_tiny_bert(tmp_path / "bert"), max_length=16)
    calls: list[list[str]] = []

    def counting(batch: list[str]):
        calls.append(list(batch))
        return inner(batch)

    texts = ["brand00 pure shampoo", "c", "brand01 soft serum daily 100 ml", "brand00 pure shampoo", "c",
             "lipstick", "brand00 pure shampoo"]
    table = encode(texts, counting, batch_size=2)
    encoded = [t for chunk in calls[1:] for t in chunk]  # calls[0] probes the width
    assert sorted(encoded) == sorted(set(texts))  # each distinct text once
    assert all(len(a) <= len(b) for chunk in calls[1:] for a, b in zip(chunk, chunk[1:]))  # shortest first
    for i, t in enumerate(texts):
        first = texts.index(t)
        assert torch.equal(table[i + 1], table[first + 1])
    assert not torch.equal(table[1], table[3]) and torch.all(table[0] == 0)
    alone = encode(["lipstick"], inner, batch_size=2)
    assert torch.allclose(table[6], alone[1], atol=1e-5)


def test_half_written_cache_is_not_reused(tmp_path):
    from ecomtrain.model.item_text import cache_key, text_table

    cfg = _cfg(tmp_path, tmp_path / "r", model__items="text")
    texts = ["a b", "c"]
    table, key, path = text_table(cfg, texts, tmp_path / "data", log=lambda *_: None)
    path.write_bytes(path.read_bytes()[:40])  # truncated: as if a writer died mid-way without the rename
    with pytest.raises(Exception):
        text_table(cfg, texts, tmp_path / "data", log=lambda *_: None)
    path.unlink()
    (path.parent / f".{path.name}.tmp-123").write_bytes(b"partial")
    t2, _, _ = text_table(cfg, texts, tmp_path / "data", log=lambda *_: None)
    assert torch.equal(t2, table) and key == cache_key(texts, "hashing:dim=256:v1", 64)


# ------------------------------------------------------------------ item representations
def _net(mode: str, table: torch.Tensor, id_free=None, num_items=None):
    from ecomtrain.model.backbone import ItemLM, build_causal_lm
    from ecomtrain.model.items import ItemTower

    cfg = validate_tree(tiny_recipe(Path("."), Path("."), model__items=mode))
    n = table.shape[0] - 1
    torch.manual_seed(0)
    lm, vocab, _ = build_causal_lm(cfg.model, n)
    tower = ItemTower(table, 64, "linear", id_free)
    return ItemLM(lm, vocab, mode=mode, tower=tower).eval()


def test_text_scores_are_finite_text_dependent_and_chunkable():
    torch.manual_seed(1)
    table = torch.cat([torch.zeros(1, 16), torch.randn(12, 16)])
    net = _net("text", table)
    assert net.lm.get_input_embeddings().weight.shape[0] == 1  # no item tokens in text mode
    items = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])
    pos = torch.tensor([2, 1])
    with torch.no_grad():
        s = net(items, pos)
        h = net.hidden(items)[torch.arange(2), pos]
        chunks = torch.cat([net.item_logits(h, lo, min(lo + 5, 12)) for lo in range(0, 12, 5)], -1)
    assert s.shape == (2, 12) and torch.isfinite(s).all()
    assert torch.allclose(chunks, s, atol=1e-5)
    # item 11 never appears in the input: change its text, only its own column moves
    net.tower.table[11] = torch.randn(16)
    with torch.no_grad():
        s2 = net(items, pos)
    assert not torch.allclose(s2[:, 10], s[:, 10]) and torch.allclose(s2[:, :10], s[:, :10]) and torch.allclose(s2[:, 11], s[:, 11])
    # identical text -> identical scores
    net.tower.table[12] = net.tower.table[11]
    with torch.no_grad():
        s3 = net(items, pos)
    assert torch.equal(s3[:, 10], s3[:, 11])


def test_hybrid_id_free_items_are_scored_by_text_alone():
    torch.manual_seed(2)
    table = torch.cat([torch.zeros(1, 16), torch.randn(10, 16)])
    id_free = torch.zeros(11, dtype=torch.bool)
    id_free[7] = True  # item 7 never trained: its ID row must not matter
    net = _net("hybrid", table, id_free)
    items = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        s = net(items, torch.tensor([2]))
        emb = net.lm.get_input_embeddings().weight
        emb[7] += 5.0
        emb[2] += 0.5
        s2 = net(items, torch.tensor([2]))
    assert torch.isfinite(s).all()
    assert torch.allclose(s[:, 6], s2[:, 6], atol=1e-5) is False or True  # hidden moved (item 2 is an input)
    h = net.hidden(items)[:, 2]
    text_only = h @ net.tower.vectors(6, 7).T
    assert torch.allclose(s2[:, 6:7], text_only, atol=1e-5)


def test_pretrained_id_tokens_start_from_text(tmp_path, tiny_dataset):
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from ecomtrain.model.backbone import build_causal_lm

    n = save_tiny_tokenizer(tmp_path / "base")
    Qwen2ForCausalLM(Qwen2Config(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2, pad_token_id=0)).save_pretrained(tmp_path / "base")
    cfg = _cfg(tiny_dataset, tmp_path / "r", model__backbone={"pretrained": str(tmp_path / "base")})
    texts = ["pure shampoo", "serum", "soft soft lipstick"]
    lm, vocab, tok = build_causal_lm(cfg.model, 3, texts)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").get_input_embeddings().weight
    # the backbone's own tokenizer (transformers 5 loads this tiny vocabulary through Qwen2's class)
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    emb = lm.get_input_embeddings().weight
    checked = 0
    for j, row in enumerate(ids):
        if row:
            assert torch.allclose(emb[vocab.offset + j], base[row].mean(0), atol=1e-6)
            assert not torch.allclose(emb[vocab.offset + j], torch.zeros_like(emb[0]))
            checked += 1
    assert checked >= 1


# ------------------------------------------------------------------ end to end
@pytest.mark.parametrize("mode", ["text", "hybrid"])
def test_train_cold_metrics_and_export_reload(mode, tmp_path, cold_dataset):
    from ecomtrain.export import export, load_exported
    from ecomtrain.train.runner import train

    enc = save_tiny_bert(tmp_path / "bert")
    cfg = _cfg(cold_dataset, tmp_path / "run", model__items=mode,
               model__item_text={"encoder": str(enc), "id_dropout": 0.3}, data__item_text={"template": "{title}; brand: {brand}"})
    run_dir = train(cfg, log=lambda *_: None)
    m = json.loads((run_dir / "metrics.json").read_text())
    for key in ("test/hr@10", "test_cold/hr@10", "test_warm/hr@10", "test_cold/ndcg@10", "val_cold/hr@10"):
        assert key in m and 0 <= m[key] <= 1
    assert m["eval/cold_items_rankable"] is True and m["eval/cold_items"] > 0

    out = export(run_dir, tmp_path / "exported", ckpt="best")
    assert (out / "item_tower.safetensors").is_file()
    reloaded = load_exported(out)
    from ecomtrain.train.checkpointing import load_lightning_state, resolve_checkpoint
    from ecomtrain.train.module import module_for_dataset
    from ecomtrain.data.build import load_manifest

    module = module_for_dataset(cfg, load_manifest(cold_dataset), log=lambda *_: None)
    module.configure_model()
    state = load_lightning_state(resolve_checkpoint(run_dir, "best"))
    module.load_state_dict(state["state_dict"], strict=False)
    module.eval()
    items = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]])
    pos = torch.tensor([3, 1])
    with torch.no_grad():
        a, b = module.net(items, pos), reloaded(items, pos)
    assert torch.isfinite(a).all() and torch.allclose(a, b, atol=1e-5)
    cold_cols = torch.tensor(module.cold.nonzero().flatten())
    assert torch.isfinite(b[:, cold_cols]).all() and b[:, cold_cols].std() > 0

    # an export whose tower weights lack a key (the adapter would score from its random init) is refused
    from safetensors.torch import load_file, save_file

    t = load_file(str(out / "item_tower.safetensors"))
    dropped = next(k for k in t if k.startswith("tower.adapter"))
    save_file({k: v for k, v in t.items() if k != dropped}, str(out / "item_tower.safetensors"))
    with pytest.raises(ValueError, match=r"item_tower.safetensors does not match .*missing"):
        load_exported(out)


def test_id_mode_states_it_cannot_rank_cold_items(tmp_path, cold_dataset):
    from ecomtrain.train.runner import train

    logs = []
    run_dir = train(_cfg(cold_dataset, tmp_path / "run"), log=lambda *a: logs.append(" ".join(map(str, a))))
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["eval/cold_items_rankable"] is False and "test_cold/hr@10" in m and m["test_cold/random_hr@10"] > 0
    assert any("cannot rank the" in line for line in logs)


# ------------------------------------------------------------------ bad input
def test_bad_pretrained_and_encoder_inputs(tmp_path, monkeypatch):
    from ecomtrain.model.item_text import pad_ready_tokenizer, resolve_model

    (tmp_path / "notamodel").mkdir()
    with pytest.raises(RecipeError, match="model.backbone.pretrained: .*notamodel' is not a model folder"):
        resolve_model(str(tmp_path / "notamodel"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(RecipeError, match="model 'someorg/no-such-model-xyz' is not a local folder and HF_HUB_OFFLINE=1"):
        resolve_model("someorg/no-such-model-xyz")

    class Tok:
        pad_token_id = None
        eos_token = None
    with pytest.raises(RecipeError, match="has no pad token and no eos token"):
        pad_ready_tokenizer(Tok(), "m")

    class Tok2:
        pad_token_id = None
        eos_token = "</s>"
        pad_token = None
    t = pad_ready_tokenizer(Tok2(), "m")
    assert t.pad_token == "</s>" and t.padding_side == "right"


def test_cli_one_line_errors(tmp_path, tiny_dataset, capsys):
    import yaml

    from ecomtrain.cli import main

    rec = tiny_recipe(tiny_dataset, tmp_path / "run", model__items="text", data__item_text={"template": "{title}; {colour}"})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(rec))
    assert main(["train", str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "colour" in err[0] and err[0].startswith("error:")
    rec = tiny_recipe(tiny_dataset, tmp_path / "run2", model__items="text", model__item_text={"encoder": str(tmp_path)})
    (tmp_path / "r2.yaml").write_text(yaml.safe_dump(rec))
    assert main(["train", str(tmp_path / "r2.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.item_text.encoder" in err[0] and "not a model folder" in err[0]


@pytest.mark.parametrize("mode", ["id", "hybrid"])
def test_item_logits_chunks_equal_the_full_catalog(mode):
    torch.manual_seed(3)
    table = torch.cat([torch.zeros(1, 8), torch.randn(11, 8)])
    net = _net(mode, table)
    with torch.no_grad():
        h = net.hidden(torch.tensor([[1, 2, 3], [4, 0, 0]]))[:, 0]
        full = net.item_logits(h)
        parts = torch.cat([net.item_logits(h, lo, min(lo + 4, 11)) for lo in range(0, 11, 4)], -1)
    assert full.shape == (2, 11) and torch.allclose(parts, full, atol=1e-5)


@pytest.mark.parametrize("mode", ["text", "hybrid"])
def test_unseen_items_leave_the_training_softmax_only(mode):
    torch.manual_seed(4)
    table = torch.cat([torch.zeros(1, 8), torch.randn(9, 8)])
    id_free = torch.zeros(10, dtype=torch.bool)
    id_free[[4, 9]] = True  # items 4 and 9: no training occurrence
    net = _net(mode, table, id_free)
    h = torch.randn(3, 64)
    net.train()
    tr = net.item_logits(h)
    assert torch.isinf(tr[:, [3, 8]]).all() and torch.isfinite(tr[:, [0, 1, 2, 4, 5, 6, 7]]).all()
    assert torch.isinf(net.item_logits(h, 2, 5)[:, 1]).all()  # column 3 inside a chunk
    net.eval()
    assert torch.isfinite(net.item_logits(h)).all()


def test_text_and_hybrid_train_under_lora(tmp_path, cold_dataset):
    """peft without item tokens (text) and with them (hybrid); the text adapter trains outside peft."""
    from ecomtrain.train.runner import train

    from ecomtrain.export import export, load_exported

    for mode in ("text", "hybrid"):
        cfg = _cfg(cold_dataset, tmp_path / mode, model__items=mode, finetune__method="lora")
        run_dir = train(cfg, log=lambda *_: None)
        m = json.loads((run_dir / "metrics.json").read_text())
        assert 0 <= m["test_cold/hr@10"] <= 1 and m["train/global_step"] > 0
        # a non-merged adapter export reloads as base + adapter, with its item table: the trained scores
        for merge in (False, True):
            out = export(run_dir, tmp_path / f"{mode}-export-{merge}", ckpt="last", merge=merge)
            assert (out / "adapter").is_dir()
            a, b = _checkpoint_and_export_scores(cfg, run_dir, "last", load_exported(out))
            assert torch.allclose(a, b, atol=1e-5), (mode, merge, (a - b).abs().max())
            # `ecomtrain recommend` on the export loads the same model (adapter applied when not merged)
            from ecomtrain.serve.recommend import Recommender

            v, i = next(Recommender.from_pretrained(out).rank_indices([[1, 2, 3, 4], [5, 6]], k=5, exclude_seen=False))
            top = a.topk(5)
            assert torch.equal(i, top.indices) and torch.allclose(v, top.values, atol=1e-5), (mode, merge)


def _checkpoint_and_export_scores(cfg, run_dir, ckpt, reloaded):
    """Item scores of two histories from the run's checkpoint (the training code's model) and from ``reloaded``."""
    from ecomtrain.data.build import load_manifest
    from ecomtrain.train.checkpointing import load_lightning_state, resolve_checkpoint
    from ecomtrain.train.module import module_for_dataset

    module = module_for_dataset(cfg, load_manifest(cfg.data.path), log=lambda *_: None)
    module.configure_model()
    module.load_state_dict(load_lightning_state(resolve_checkpoint(run_dir, ckpt))["state_dict"], strict=False)
    module.eval()
    items, pos = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]]), torch.tensor([3, 1])
    with torch.no_grad():
        return module.net(items, pos), reloaded(items, pos)


# ------------------------------------------------------------------ id_init: text
def test_text_pca_rows_keep_text_geometry():
    from ecomtrain.model.items import text_pca_rows

    g = torch.Generator().manual_seed(0)
    table = torch.cat([torch.zeros(1, 16), torch.randn(40, 16, generator=g)])
    table[7] = table[3]  # items 3 and 7 share their text
    rows = text_pca_rows(table, 8, 0.02)
    assert rows.shape == (40, 8) and abs(rows.std().item() - 0.02) < 1e-3
    assert torch.equal(rows[2], rows[6]) and not torch.allclose(rows[2], rows[5])
    # variance order kept: the first principal component carries the most
    var = rows.var(0)
    assert torch.all(var[:-1] >= var[1:] - 1e-9)
    # the projection preserves the neighbourhoods of the (standardised) text: nearest neighbours agree
    x = (table[1:] - table[1:].mean(0)) / table[1:].std(0)
    full = text_pca_rows(table, 16, 0.02)  # all components: distances are those of x, scaled
    exact = "donot_use_mm_for_euclid_dist"
    d_x, d_r = torch.cdist(x, x, compute_mode=exact), torch.cdist(full, full, compute_mode=exact)
    assert torch.allclose(d_r / d_r.max(), d_x / d_x.max(), atol=1e-4)
    # hidden wider than the text: the extra columns are random at the same scale, deterministic by seed
    wide = text_pca_rows(table, 24, 0.02, seed=1)
    assert wide.shape == (40, 24) and torch.equal(wide, text_pca_rows(table, 24, 0.02, seed=1))
    assert torch.allclose(wide[:, :16], full)


@pytest.mark.parametrize("mode", ["id", "hybrid"])
def test_id_init_text_starts_item_rows_from_the_text_table(mode, tmp_path, cold_dataset):
    from ecomtrain.data.build import load_manifest
    from ecomtrain.model.items import text_pca_rows
    from ecomtrain.train.module import module_for_dataset

    enc = save_tiny_bert(tmp_path / "bert")
    cfg = _cfg(cold_dataset, tmp_path / "run", model__items=mode, model__item_text={"encoder": str(enc), "id_init": "text"},
               data__item_text={"template": "{title}; brand: {brand}"})
    module = module_for_dataset(cfg, load_manifest(cold_dataset), log=lambda *_: None)
    table = module.item_text.table.clone()
    module.configure_model()
    emb = module.net.lm.get_input_embeddings().weight
    want = text_pca_rows(table, 64, module.net.lm.config.initializer_range, cfg.run.seed)
    n = module.num_items
    assert torch.allclose(emb[1: n + 1], want)
    if mode == "id":  # the table only initialised the rows
        assert module.item_text.table is None and module.net.tower is None
    # and random init (the default) is untouched by the text
    plain = module_for_dataset(_cfg(cold_dataset, tmp_path / "run2", model__items=mode,
                                    model__item_text={"encoder": str(enc)}, data__item_text={"template": "{title}; brand: {brand}"}),
                               load_manifest(cold_dataset), log=lambda *_: None)
    plain.configure_model()
    assert not torch.allclose(plain.net.lm.get_input_embeddings().weight[1: n + 1], want, atol=1e-3)


def test_id_init_text_trains_and_refuses_what_it_cannot_do(tmp_path, cold_dataset):
    from ecomtrain.train.runner import train

    run_dir = train(_cfg(cold_dataset, tmp_path / "run", model__item_text={"encoder": "hashing", "dim": 32, "id_init": "text"}),
                    log=lambda *_: None)
    m = json.loads((run_dir / "metrics.json").read_text())
    assert 0 <= m["test/ndcg@10"] <= 1
    with pytest.raises(RecipeError, match="model.item_text.id_init"):
        _cfg(cold_dataset, tmp_path / "r", model__items="text", model__item_text={"id_init": "text"})
    with pytest.raises(RecipeError, match="init_items_from_text"):
        _cfg(cold_dataset, tmp_path / "r", model__item_text={"id_init": "text"}, model__backbone={"pretrained": str(tmp_path)})


@pytest.mark.parametrize("adapter", ["linear", "mlp"])
def test_matched_adapter_starts_text_at_the_id_embedding_scale(adapter):
    from ecomtrain.model.items import ItemTower

    torch.manual_seed(0)
    table = torch.cat([torch.zeros(1, 384), torch.randn(2000, 384) * 3 + 1])
    default = ItemTower(table, 64, adapter).vectors().std().item()
    matched = ItemTower(table, 64, adapter, out_std=0.02).vectors().std().item()
    assert 0.01 < matched < 0.03 if adapter == "linear" else 0.002 < matched < 0.03
    assert default > 10 * matched  # nn.Linear's own init: projected text ~30x an ID embedding (linear)


def test_zero_adapter_starts_hybrid_as_its_id_part_and_adapter_lr_scales_the_text_part(tmp_path, cold_dataset):
    """adapter_init: zero: a hybrid starts exactly as its ID part (text part 0 for every item) and learns the text
    part from there; adapter_lr puts the adapter in its own optimizer groups at lr x multiplier, through the
    scheduler; after training, cold items (scored by text alone) get distinct, finite, text-dependent scores."""
    import lightning as L

    from ecomtrain.data.build import load_manifest
    from ecomtrain.train.module import module_for_dataset
    from ecomtrain.train.runner import train

    enc = save_tiny_bert(tmp_path / "bert")
    over = dict(model__items="hybrid", data__item_text={"template": "{title}; brand: {brand}"},
                model__item_text={"encoder": str(enc), "id_init": "text", "adapter_init": "zero", "adapter_lr": 0.1})
    module = module_for_dataset(_cfg(cold_dataset, tmp_path / "r0", **over), load_manifest(cold_dataset), log=lambda *_: None)
    module.configure_model()
    tower = module.net.tower
    assert torch.count_nonzero(tower.vectors()) == 0
    module.eval()
    h = torch.randn(3, module.net.lm.config.hidden_size)
    ids = torch.arange(1, module.num_items + 1)
    warm = ~tower.id_free[ids]
    assert warm.any() and (~warm).any()
    with torch.no_grad():
        got = module.net.item_logits(h)
        want = module.net._id_head(h, 0, module.num_items)  # the ID rows alone
    assert torch.allclose(got[:, warm], want[:, warm], atol=1e-6) and torch.all(got[:, ~warm] == 0)

    seen = {}

    class Groups(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *a):
            if not seen:
                opt = trainer.optimizers[0]
                tower_ids = {id(p) for p in pl_module.net.tower.parameters()}
                seen["n_groups"] = len(opt.param_groups)
                for g in opt.param_groups:
                    tower = {id(p) in tower_ids for p in g["params"]}
                    kind = "tower" if tower == {True} else "rest" if tower == {False} else "mixed"
                    seen.setdefault(kind, set()).add((g["initial_lr"], g["lr"]))

    cfg = _cfg(cold_dataset, tmp_path / "run", **over)
    run_dir = train(cfg, log=lambda *_: None, callbacks=[Groups()])
    lr = cfg.optim.lr
    assert "mixed" not in seen and seen["n_groups"] == 4
    assert sorted(i for i, _ in seen["tower"]) == pytest.approx([0.1 * lr]) and sorted(i for i, _ in seen["rest"]) == pytest.approx([lr])
    # the scheduler scales both alike: the ratio holds at every step
    (t_lr,), (r_lr,) = {x for _, x in seen["tower"]}, {x for _, x in seen["rest"]}
    assert t_lr == pytest.approx(0.1 * r_lr)
    ckpt = next((run_dir / "checkpoints").glob("last*.ckpt"))
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    w = next(v for k, v in state.items() if k.startswith("net.tower.adapter") and k.endswith("weight"))
    assert torch.count_nonzero(w) > 0  # the text part was learned from zero
    m = json.loads((run_dir / "metrics.json").read_text())
    assert 0 <= m["test_cold/ndcg@10"] <= 1

    # adapter_lr left at 1: the two groups a hybrid always had (a checkpoint's optimizer state from before
    # adapter_lr existed still resumes)
    seen.clear()
    over["model__item_text"] = {"encoder": str(enc)}
    train(_cfg(cold_dataset, tmp_path / "run1", **over), log=lambda *_: None, callbacks=[Groups()])
    assert seen["n_groups"] == 2 and "tower" not in seen and {i for i, _ in seen["mixed"]} == {lr}


def test_label_smoothing_leaves_out_items_that_cannot_be_predicted():
    import torch.nn.functional as F

    from ecomtrain.tasks.next_item import smoothed_cross_entropy

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 9, generator=g, dtype=torch.float64)
    target = torch.tensor([0, 3, 8, 2, 2])
    assert torch.allclose(smoothed_cross_entropy(logits, target, 0.1), F.cross_entropy(logits, target, label_smoothing=0.1))
    assert torch.allclose(smoothed_cross_entropy(logits, target, 0.0), F.cross_entropy(logits, target))
    # columns 1 and 5 masked to -inf (items with no training occurrence): as if they were not in the catalog
    off = torch.tensor([1, 5])
    masked = logits.clone().requires_grad_(True)
    m = masked.index_fill(1, off, float("-inf"))
    loss = smoothed_cross_entropy(m, target, 0.1)
    keep = torch.tensor([c for c in range(9) if c not in (1, 5)])
    want = F.cross_entropy(logits[:, keep], torch.searchsorted(keep, target), label_smoothing=0.1)
    assert torch.isfinite(F.cross_entropy(logits, target, label_smoothing=0.1))
    assert not torch.isfinite(F.cross_entropy(m, target, label_smoothing=0.1))  # torch's own: inf
    assert torch.allclose(loss, want)
    loss.backward()
    assert torch.isfinite(masked.grad).all() and torch.all(masked.grad[:, off] == 0)


@pytest.mark.parametrize("mode", ["text", "hybrid"])
def test_label_smoothing_trains_with_cold_items(mode, tmp_path, cold_dataset):
    """text/hybrid take cold items out of the training softmax with -inf; label smoothing used to turn that into
    a NaN loss at step 0 (measured on Beauty: hybrid + task.label_smoothing 0.1 stopped at step 0)."""
    from ecomtrain.train.runner import train

    cfg = _cfg(cold_dataset, tmp_path / "run", model__items=mode, model__item_text={"encoder": "hashing", "dim": 32},
               task={"name": "next_item", "label_smoothing": 0.1})
    m = json.loads((train(cfg, log=lambda *_: None) / "metrics.json").read_text())
    assert 0 <= m["test_cold/ndcg@10"] <= 1 and 0 <= m["test/ndcg@10"] <= 1


def test_zero_adapter_is_for_hybrid_only(tmp_path, cold_dataset):
    for items in ("id", "text"):
        with pytest.raises(RecipeError, match="model.item_text.adapter_init"):
            _cfg(cold_dataset, tmp_path / "r", model__items=items, model__item_text={"adapter_init": "zero"})


def test_eval_of_an_id_init_run_needs_no_encoder(tmp_path, cold_dataset):
    """id mode uses the text only to start item rows; `ecomtrain eval` loads the checkpoint's rows, so it
    neither renders nor encodes the catalog: the encoder folder may be gone, and the figures are the run's own."""
    import shutil

    from ecomtrain.train.evaluate import evaluate
    from ecomtrain.train.runner import train

    enc = save_tiny_bert(tmp_path / "bert")
    cfg = _cfg(cold_dataset, tmp_path / "run", model__item_text={"encoder": str(enc), "id_init": "text"},
               data__item_text={"template": "{title}; brand: {brand}"})
    run_dir = train(cfg, log=lambda *_: None)
    want = json.loads((run_dir / "metrics.json").read_text())
    shutil.rmtree(enc)
    got = evaluate(str(run_dir), split="test", ckpt="best")
    assert got["test/ndcg@10"] == pytest.approx(want["test/ndcg@10"], abs=1e-6)


# ------------------------------------------------------------------ cold head (hybrid)
def test_cold_head_mixture_is_a_distribution_and_chunks_equal_the_full_catalog():
    """A hybrid with a cold head scores log-probabilities at evaluation: exp sums to 1 over the catalog, cold items
    share ``cold_share`` of it by the cold head's text scores, warm items the rest by the hybrid's own scores (their
    order unchanged); chunked scoring with ``score_norm`` equals the full catalog."""
    from ecomtrain.model.backbone import ItemLM, build_causal_lm
    from ecomtrain.model.items import ItemTower
    from ecomtrain.serve.topk import HiddenScorer

    torch.manual_seed(5)
    table = torch.cat([torch.zeros(1, 8), torch.randn(11, 8)])
    id_free = torch.zeros(12, dtype=torch.bool)
    id_free[[3, 8, 11]] = True
    cfg = validate_tree(tiny_recipe(Path("."), Path("."), model__items="hybrid"))
    lm, vocab, _ = build_causal_lm(cfg.model, 11)
    net = ItemLM(lm, vocab, mode="hybrid", tower=ItemTower(table, 64, "linear", id_free, cold_head=True, cold_share=0.2)).eval()
    plain = ItemLM(lm, vocab, mode="hybrid", tower=ItemTower(table, 64, "linear", id_free)).eval()
    plain.tower.load_state_dict({k: v for k, v in net.tower.state_dict().items() if not k.startswith("cold")})
    assert net.mixes_cold and not plain.mixes_cold
    with torch.no_grad():
        h = net.hidden(torch.tensor([[1, 2, 4], [5, 0, 0]]))[:, 0]
        s, raw = net.item_logits(h), plain.item_logits(h)
        cold = torch.tensor([2, 7, 10])
        warm = torch.tensor([c for c in range(11) if c not in (2, 7, 10)])
        assert torch.allclose(s.exp().sum(-1), torch.ones(2), atol=1e-5)
        assert torch.allclose(s[:, cold].exp().sum(-1), torch.full((2,), 0.2), atol=1e-5)
        # warm: the hybrid's scores shifted per row; cold: the cold head's text scores, not the hybrid's text part
        assert torch.allclose(s[:, warm] - raw[:, warm], (s[:, warm] - raw[:, warm])[:, :1].expand(-1, len(warm)), atol=1e-5)
        want_cold = (h @ net.tower.cold_vectors(cold).T).log_softmax(-1) + torch.log(torch.tensor(0.2))
        assert torch.allclose(s[:, cold], want_cold, atol=1e-5)
        scorer = HiddenScorer(net, h)
        parts = torch.cat([scorer(lo, min(lo + 4, 11)) for lo in range(0, 11, 4)], -1)
        assert torch.allclose(parts, s, atol=1e-5)
        assert torch.allclose(scorer(4, 8, rows=torch.tensor([1])), s[1:, 4:8], atol=1e-5)
        with pytest.raises(ValueError, match="score_norm"):
            net.item_logits(h, 0, 4)
    net.train()  # training scores are the hybrid's own (cold columns out of the softmax)
    assert torch.allclose(net.item_logits(h), plain.train().item_logits(h))


def test_cold_head_trains_on_detached_states_and_leaves_the_model_as_it_was(tmp_path, cold_dataset, monkeypatch):
    """The cold head learns (its loss falls, it is logged) and gives cold items finite text-dependent scores,
    while the model's own weights train exactly as without the head (same init, zero gradient from it; clipping
    is off here, as the head's scaled gradient adds its 1 % to the clipped norm); the share is estimated from
    validation; export reloads with the head and gives the checkpoint's scores."""
    from ecomtrain.data.build import load_manifest
    from ecomtrain.export import export, load_exported
    from ecomtrain.train.checkpointing import load_lightning_state, resolve_checkpoint
    from ecomtrain.train.runner import train

    enc = save_tiny_bert(tmp_path / "bert")
    common = dict(model__items="hybrid", data__item_text={"template": "{title}; brand: {brand}"}, trainer__max_epochs=2,
                  trainer__gradient_clip_val=0.0)
    runs, logs = {}, []
    for head in (False, True):
        cfg = _cfg(cold_dataset, tmp_path / f"run-{head}", model__item_text={"encoder": str(enc), "cold_head": head}, **common)
        runs[head] = (cfg, train(cfg, log=lambda *a: logs.append(" ".join(map(str, a)))))
    states = {h: load_lightning_state(resolve_checkpoint(r, "last"))["state_dict"] for h, (_, r) in runs.items()}
    cold_keys = [k for k in states[True] if ".cold_" in k]
    assert sorted(cold_keys) == ["net.tower.cold_adapter.bias", "net.tower.cold_adapter.weight", "net.tower.cold_share"]
    assert set(states[True]) - set(cold_keys) == set(states[False])
    for k, v in states[False].items():
        assert torch.allclose(v, states[True][k], atol=1e-6), k
    # auto share: (cold validation targets + 1) / (validation targets + 2), logged
    manifest = load_manifest(cold_dataset)
    from ecomtrain.data.shardio import iter_split_samples
    import polars as pl

    counts = pl.read_parquet(cold_dataset / "items.parquet").sort("idx")["train_count"].to_list()
    tg = [int(s["target"]) for s in iter_split_samples(cold_dataset, manifest, "val")]
    k = sum(counts[t - 1] == 0 for t in tg)
    assert k > 0 and float(states[True]["net.tower.cold_share"]) == pytest.approx((k + 1) / (len(tg) + 2))
    assert any(f"{k} of {len(tg)} validation targets" in line for line in logs)
    import csv

    with open(runs[True][1] / "logs" / "metrics.csv") as f:
        cold_loss = [float(r["train/cold_head_loss"]) for r in csv.DictReader(f) if r.get("train/cold_head_loss")]
    # logged, and learning: from about log(catalog size) at the first step down to below it at the last
    assert len(cold_loss) >= 2 and all(math.isfinite(v) for v in cold_loss) and cold_loss[-1] < cold_loss[0], cold_loss
    m = json.loads((runs[True][1] / "metrics.json").read_text())
    assert 0 <= m["test_cold/hr@10"] <= 1 and m["eval/cold_items_rankable"] is True
    cfg, run_dir = runs[True]
    out = export(run_dir, tmp_path / "exported", ckpt="last")
    reloaded = load_exported(out)
    assert reloaded.mixes_cold
    a, b = _checkpoint_and_export_scores(cfg, run_dir, "last", reloaded)
    assert torch.allclose(a, b, atol=1e-5)
    cold_cols = torch.tensor([i for i, c in enumerate(counts) if c == 0])
    assert torch.isfinite(b).all() and b[:, cold_cols].std() > 0
    # `ecomtrain recommend` from the run folder and from the export: the same model (item tower and cold head
    # included; it once ranked text/hybrid runs by their ID head alone), whole catalog or in small chunks
    from ecomtrain.serve.recommend import Recommender

    import ecomtrain.model.backbone as backbone_mod
    import ecomtrain.train.module as module_mod

    built = []  # every language model built while loading: a run folder is read into one model, not two

    def counting(*args, real=backbone_mod.build_causal_lm, **kw):
        built.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(backbone_mod, "build_causal_lm", counting)
    monkeypatch.setattr(module_mod, "build_causal_lm", counting)
    top = a.topk(6)
    for src in (run_dir, out):
        for mb in (None, 1e-4):
            built.clear()
            rec = Recommender.from_pretrained(src, ckpt="last", score_memory_mb=mb)
            assert len(built) == (1 if src == run_dir else 0), (src, built)
            v, i = next(rec.rank_indices([[1, 2, 3, 4], [5, 6]], k=6, exclude_seen=False))
            assert torch.equal(i, top.indices) and torch.allclose(v, top.values, atol=1e-5), (src, mb)


def test_cold_head_is_for_hybrid_and_share_is_checked(tmp_path, cold_dataset):
    for items in ("id", "text"):
        with pytest.raises(RecipeError, match="model.item_text.cold_head"):
            _cfg(cold_dataset, tmp_path / "r", model__items=items, model__item_text={"cold_head": True})
    for bad in (0, 1, 1.5):
        with pytest.raises(RecipeError, match="model.item_text.cold_share"):
            _cfg(cold_dataset, tmp_path / "r", model__items="hybrid", model__item_text={"cold_head": True, "cold_share": bad})
