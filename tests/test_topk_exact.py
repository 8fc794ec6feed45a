"""The optimised ``rank_catalog`` returns exactly the brute-force top-K.

Reference: the full [B, N] score matrix, seen and filtered items set to -inf, a stable descending
sort of each row (ties by item column ascending), the first K finite entries. The routine must give
the same columns in the same order and bit-identical scores for every chunk size (1 column, sizes
that are and are not multiples of the candidate block, the whole catalog), with tie-heavy integer
scores, increasing scores (every chunk beats the running K-th best: the dense fallback), exclude-seen,
allow and deny lists, and fewer rankable items than K. Also through ``Recommender`` with a real
random-init model and ``item_mask`` filters.
"""

from __future__ import annotations

import pytest
import torch

from ecomtrain.serve.topk import BLOCK, chunk_for_budget, rank_catalog


class MatrixScorer:
    def __init__(self, m):
        self.m = m

    def __call__(self, lo, hi, rows=None):
        return (self.m if rows is None else self.m[rows])[:, lo:hi].clone()


def brute_force(scores: torch.Tensor, k: int, seen=None, allowed=None):
    """Per row: [(column, score)] of the top-k finite entries, score desc, ties by column asc."""
    s = scores.clone()
    if seen is not None:
        for r, row in enumerate(seen.tolist()):
            for i in row:
                if i > 0:
                    s[r, i - 1] = float("-inf")
    if allowed is not None:
        s[:, ~allowed] = float("-inf")
    out = []
    for row in s.tolist():
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))  # python: exact (value, column) order
        out.append([(j, row[j]) for j in order[:k] if row[j] != float("-inf")])
    return out


def as_lists(res):
    return [[(j, v) for j, v in zip(ir, vr) if v != float("-inf")] for ir, vr in zip(res.indices.tolist(), res.values.tolist())]


def _cases():
    g = torch.Generator().manual_seed(0)
    B, N = 24, 3 * BLOCK + 17  # not a multiple of the block: the last chunk takes the dense path
    ties = torch.randint(0, 5, (B, N), generator=g).float()  # massive ties everywhere
    floats = torch.randn(B, N, generator=g)
    rising = torch.arange(N, dtype=torch.float32).repeat(B, 1) + torch.randint(0, 3, (B, N), generator=g)  # later chunks always win
    seen = torch.randint(0, N + 1, (B, 30), generator=g)
    seen[:, 25:] = 0  # padding
    allowed = torch.rand(N, generator=g) > 0.3
    few = torch.zeros(N, dtype=torch.bool)
    few[[3, 70, 130, N - 1]] = True  # fewer rankable items than k
    return {"ties": ties, "floats": floats, "rising": rising}, seen, allowed, few


SCORES, SEEN, ALLOWED, FEW = _cases()


@pytest.mark.parametrize("name", sorted(SCORES))
@pytest.mark.parametrize("chunk", [1, 5, BLOCK, 2 * BLOCK, 100, 10_000])
@pytest.mark.parametrize("filt", ["none", "seen", "seen+allowed", "few"])
def test_equals_brute_force(name, chunk, filt):
    scores = SCORES[name]
    B, N = scores.shape
    seen = SEEN if "seen" in filt else None
    allowed = ALLOWED if filt == "seen+allowed" else (FEW if filt == "few" else None)
    k = 20
    res = rank_catalog(MatrixScorer(scores), B, N, k, min(chunk, N), seen=seen, allowed=allowed)
    assert as_lists(res) == brute_force(scores, k, seen, allowed)
    if filt == "few":
        assert all(len(r) == 4 for r in as_lists(res))


def test_counts_unchanged_by_block_path():
    """With targets the rank counts are exact too (tie-heavy scores, block-multiple chunks)."""
    from ecomtrain.metrics import RankingMetrics

    scores = SCORES["ties"]
    B, N = scores.shape
    target = torch.randint(0, N, (B,), generator=torch.Generator().manual_seed(3))
    ref = scores.clone()
    for r, row in enumerate(SEEN.tolist()):
        for i in row:
            if i > 0:
                ref[r, i - 1] = float("-inf")
    want = RankingMetrics((1, 10))
    want.update(ref, target)
    for chunk in (BLOCK, 2 * BLOCK, N):
        res = rank_catalog(MatrixScorer(scores), B, N, 10, chunk, seen=SEEN, target=target)
        got = RankingMetrics((1, 10))
        got.update_counts(res.greater, res.equal, res.n_finite, res.target_masked, N)
        for key, v in want.compute().items():
            assert got.compute()[key].item() == pytest.approx(v.item(), abs=1e-6), (chunk, key)


def test_recommender_equals_brute_force_real_model():
    """A real random-init ItemLM through ``Recommender.recommend``: lists = brute force over the full
    head with seen, allow, deny and catalog-column filters; a tiny memory budget (many chunks) and a
    large one give the same rows."""
    import polars as pl

    from ecomtrain.config import ModelConfig
    from ecomtrain.model.backbone import ItemLM, build_causal_lm
    from ecomtrain.serve.recommend import Recommender
    from ecomtrain.serve.topk import last_hidden

    torch.manual_seed(0)
    N = 700
    lm, vocab, _ = build_causal_lm(ModelConfig.model_validate(
        {"backbone": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128}}), N)
    net = ItemLM(lm, vocab).eval()
    cat = pl.DataFrame({"item": [f"SKU{j:05d}" for j in range(1, N + 1)], "idx": list(range(1, N + 1)),
                        "in_stock": [j % 3 != 0 for j in range(N)]})
    g = torch.Generator().manual_seed(1)
    hist = {f"u{u}": [f"SKU{int(j):05d}" for j in torch.randint(1, N + 1, (int(n),), generator=g)]
            for u, n in enumerate(torch.randint(1, 12, (40,), generator=g))}
    deny = [f"SKU{j:05d}" for j in range(1, 60)]
    rec = Recommender(net, cat, max_history=50, score_memory_mb=0.01)  # budget -> chunks of 256 columns
    assert chunk_for_budget(40, 0.01, N) < N
    df = rec.recommend(hist, k=15, deny=deny, where="in_stock")
    allowed = rec.item_mask(None, deny, "in_stock")
    idx, _, _ = rec.encode(list(hist.values()))
    with torch.no_grad():
        items = torch.zeros(len(idx), max(map(len, idx)), dtype=torch.long)
        for r, h in enumerate(idx):
            items[r, : len(h)] = torch.tensor(h)
        full = net.item_logits(last_hidden(net, items, torch.tensor([len(h) for h in idx]))).float()
    want = brute_force(full, 15, items, allowed)
    for (u, h), w in zip(hist.items(), want):
        got = df.filter(pl.col("user") == u).sort("rank")
        assert got["item"].to_list() == [f"SKU{j + 1:05d}" for j, _ in w], u
        torch.testing.assert_close(torch.tensor(got["score"].to_list()), torch.tensor([v for _, v in w]), atol=1e-5, rtol=0)
    rec.score_memory_mb = 1024.0
    assert rec.recommend(hist, k=15, deny=deny, where="in_stock")[["user", "rank", "item"]].equals(df[["user", "rank", "item"]])
