import math

import pytest
import torch

from ecomtrain.metrics import RankingMetrics, ranking_scores


def test_hand_computed_values():
    # 6 items; targets: row0 rank 1, row1 rank 3, row2 rank 6 (last)
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.2, 0.3, 0.4, 0.5],
            [0.9, 0.8, 0.7, 0.1, 0.2, 0.3],
            [0.9, 0.8, 0.7, 0.6, 0.5, 0.0],
        ]
    )
    target = torch.tensor([0, 2, 5])
    v = ranking_scores(scores, target, ks=(1, 3, 5))
    assert v["hr@1"].tolist() == [1, 0, 0]
    assert v["hr@3"].tolist() == [1, 1, 0]
    assert v["hr@5"].tolist() == [1, 1, 0]
    assert v["ndcg@3"].tolist() == pytest.approx([1.0, 1 / math.log2(4), 0.0])
    assert v["mrr"].tolist() == pytest.approx([1.0, 1 / 3, 1 / 6])
    assert v["auc"].tolist() == pytest.approx([1.0, 1 - 2 / 5, 0.0])

    m = RankingMetrics(ks=(1, 3, 5))
    m.update(scores[:2], target[:2])
    m.update(scores[2:], target[2:])
    out = m.compute()
    assert out["hr@3"].item() == pytest.approx(2 / 3)
    assert out["ndcg@3"].item() == pytest.approx((1 + 1 / math.log2(4)) / 3)
    assert out["mrr"].item() == pytest.approx((1 + 1 / 3 + 1 / 6) / 3)


def test_ties_are_expected_value_of_random_tie_break():
    # target tied with 3 others at the top: rank uniform on 1..4
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 0.0]])
    v = ranking_scores(scores, torch.tensor([2]), ks=(1, 2, 10))
    assert v["hr@1"].item() == pytest.approx(1 / 4)
    assert v["hr@2"].item() == pytest.approx(2 / 4)
    assert v["hr@10"].item() == pytest.approx(1.0)
    expected_ndcg = sum(1 / math.log2(r + 1) for r in range(1, 5)) / 4
    assert v["ndcg@10"].item() == pytest.approx(expected_ndcg)
    assert v["mrr"].item() == pytest.approx(sum(1 / r for r in range(1, 5)) / 4)


def test_masked_items_and_masked_target():
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0], [5.0, 4.0, 3.0, 2.0]])
    scores[0, :2] = float("-inf")  # two seen items removed: target 2 becomes rank 1
    scores[1, 3] = float("-inf")  # target itself masked: a miss
    v = ranking_scores(scores, torch.tensor([2, 3]), ks=(1,))
    assert v["hr@1"].tolist() == [1.0, 0.0]
    assert v["mrr"].tolist() == [1.0, 0.0]


def test_weights_drop_padding_rows():
    m = RankingMetrics(ks=(1,))
    scores = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    m.update(scores, torch.tensor([0, 0]), weight=torch.tensor([1.0, 0.0]))
    assert m.compute()["hr@1"].item() == 1.0
