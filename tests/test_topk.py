"""Chunked full-catalog ranking (ecomtrain.serve.topk) equals the full score matrix.

Property checks with a real (random-init, 2-layer) ItemLM and with tie-heavy integer scores:
metrics from chunk counts equal ``RankingMetrics.update`` on the full matrix (1e-6), and the running
top-K equals ``torch.topk`` of the full (masked) matrix, for chunk sizes from 1 column to the catalog.
"""

import pytest
import torch

from ecomtrain.metrics import RankingMetrics
from ecomtrain.serve.topk import HiddenScorer, VectorScorer, chunk_for_budget, rank_catalog


class MatrixScorer:
    def __init__(self, m):
        self.m = m

    def __call__(self, lo, hi, rows=None):
        return (self.m if rows is None else self.m[rows])[:, lo:hi].clone()


def _mask(scores, seen, allowed=None):
    s = scores.clone()
    for r in range(len(seen)):
        for i in seen[r].tolist():
            if i > 0:
                s[r, i - 1] = float("-inf")
    if allowed is not None:
        s[:, ~allowed] = float("-inf")
    return s


def _metrics_full(scores, target, ks):
    m = RankingMetrics(ks)
    m.update(scores, target)
    return {k: v.item() for k, v in m.compute().items()}


def _metrics_chunked(res, n, ks):
    m = RankingMetrics(ks)
    m.update_counts(res.greater, res.equal, res.n_finite, res.target_masked, n)
    return {k: v.item() for k, v in m.compute().items()}


@pytest.mark.parametrize("chunk", [1, 7, 33, 50, 1000])
def test_tie_heavy_scores_chunked_equals_full(chunk):
    g = torch.Generator().manual_seed(0)
    B, N, ks = 40, 50, (1, 5, 10)
    scores = torch.randint(0, 4, (B, N), generator=g).float()  # many ties: exact tie semantics matter
    seen = torch.randint(0, N + 1, (B, 6), generator=g)
    target = torch.randint(0, N, (B,), generator=g)
    seen[:5, 0] = target[:5] + 1  # some targets are masked (seen): misses
    allowed = torch.rand(N, generator=g) > 0.2
    full = _mask(scores, seen, allowed)
    res = rank_catalog(MatrixScorer(scores), B, N, 10, chunk, seen=seen, allowed=allowed, target=target)
    want, got = _metrics_full(full, target, ks), _metrics_chunked(res, N, ks)
    assert want.keys() == got.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-6), key
    # running top-K: same multiset of values as torch.topk over the full matrix; every index in range
    tv, _ = torch.topk(full, 10, dim=1)
    assert torch.equal(res.values, tv)
    assert torch.equal(full.gather(1, res.indices), res.values)
    assert bool(allowed[res.indices[torch.isfinite(res.values)]].all())


@pytest.mark.parametrize("chunk", [3, 64, 100])
def test_real_model_chunked_equals_full_matrix(chunk):
    from ecomtrain.config import ModelConfig
    from ecomtrain.model.backbone import ItemLM, build_causal_lm
    from ecomtrain.serve.topk import last_hidden

    torch.manual_seed(0)
    N = 100
    lm, vocab, _ = build_causal_lm(ModelConfig.model_validate({"backbone": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128}}), N)
    net = ItemLM(lm, vocab).eval()
    items = torch.randint(1, N + 1, (16, 9))
    lengths = torch.randint(1, 10, (16,))
    for r, L in enumerate(lengths.tolist()):
        items[r, L:] = 0
    target = torch.randint(0, N, (16,))
    with torch.no_grad():
        full = net(items, positions=lengths - 1).float()
        h = last_hidden(net, items, lengths)
        # item_logits over a column range equals the same columns of the full head
        torch.testing.assert_close(net.item_logits(h, 10, 30), full[:, 10:30], atol=1e-6, rtol=0)
        res = rank_catalog(HiddenScorer(net, h), 16, N, 20, chunk, seen=items, target=target)
    masked = _mask(full, items)
    want, got = _metrics_full(masked, target, (5, 10, 20)), _metrics_chunked(res, N, (5, 10, 20))
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-6), key
    assert torch.equal(res.indices, torch.topk(masked, 20, dim=1).indices)


def test_popularity_vector_and_budget():
    pop = torch.tensor([5.0, 0.0, 0.0, 3.0, 3.0, 0.0])
    res = rank_catalog(VectorScorer(pop, 2), 2, 6, 3, 2, target=torch.tensor([1, 3]))
    # row 0: target pop 0 ties with 2 others below 3 items -> greater 3, equal 2
    assert res.greater.tolist() == [3, 1] and res.equal.tolist() == [2, 1]
    assert res.indices[0, 0].item() == 0
    # the budget bounds B x chunk: 1 M items, 256 queries, 256 MB -> a chunk far below the catalog
    c = chunk_for_budget(256, 256, 1_000_000)
    assert 256 * c * 4 * 5 <= 256 * 2**20 and c < 1_000_000
    assert chunk_for_budget(4, 256, 600) == 600
