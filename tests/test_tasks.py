"""Tasks: registry and config, labels derived from the logs, metrics against hand-computed values,
side inputs, bad input, and one short multi-task training over all four tasks."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ecomtrain.config import RecipeError, validate_tree
from ecomtrain.data.importers import DataError
from ecomtrain.metrics_pointwise import BinaryMetrics, RegressionMetrics, auc_exact
from ecomtrain.tasks import task_class, val_metrics
from ecomtrain.tasks.base import TaskContext, build_tasks

from conftest import tiny_recipe

MANIFEST = {"num_items": 10, "event_types": ["view", "click", "cart", "purchase"], "channels": ["app", "web"],
            "sample_fields": ["user", "items", "events", "channels", "ts"]}


def _task(name, manifest=MANIFEST, **cfg):
    tree = tiny_recipe("unused", "unused", task={"name": name, **cfg})
    c = validate_tree(tree)
    return build_tasks(c, manifest, item_counts=[5] * manifest["num_items"])


# ---------------------------------------------------------------- registry and config
def test_registry_and_config_forms():
    with pytest.raises(ValueError, match="did you mean 'purchase_intent'"):
        task_class("purchase_intnt")
    assert task_class("rating").monitor([10]) == ("val/rating/rmse", "min")
    assert val_metrics("next_item", [5, 10])[:2] == ["val/hr@5", "val/ndcg@5"]
    one = validate_tree({"data": {"path": "x"}, "task": {"name": "next_item"}})
    many = validate_tree({"data": {"path": "x"}, "task": [{"name": "next_item"}, {"name": "purchase_intent", "weight": 0.3}]})
    assert [t.name for t in one.task] == ["next_item"] and many.task[1].weight == 0.3
    with pytest.raises(RecipeError, match=r"task\[1\]\.sampled_negativs: unknown key; did you mean 'sampled_negatives'"):
        validate_tree({"data": {"path": "x"}, "task": [{"name": "next_item"}, {"name": "purchase_intent", "sampled_negativs": 2}]})
    with pytest.raises(RecipeError, match="unknown task 'ratin'; did you mean 'rating'"):
        validate_tree({"data": {"path": "x"}, "task": {"name": "ratin"}})


# ---------------------------------------------------------------- labels from the logs
def test_purchase_intent_labels_from_events():
    t = _task("purchase_intent", sampled_negatives=2)
    # events: 0 view, 1 click, 2 cart, 3 purchase; item 4 is viewed at step 1 and bought at step 4
    s = {"user": "u1", "items": [1, 4, 2, 3, 4, 5], "events": [0, 0, 2, 3, 3, 1], "channels": [0] * 6, "ts": list(range(6))}
    b = t.collate_train([s])
    labelled = [(int(c), int(y)) for c, y, r in zip(b["cand"], b["label"], b["row"])]
    interacted = [(c, y) for c, y in labelled if c in s["items"]]
    # step 1 (item 4 viewed) is no negative: it is bought later in the window
    assert interacted == [(2, 0), (3, 1), (4, 1), (5, 0)]
    sampled = [c for c, y in labelled if c not in s["items"]]
    assert len(sampled) == 2 * len(interacted) and all(y == 0 for c, y in labelled if c not in s["items"])
    # each candidate is scored from the state after the previous step
    assert b["col"].tolist()[::3] == [1, 2, 3, 4]
    assert torch.equal(t.collate_train([s])["cand"], b["cand"])  # seeded: the same negatives every time
    e = t.collate_eval([{**s, "target": 6, "target_event": 3}])
    assert e["cands"][0, 0] == 6 and e["labels"][0].tolist() == [1, 0, 0] and not set(e["cands"][0, 1:].tolist()) & {1, 2, 3, 4, 5, 6}


def test_candidate_ranking_candidates_and_catalog_check():
    t = _task("candidate_ranking", num_candidates=5)
    s = {"user": "u", "items": [1, 2, 3], "events": [0] * 3, "channels": [0] * 3, "ts": [0, 1, 2], "target": 7}
    c = t.collate_eval([s])["cands"][0].tolist()
    assert c[0] == 7 and len(set(c)) == 5 and not set(c[1:]) & {1, 2, 3, 7}
    tr = t.collate_train([{**s, "items": [1, 2, 3, 4]}])
    assert (tr["cands"][..., 0] == tr["labels"]).all() and not (tr["cands"][..., 1:] == tr["labels"].unsqueeze(-1)).any()
    with pytest.raises(DataError, match="num_candidates 20 exceeds the catalog of 10 items"):
        _task("candidate_ranking", num_candidates=20)


def test_missing_fields_name_task_field_and_dataset(tiny_dataset):
    # the default synthetic log has no ratings; a log without purchases cannot label intent
    cfg = validate_tree(tiny_recipe(tiny_dataset, tiny_dataset, task={"name": "rating"}))
    m = json.loads((tiny_dataset / "manifest.json").read_text())
    with pytest.raises(DataError) as exc:
        build_tasks(cfg, m)
    msg = str(exc.value)
    assert "task 'rating'" in msg and "'ratings'" in msg and str(tiny_dataset) in msg and "\n" not in msg
    no_channels = {**MANIFEST, "channels": []}
    with pytest.raises(DataError, match="task 'next_item' needs 'channels'.*set model.inputs.channels: false"):
        build_tasks(validate_tree(tiny_recipe("d", "d", model__inputs={"channels": True})), no_channels)
    build_tasks(validate_tree(tiny_recipe("d", "d")), no_channels)  # not asked for: fine
    with pytest.raises(DataError, match=r"task 'purchase_intent' needs 'events \['buy'\]'"):
        build_tasks(validate_tree(tiny_recipe(tiny_dataset, tiny_dataset, task={"name": "purchase_intent", "positive_events": ["buy"]})), m)


# ---------------------------------------------------------------- metrics
def test_binary_metrics_hand_computed():
    p = torch.tensor([0.9, 0.8, 0.3, 0.6, 0.2, 0.7, 0.4])
    y = torch.tensor([1, 0, 0, 1, 0, 1, 1])
    g = torch.tensor([1, 1, 1, 2, 2, 3, 3])  # user 3 has positives only: no AUC of its own
    m = BinaryMetrics(ece_bins=2)
    m.update(p, y, g)
    out = m.compute()
    # pairs (pos > neg) over 4 pos x 3 neg: 0.9 beats all 3; 0.6 beats 0.3, 0.2; 0.7 beats 0.3, 0.2; 0.4 beats 0.3, 0.2
    assert out["auc"].item() == pytest.approx(9 / 12)
    # user 1: 1 pos, 2 neg, AUC 1 (3 impressions); user 2: AUC 1 (2 impressions); user 3 skipped
    assert out["gauc"].item() == pytest.approx(1.0)
    ll = -sum(math.log(q if t else 1 - q) for q, t in zip(p.tolist(), y.tolist())) / 7
    assert out["logloss"].item() == pytest.approx(ll, rel=1e-5)
    # 2 bins: [0, .5]: p .3 .2 .4 (acc 1/3, conf .3); (.5, 1]: .9 .8 .6 .7 (acc 3/4, conf .75)
    assert out["ece"].item() == pytest.approx(3 / 7 * abs(1 / 3 - 0.3) + 4 / 7 * abs(0.75 - 0.75), abs=1e-6)
    assert auc_exact(torch.tensor([0.5, 0.5, 0.1]), torch.tensor([1, 0, 0])) == pytest.approx(0.75)  # a tie counts 1/2
    # per-user weighting: user A AUC 0 with 4 impressions, user B AUC 1 with 2 impressions -> 2/6
    m2 = BinaryMetrics()
    m2.update(torch.tensor([0.1, 0.9, 0.8, 0.7, 0.6, 0.5]), torch.tensor([1, 0, 0, 0, 1, 0]), torch.tensor([7, 7, 7, 7, 8, 8]))
    assert m2.compute()["gauc"].item() == pytest.approx(2 / 6)
    r = RegressionMetrics()
    r.update(torch.tensor([3.0, 4.0, 1.0]), torch.tensor([4.0, 4.0, 3.0]), torch.tensor([True, True, False]))
    assert r.compute()["rmse"].item() == pytest.approx(math.sqrt(0.5)) and r.compute()["mae"].item() == pytest.approx(0.5)


# ---------------------------------------------------------------- side inputs
def test_side_inputs_alignment_and_default_off():
    from ecomtrain.model.side_inputs import gap_bucket

    s = {"user": "u", "items": [1, 2, 3, 4], "events": [0, 3, -1, 1], "channels": [1, 0, 0, 1], "ts": [0, 60, 3660, 3660 + 86400]}
    on = _task("next_item", manifest=MANIFEST)
    assert "side" not in on.collate_train([s]) and "side" not in on.collate_eval([{**s, "target": 5}])  # default: unchanged batches
    tree = tiny_recipe("unused", "unused", model__inputs={"event_types": True, "channels": True, "time_gaps": True})
    t = build_tasks(validate_tree(tree), MANIFEST)
    b = t.collate_train([s])  # inputs are steps 0..2 (step 3 is only a label)
    assert b["side"]["events"].tolist() == [[1, 4, 0]] and b["side"]["channels"].tolist() == [[2, 1, 1]]
    assert b["side"]["gaps"].tolist() == [[1, gap_bucket(60), gap_bucket(3600)]] and [gap_bucket(x) for x in (60, 3600, 86400)] == [3, 6, 9]
    e = t.collate_eval([{**s, "target": 5}])
    assert e["side"]["gaps"][0, -1].item() == 9 and e["side"]["events"].shape == e["items"].shape


# ---------------------------------------------------------------- training, all tasks at once
def test_multi_task_training_all_tasks(signal_dataset, tmp_path):
    from ecomtrain.train.runner import train

    tasks = [{"name": "next_item"}, {"name": "purchase_intent", "weight": 0.5}, {"name": "rating", "weight": 0.5},
             {"name": "candidate_ranking", "num_candidates": 10, "weight": 0.5}]
    cfg = validate_tree(tiny_recipe(signal_dataset, tmp_path / "run", task=tasks, trainer__max_epochs=1,
                                    model__inputs={"event_types": True, "channels": True, "time_gaps": True}))
    run_dir = train(cfg, log=lambda *_: None)
    m = json.loads((run_dir / "metrics.json").read_text())
    for k in ("test/ndcg@10", "test/purchase_intent/auc", "test/purchase_intent/gauc", "test/purchase_intent/ece",
              "baseline/item_purchase_rate/test/purchase_intent/auc", "test/rating/rmse", "baseline/user_item_bias/test/rating/rmse",
              "test/candidate_ranking/hr@1", "baseline/random/test/candidate_ranking/hr@1"):
        assert math.isfinite(m[k]), k
    assert m["baseline/random/test/candidate_ranking/hr@1"] == pytest.approx(0.1)  # 1/K exactly under ties
    logged = (run_dir / "logs" / "metrics.csv").read_text().splitlines()[0]
    for name in ("next_item", "purchase_intent", "rating", "candidate_ranking"):
        assert f"train/loss/{name}" in logged


# ---------------------------------------------------------------- TALLRec yes/no head, bad input through the CLI
def test_yes_no_head_answer_tokens(tmp_path, tiny_dataset):
    from test_model import _save_tiny_pretrained
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from ecomtrain.train.module import module_for_dataset

    _save_tiny_pretrained(tmp_path / "base")
    m = json.loads((tiny_dataset / "manifest.json").read_text())
    # init_items_from_text off: transformers 5 reloads this word-level tokenizer as a Qwen2 BPE one that
    # encodes every title to nothing, and item rows would all start at the (zero) padding embedding
    tree = tiny_recipe(tiny_dataset, tmp_path, model__backbone={"pretrained": str(tmp_path / "base"), "init_items_from_text": False},
                       task={"name": "purchase_intent", "head": "binary"})
    mod = module_for_dataset(validate_tree(tree), m)
    mod.configure_model()
    # a word-level tokenizer in memory (transformers 5 reloads the saved one as a Qwen2 BPE tokenizer)
    words = {"<pad>": 0, "<unk>": 1, **{f"w{i}": i for i in range(2, 40)}}
    tk = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    mod.net.tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>")
    task = mod.task
    task.mode, task.cfg.answer_tokens = "yes_no", ("w5", "w6")
    head = task.make_head(mod.net)
    assert type(head).__name__ == "YesNoHead" and head.ids.tolist() == [5, 6]
    samples = [{"user": "u", "items": [3, 4, 5, 6], "events": [0, 3, 0, 3], "channels": [0] * 4, "ts": [0, 1, 2, 3]}]
    batch = task.collate_train(samples)
    assert batch["cands"][0, 0] == 6 and batch["labels"][0, 0] == 1  # the window's last step is the candidate
    loss = task.loss(mod.net, head, batch)
    loss.backward()
    # the answer is read from the LM head rows of the two answer tokens
    assert torch.isfinite(loss) and mod.net.lm.get_output_embeddings().weight.grad[[5, 6]].abs().sum() > 0
    task.cfg.answer_tokens = ("w5 w6", "w7")
    with pytest.raises(RecipeError, match="answer token 'w5 w6' is 2 tokens"):
        task.make_head(mod.net)
    task.cfg.answer_tokens = ("Yes", "No")
    with pytest.raises(RecipeError, match="answer token 'Yes' is not in the tokenizer's vocabulary"):
        task.make_head(mod.net)


def test_cli_bad_task_input_one_line_exit_2(tiny_dataset, tmp_path):
    import yaml
    from data_helpers import cli

    tree = tiny_recipe(tiny_dataset, tmp_path / "run", task={"name": "rating"})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tree))
    r = cli("train", str(tmp_path / "r.yaml"))
    assert r.returncode == 2 and r.stderr.startswith("error: task 'rating' needs 'ratings'") and r.stderr.count("\n") == 1
    r = cli("train", str(tmp_path / "r.yaml"), "task.name=candidate_ranking", "task.num_candidates=100000")
    assert r.returncode == 2 and "num_candidates 100000 exceeds the catalog" in r.stderr and r.stderr.count("\n") == 1


def test_packed_side_inputs_same_loss():
    """Packing keeps each side input with its own step: packed loss == padded loss (dropout off)."""
    from ecomtrain.model.backbone import ItemLM, build_causal_lm
    from ecomtrain.model.side_inputs import SideInputs

    flags = {"event_types": True, "channels": True, "time_gaps": True}
    cfg = validate_tree(tiny_recipe("unused", "unused", model__inputs=flags))
    lm, vocab, _ = build_causal_lm(cfg.model, num_items=10)
    torch.manual_seed(0)
    net = ItemLM(lm, vocab, side=SideInputs(64, 4, 2, flags)).eval()
    samples = [{"user": f"u{k}", "items": [(k + j) % 10 + 1 for j in range(n)], "events": [j % 4 for j in range(n)],
                "channels": [(k + j) % 2 for j in range(n)], "ts": [60 * j * j for j in range(n)]} for k, n in enumerate((6, 3, 4, 2))]
    plain = build_tasks(cfg, MANIFEST)
    packed = build_tasks(validate_tree(tiny_recipe("unused", "unused", model__inputs=flags, data__packing=True)), MANIFEST)
    bp = packed.collate_train(samples)
    assert bp["items"].shape[0] < 4 and bp["side"]["events"].shape == bp["items"].shape
    with torch.no_grad():
        a, b = plain.loss(net, None, plain.collate_train(samples)), packed.loss(net, None, bp)
    assert a.item() == pytest.approx(b.item(), abs=1e-5)
    off = net.side
    net.side = None  # the side inputs do change the model's output
    with torch.no_grad():
        assert abs(plain.loss(net, None, plain.collate_train(samples)).item() - a.item()) > 1e-4
    net.side = off


def test_export_refuses_side_inputs_it_would_drop(tmp_path):
    import yaml

    from ecomtrain.export import load_trained_lm

    tree = tiny_recipe(tmp_path, tmp_path, model__inputs={"channels": True})
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(tree))
    with pytest.raises(RecipeError, match=r"trained with model.inputs \['channels'\]"):
        load_trained_lm(tmp_path)


def test_public_ratings_reach_the_samples(tmp_path):
    """MovieLens ratings and Amazon review stars become the samples' 'ratings' list and 'target_rating'."""
    from data_helpers import by_user, read_split

    from ecomtrain.data import build, importers

    (tmp_path / "ratings.dat").write_text("1::10::5::978300760\n1::20::3::978300761\n1::30::4::978300762\n2::20::4::978300000\n2::10::2::978300001\n2::30::5::978300002\n")
    m = build.build(importers.load("movielens", tmp_path), tmp_path / "ml", log=lambda *_: None)
    assert "ratings" in m["sample_fields"] and m["num_ratings"] == 6
    test = by_user(read_split(tmp_path / "ml", "test"))
    assert test["1"]["ratings"] == [5.0, 3.0] and test["1"]["target_rating"] == 4.0 and test["2"]["target_rating"] == 5.0
    rows = [{"rating": r, "asin": f"B{i}", "parent_asin": f"P{i}", "user_id": "AG1", "timestamp": 1588687728923 + i} for i, r in enumerate((5.0, 2.0, 3.0))]
    (tmp_path / "All_Beauty.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    build.build(importers.load("amazon-reviews", tmp_path / "All_Beauty.jsonl"), tmp_path / "az", log=lambda *_: None)
    t = read_split(tmp_path / "az", "test")[0]
    assert t["ratings"] == [5.0, 2.0] and t["target_rating"] == 3.0


def test_data_inspect_shows_what_a_task_is_asked(tiny_dataset):
    from data_helpers import cli

    r = cli("data", "inspect", str(tiny_dataset), "--task", "purchase_intent", "--samples", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "task purchase_intent: 2 val sample(s)" in r.stdout and r.stdout.count("asked: will the user buy") == 2
    assert "@" in r.stdout.split("task purchase_intent", 1)[1]  # steps show event@channel
