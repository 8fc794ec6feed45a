"""Beyond-accuracy and consistency metrics against hand-computed values, and their sum states
(what torchmetrics all-reduces across ranks): two halves merged == one pass over everything."""

import math

import pytest
import torch

from ecomtrain.consistency import ConsistencyMetric, jaccard, rbo
from ecomtrain.metrics_beyond import BeyondAccuracy, activity_buckets, gini, intra_list_diversity, popularity_buckets


def test_hand_computed():
    # exposure [0, 0, 1, 3] over 4 items: G = sum (2i-n-1) x_(i) / (n sum x) = (1*1 + 3*3) / (4*4)
    assert gini(torch.tensor([3.0, 0.0, 1.0, 0.0])).item() == pytest.approx(10 / 16)
    assert gini(torch.ones(5)).item() == pytest.approx(0.0)
    # categories [0,0,1] -> 3 pairs... ordered pairs: 6, same-category ordered pairs 2 -> ILD 1 - 2/6
    ild = intra_list_diversity(torch.tensor([[0, 0, 1]]), torch.tensor([[True, True, True]]), 2)
    assert ild.item() == pytest.approx(2 / 3)
    # popularity buckets: counts 50,30,10,10 (total 100): head holds the first 50 %, torso up to 80 %
    assert popularity_buckets(torch.tensor([10.0, 50.0, 30.0, 10.0, 0.0])).tolist() == [2, 0, 1, 2, 2]
    assert activity_buckets(torch.tensor([1, 5, 19, 20])).tolist() == [0, 1, 1, 2]
    a, b = torch.tensor([[1, 2, 3]]), torch.tensor([[1, 3, 9]])
    assert jaccard(a, b).item() == pytest.approx(2 / 4)
    # RBO@3, p=0.9: overlaps at depth 1..3 = 1, 1, 2
    want = (1 - 0.9) / (1 - 0.9**3) * (1 / 1 + 0.9 * 1 / 2 + 0.81 * 2 / 3)
    assert rbo(a, b).item() == pytest.approx(want)
    assert rbo(a, a).item() == pytest.approx(1.0) and jaccard(a, a).item() == 1.0
    assert rbo(a, torch.tensor([[7, 8, 9]])).item() == 0.0


def test_beyond_values_and_sum_states():
    counts = torch.tensor([10.0, 5.0, 0.0, 1.0])
    cat = torch.tensor([0, 1, 1, 2])
    idx = torch.tensor([[0, 1], [0, 2], [1, 3]])
    vals = torch.tensor([[2.0, 1.0], [3.0, float("-inf")], [1.0, 0.5]])
    m = BeyondAccuracy(4, [1, 2], counts, cat)
    m.update(idx, vals)
    out = m.compute()
    assert out["coverage@1"].item() == pytest.approx(2 / 4)  # items 0, 1
    assert out["coverage@2"].item() == pytest.approx(3 / 4)  # 0, 1, 3 (item 2's slot is empty)
    neg = -torch.log2((counts + 1) / (counts.sum() + 4))
    assert out["novelty@2"].item() == pytest.approx(((neg[0] + neg[1] + neg[0] + neg[1] + neg[3]) / 5).item(), rel=1e-6)
    assert out["ild@2"].item() == pytest.approx((1 + 0 + 1) / 3)
    halves = BeyondAccuracy(4, [1, 2], counts, cat), BeyondAccuracy(4, [1, 2], counts, cat)
    halves[0].update(idx[:1], vals[:1])
    halves[1].update(idx[1:], vals[1:])
    halves[0].merge_state(halves[1])  # the same sums an all-reduce produces
    for k, v in halves[0].compute().items():
        assert v.item() == pytest.approx(out[k].item()), k

    c = ConsistencyMetric(["x"], k=3)
    c.update("x", torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([[1, 2, 3], [7, 8, 9]]))
    assert c.compute()["x/jaccard@3"].item() == pytest.approx(0.5)
    assert c.compute()["x/users"].item() == 2
    assert math.isclose(c.compute()["x/rbo@3"].item(), 0.5, rel_tol=1e-6)


def test_prefix_kl_regulariser():
    from ecomtrain.consistency import prefix_kl

    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    same = torch.randn(1, 5).expand(4, 5)  # identical distributions at every position: KL 0
    assert prefix_kl(same, mask).item() == pytest.approx(0.0, abs=1e-6)
    logits = torch.randn(4, 5, requires_grad=True)
    kl = prefix_kl(logits, mask)
    # only (row0,t0)-(row0,t1) and (row0,t1)-(row0,t2) are pairs; row 1's position is not paired with row 0's
    lp = torch.log_softmax(logits.detach(), -1)
    sym = lambda a, b: 0.5 * ((a.exp() * (a - b)).sum() + (b.exp() * (b - a)).sum())
    assert kl.item() == pytest.approx(((sym(lp[0], lp[1]) + sym(lp[1], lp[2])) / 2).item(), rel=1e-5)
    kl.backward()
    assert logits.grad[3].abs().sum() == 0 and logits.grad[0].abs().sum() > 0


def test_prefix_kl_packed_rows_pair_only_within_a_segment():
    from ecomtrain.consistency import prefix_kl

    # one packed row: user A at slots 0-1, user B at slots 2-3 (positions restart at 0)
    mask = torch.tensor([[True, True, True, True]])
    pos = torch.tensor([[0, 1, 0, 1]])
    logits = torch.randn(4, 6)
    lp = torch.log_softmax(logits, -1)
    sym = lambda a, b: 0.5 * ((a.exp() * (a - b)).sum() + (b.exp() * (b - a)).sum())
    want = (sym(lp[0], lp[1]) + sym(lp[2], lp[3])) / 2  # not (1, 2): different users
    assert prefix_kl(logits, mask, pos).item() == pytest.approx(want.item(), rel=1e-5)
    assert prefix_kl(logits, mask).item() != pytest.approx(want.item(), rel=1e-5)
