"""``ecomtrain recommend`` and ``Recommender`` on a real tiny run (2-layer Qwen2, synthetic shop).

Properties: recommend's lists equal the top-K of the full score matrix that ``eval`` used before
chunking; the share of test users whose target is in recommend's top-10/20 equals ``ecomtrain
eval``'s HR@10/20 (seen excluded); run folder, checkpoint and export give the same lists; filters
hold; bad input fails with one ``error:`` line, exit 2 and no output file. Also: the W&B offline
run of the training holds the sample-user table, and metrics.json the new metric families.
"""

from __future__ import annotations

import json
import subprocess
import sys

import polars as pl
import pytest
import torch

from conftest import tiny_recipe


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_dataset):
    from ecomtrain.config import validate_tree
    from ecomtrain.train.runner import train

    tmp = tmp_path_factory.mktemp("recrun")
    cfg = validate_tree(tiny_recipe(tiny_dataset, tmp / "run", trainer__max_epochs=2,
                                    logging__wandb__enabled=True, logging__wandb__mode="offline"))
    return train(cfg, log=lambda *_: None)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "ecomtrain.cli", *args], capture_output=True, text=True, timeout=600)


def _lists(df: pl.DataFrame) -> dict:
    return {u: g.sort("rank")["item"].to_list() for (u,), g in df.group_by("user")}


def _full_matrix_lists(run_dir, data_dir, split: str, k: int):
    """Eval's scores the pre-chunking way: the whole [B, N] matrix, seen masked, torch.topk."""
    from data_helpers import read_split

    from ecomtrain.export import load_trained_lm
    from ecomtrain.model.backbone import ItemLM
    from ecomtrain.tasks.next_item import NextItemTask

    lm, vocab, *_ = load_trained_lm(run_dir, "last")
    net = ItemLM(lm, vocab).eval()
    task = NextItemTask(vocab.num_items, 20)
    ids = pl.read_parquet(data_dir / "items.parquet").sort("idx")["item"].to_list()
    samples = read_split(data_dir, split)
    out, targets = {}, {}
    with torch.no_grad():
        for s in range(0, len(samples), 64):
            batch = task.collate_eval(samples[s : s + 64])
            scores = NextItemTask.mask_seen(task.scores(net, batch), batch["seen"])
            top = torch.topk(scores, k, dim=1).indices
            for smp, row in zip(samples[s : s + 64], top.tolist()):
                out[smp["user"]] = [ids[j] for j in row]
                targets[smp["user"]] = ids[smp["target"] - 1]
    return out, targets


def test_recommend_split_equals_eval(run, tiny_dataset, tmp_path):
    from ecomtrain.train.evaluate import evaluate

    out = tmp_path / "recs.parquet"
    r = _cli("recommend", str(run), "--split", "test", "--k", "20", "--out", str(out), "--ckpt", "last")
    assert r.returncode == 0, r.stderr[-3000:]
    df = pl.read_parquet(out)
    assert set(df.columns) == {"user", "rank", "item", "score", "title"}
    got = _lists(df)
    want, targets = _full_matrix_lists(run, tiny_dataset, "test", 20)
    assert got.keys() == want.keys() and len(got) == json.loads((tiny_dataset / "manifest.json").read_text())["splits"]["test"]["num_samples"]
    assert got == want  # same items, same order
    # scores descend within each list; titles come from the catalog
    for (_,), g in df.group_by("user"):
        s = g.sort("rank")["score"].to_list()
        assert s == sorted(s, reverse=True)
    # HR@K implied by the lists == `ecomtrain eval`'s (tiny recipe: primary includes seen -> excl_seen/)
    m = evaluate(str(run), split="test", ckpt="last")
    for k in (10, 20):
        hr = sum(targets[u] in got[u][:k] for u in got) / len(got)
        assert hr == pytest.approx(m[f"test/excl_seen/hr@{k}"], abs=1e-6)


def test_history_file_api_checkpoint_and_export_agree(run, tiny_dataset, tmp_path):
    from ecomtrain.export import export
    from ecomtrain.serve import Recommender

    ids = pl.read_parquet(tiny_dataset / "items.parquet").sort("idx")["item"].to_list()
    hist = {"a": [ids[3], ids[7], "NOT-AN-ITEM", ids[11]], "b": [ids[40]], "c": ["UNKNOWN"]}
    rows = [(u, i) for u, h in hist.items() for i in h]
    f = tmp_path / "h.csv"
    pl.DataFrame({"user": [u for u, _ in rows], "item": [i for _, i in rows]}).write_csv(f)
    out = tmp_path / "r.csv"
    r = _cli("recommend", str(run), "--histories", str(f), "--k", "5", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "2 unknown item id(s)" in r.stderr and "1 user(s) without a known item" in r.stderr
    cli = _lists(pl.read_csv(out, schema_overrides={"user": pl.Utf8}))
    assert set(cli) == {"a", "b"} and all(len(v) == 5 for v in cli.values())
    assert not set(cli["a"]) & set(hist["a"])  # seen excluded by default

    api = Recommender.from_pretrained(run)
    df = api.recommend(hist, k=5)
    assert _lists(df) == cli and api.last_stats["unknown_item_ids"] == 2
    ckpt = Recommender.from_pretrained(run / "checkpoints" / "last.ckpt").recommend(hist, k=5)
    assert _lists(ckpt) == cli
    exp = export(run, tmp_path / "export")
    from_export = Recommender.from_pretrained(exp)
    edf = from_export.recommend(hist, k=5)
    assert _lists(edf) == cli and "title" in edf.columns
    torch.testing.assert_close(torch.tensor(edf["score"].to_list()), torch.tensor(df["score"].to_list()), atol=1e-5, rtol=0)
    # a small memory budget (many chunks) gives the same lists
    api.score_memory_mb = 0.001
    assert _lists(api.recommend(hist, k=5)) == cli


def test_filters(run, tiny_dataset):
    from ecomtrain.serve import Recommender

    cat = pl.read_parquet(tiny_dataset / "items.parquet").sort("idx")
    ids = cat["item"].to_list()
    rec = Recommender.from_pretrained(run)
    hist = {"u": [ids[0], ids[1]], "v": [ids[5]]}
    base = _lists(rec.recommend(hist, k=10))
    deny = base["u"][:3]
    denied = _lists(rec.recommend(hist, k=10, deny=deny))
    assert not set(deny) & set(denied["u"]) and denied["u"][:7] == base["u"][3:10]
    allow = ids[10:14]
    allowed = _lists(rec.recommend(hist, k=10, allow=allow))
    assert set(allowed["u"]) <= set(allow) and len(allowed["u"]) == 4  # fewer rankable items than k: shorter lists
    category = cat["category"][0]
    where = rec.recommend(hist, k=10, where=f"category={category}")
    in_cat = set(cat.filter(pl.col("category") == category)["item"].to_list())
    assert set(where["item"].to_list()) <= in_cat and where.height > 0
    inc = _lists(rec.recommend(hist, k=10, exclude_seen=False))
    assert inc != base


@pytest.mark.parametrize("case", ["no_ckpt", "missing_columns", "all_unknown", "k_too_large", "no_filter_column", "missing_out_dir"])
def test_bad_input(run, tmp_path, case, capsys):
    from ecomtrain.cli import main

    out = tmp_path / "r.parquet"
    good = tmp_path / "h.parquet"
    pl.DataFrame({"user": ["a"], "item": [["SKU000001"]]}).write_parquet(good)
    args = [str(run), "--histories", str(good), "--out", str(out)]
    expect = {"no_ckpt": "no checkpoint", "missing_columns": "missing column(s) item", "all_unknown": "none of its 1 users",
              "k_too_large": "larger than the catalog", "no_filter_column": "no column 'in_stock'", "missing_out_dir": "does not exist"}[case]
    if case == "no_ckpt":
        empty = tmp_path / "emptyrun"
        empty.mkdir()
        (empty / "recipe.yaml").write_text((run / "recipe.yaml").read_text())
        args[0] = str(empty)
    elif case == "missing_columns":
        pl.DataFrame({"user": ["a"], "sku": ["SKU000001"]}).write_parquet(good)
    elif case == "all_unknown":
        pl.DataFrame({"user": ["a"], "item": [["nope"]]}).write_parquet(good)
    elif case == "k_too_large":
        args += ["--k", "100000"]
    elif case == "no_filter_column":
        args += ["--filter", "in_stock"]
    else:
        out = tmp_path / "missing" / "r.parquet"
        args[args.index("--out") + 1] = str(out)
    assert main(["recommend", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expect in err[0], err
    assert not out.exists()
    if out.parent.exists():
        assert not list(out.parent.glob(".*tmp*"))  # no temporary left behind either


def test_metrics_json_and_wandb_table(run):
    m = json.loads((run / "metrics.json").read_text())
    for k in ("test/coverage@10", "test/gini@10", "test/ild@10", "test/novelty@10", "test/pop_head/ndcg@10",
              "test/pop_tail/hr@10", "test/user_heavy/ndcg@10", "test/consistency/time/jaccard@10",
              "test/consistency/channel/app~web/rbo@10", "test/consistency/channel/app~all/jaccard@10"):
        assert k in m, k
    assert 0 < m["test/coverage@10"] <= 1 and 0 <= m["test/gini@10"] < 1 and 0 <= m["test/ild@10"] <= 1
    for k in [k for k in m if "/consistency/" in k and ("jaccard" in k or "rbo" in k)]:
        assert 0 <= m[k] <= 1, k
    # bucket users partition the test users
    n = sum(m[f"test/pop_{b}/users"] for b in ("head", "torso", "tail"))
    assert n == sum(m[f"test/user_{b}/users"] for b in ("light", "medium", "heavy")) == m["test/consistency/time/users"]
    # the offline W&B run holds the sample-user table (rows with a history, top-10 and target) and bucket charts
    runs = list((run / "wandb").glob("offline-run-*"))
    assert runs
    tables = list(runs[0].glob("files/media/table/test/sample_users_*.table.json"))
    assert tables, list(runs[0].rglob("*.json"))
    t = json.loads(tables[0].read_text())
    assert t["columns"][:3] == ["history (last 10)", "top-10 (* = target)", "target"] and len(t["data"]) == 8
    assert all(row[3] == int("*" in row[1]) for row in t["data"])  # hit marked iff the target is starred
    record = next(runs[0].glob("*.wandb")).read_bytes()
    assert b"test/sample_users" in record and b"test/ndcg@10_by_pop_bucket" in record


def test_eval_run_agreement(run, tiny_dataset, tmp_path):
    """Across runs: a model against itself agrees fully; against another seed it churns."""
    from ecomtrain.config import validate_tree
    from ecomtrain.train.evaluate import evaluate
    from ecomtrain.train.runner import train

    same = evaluate(str(run), split="test", ckpt="last", against=str(run / "checkpoints" / "last.ckpt"))
    assert same["test/consistency/runs/jaccard@10"] == 1.0 and same["test/consistency/runs/churn@10"] == 0.0
    assert same["test/consistency/runs/rbo@10"] == pytest.approx(1.0)
    other = train(validate_tree(tiny_recipe(tiny_dataset, tmp_path / "seed1", run__seed=1)), log=lambda *_: None)
    diff = evaluate(str(run), split="test", ckpt="last", against=str(other))
    assert 0 <= diff["test/consistency/runs/jaccard@10"] < 1 and diff["test/consistency/runs/churn@10"] > 0
    assert diff["test/consistency/runs/users"] == same["test/consistency/runs/users"] > 0
