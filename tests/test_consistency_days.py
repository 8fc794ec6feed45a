"""Consecutive-day consistency on a temporal split (docs/recommend.md, ``consistency/day``).

A small hand-made event log over ten UTC days, built with the global temporal split, with planted
users: ``same_day`` did everything on the last day (no list from an earlier day: not counted);
``two_days`` acted on days 2 and 5 and twice on day 9 (its day-d history is exactly the day-2 and
day-5 events). A tiny model is trained, ``ecomtrain eval`` (``evaluate``) reports
``test/consistency/day/{jaccard,rbo}@10`` and ``/users``, and the values equal a brute-force
recomputation: full score matrix, history items masked, (score desc, column asc) order, Jaccard and
RBO written out in Python.
"""

from __future__ import annotations

import json
import random

import polars as pl
import pytest
import torch

from conftest import tiny_recipe

DAY = 86400
T0 = 1_700_006_400  # a UTC midnight (2023-11-15)


def _log() -> pl.DataFrame:
    rnd = random.Random(0)
    rows = []
    for u in range(60):
        days = sorted(rnd.sample(range(9), 6))
        ts = [T0 + d * DAY + rnd.randrange(DAY) for d in days] + [T0 + 9 * DAY + 43200 + rnd.randrange(40000) for _ in range(2)]
        for t in sorted(ts):
            rows.append((f"bg{u:02d}", f"i{rnd.randrange(1, 31):02d}", t))
    # planted: all history on the target's day (not counted) / history on earlier days too (counted)
    for t, item in ((600, "i01"), (1200, "i02"), (1800, "i03"), (86000, "i04")):
        rows.append(("same_day", item, T0 + 9 * DAY + t))
    for t, item in ((2 * DAY + 36000, "i05"), (5 * DAY + 36000, "i06"), (9 * DAY + 2400, "i07"), (9 * DAY + 85900, "i08")):
        rows.append(("two_days", item, T0 + t))
    return pl.DataFrame(rows, schema={"user": pl.Utf8, "item": pl.Utf8, "ts": pl.Int64}, orient="row")


@pytest.fixture(scope="module")
def temporal_run(tmp_path_factory):
    from ecomtrain.config import validate_tree
    from ecomtrain.data import build, importers
    from ecomtrain.train.runner import train

    tmp = tmp_path_factory.mktemp("days")
    _log().write_csv(tmp / "events.csv")
    data = tmp / "data"
    m = build.build(importers.load("table", tmp / "events.csv"), data, split="temporal", temporal_val_fraction=0.1,
                    temporal_test_fraction=0.15, min_user_events=2, log=lambda *_: None)
    assert m["split"]["method"] == "temporal"
    run = train(validate_tree(tiny_recipe(data, tmp / "run", trainer__max_epochs=1, trainer__test_ckpt="last")), log=lambda *_: None)
    return data, run


def _rbo(a: list, b: list, k: int, p: float = 0.9) -> float:
    return (1 - p) / (1 - p**k) * sum(p ** (d - 1) * len(set(a[:d]) & set(b[:d])) / d for d in range(1, k + 1))


def _jaccard(a: list, b: list) -> float:
    return len(set(a) & set(b)) / len(set(a) | set(b)) if (a or b) else 1.0


def test_day_consistency_matches_brute_force(temporal_run):
    from data_helpers import read_split

    from ecomtrain.export import load_trained_lm
    from ecomtrain.model.backbone import ItemLM
    from ecomtrain.serve.topk import last_hidden
    from ecomtrain.train.evaluate import evaluate

    data, run = temporal_run
    m = evaluate(str(run), split="test", ckpt="last")
    k = 10
    for key in (f"test/consistency/day/jaccard@{k}", f"test/consistency/day/rbo@{k}", "test/consistency/day/users"):
        assert key in m, sorted(x for x in m if "consistency" in x)

    lm, vocab, *_ = load_trained_lm(run, "last")
    net = ItemLM(lm, vocab).eval()
    ids = pl.read_parquet(data / "items.parquet").sort("idx")["item"].to_list()
    samples = {s["user"]: s for s in read_split(data, "test")}
    assert {"same_day", "two_days"} <= samples.keys()

    def top(hist: list[int], exclude: set[int]) -> list[int]:
        with torch.no_grad():
            h = last_hidden(net, torch.tensor([hist]), torch.tensor([len(hist)]))
            row = net.item_logits(h)[0].float().tolist()
        order = sorted((j for j in range(len(row)) if j + 1 not in exclude), key=lambda j: (-row[j], j))
        return order[:k]

    jac, rb, users = [], [], []
    for u, s in samples.items():
        day_t = s["target_ts"] // DAY
        prev = [i for i, t in zip(s["items"], s["ts"]) if t // DAY < day_t]
        if not prev:
            continue
        users.append(u)
        excl = set(s["items"]) | {s["target"]}
        a, b = top(prev[-20:], excl), top((s["items"] + [s["target"]])[-20:], excl)
        jac.append(_jaccard(a, b))
        rb.append(_rbo(a, b, k))
    # the planted users: one counted with exactly its day-2 and day-5 history, one not counted
    two = samples["two_days"]
    assert [ids[i - 1] for i, t in zip(two["items"], two["ts"]) if t // DAY < two["target_ts"] // DAY] == ["i05", "i06"]
    assert "two_days" in users and "same_day" not in users
    assert m["test/consistency/day/users"] == len(users) < len(samples)
    assert m[f"test/consistency/day/jaccard@{k}"] == pytest.approx(sum(jac) / len(jac), abs=1e-6)
    assert m[f"test/consistency/day/rbo@{k}"] == pytest.approx(sum(rb) / len(rb), abs=1e-6)
    assert 0 <= m[f"test/consistency/day/jaccard@{k}"] <= 1 and 0 <= m[f"test/consistency/day/rbo@{k}"] <= 1
    # written to metrics.json by training too
    assert "test/consistency/day/jaccard@10" in json.loads((run / "metrics.json").read_text())


def test_day_of_seconds_and_milliseconds():
    from ecomtrain.consistency import day_histories, day_of

    ts = torch.tensor([T0, T0 + DAY - 1, T0 + DAY, (T0 + DAY) * 1000])
    d0 = T0 // DAY
    assert day_of(ts).tolist() == [d0, d0, d0 + 1, d0 + 1]
    seen = torch.tensor([[3, 4, 5, 0], [7, 8, 0, 0]])
    t = torch.tensor([[T0, T0 + DAY, T0 + DAY + 5, 0], [T0 + 2 * DAY, T0 + 2 * DAY + 1, 0, 0]])
    rows, hist = day_histories(seen, t, torch.tensor([T0 + DAY + 9, T0 + 2 * DAY + 9]))
    assert rows.tolist() == [0] and hist == [[3]]
