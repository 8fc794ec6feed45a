"""Sequence packing (data.packing): packed rows give the same loss and gradients as padded rows."""

import random

import pytest
import torch

from conftest import tiny_recipe


def _samples(n=48, seed=0, max_len=21, items=80):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        # skewed, Beauty-like: most histories short, a few long
        length = min(max_len, 2 + int(rng.expovariate(1 / 5)))
        out.append({"items": [rng.randint(1, items) for _ in range(length)]})
    return out


def test_pack_rows_is_a_permutation_of_the_segments():
    from ecomtrain.tasks.next_item import NextItemTask

    task = NextItemTask(80, 20, packing=True)
    samples = _samples()
    packed = task.collate_train(samples)
    items, labels, pos = packed["items"], packed["labels"], packed["position_ids"]
    # recover the segments from the restarting positions
    segs = []
    for r in range(len(items)):
        cur = None
        for c in range(items.shape[1]):
            if pos[r, c] == 0:
                cur = ([], [])
                segs.append(cur)
            cur[0].append(int(items[r, c]))
            cur[1].append(int(labels[r, c]))
    real = sorted((tuple(x for x in a if x), tuple(y for y in b if y)) for a, b in segs if any(a))
    want = []
    for s in samples:
        seq = s["items"][-21:]
        want.append((tuple(seq[:-1]), tuple(seq[1:])))
    assert real == sorted(want)
    # padded slots carry label 0 (no loss); efficiency on skewed lengths is high
    n_real = sum(len(w[0]) for w in want)
    assert int((labels > 0).sum()) == n_real
    assert n_real / items.numel() >= 0.9
    unpacked = NextItemTask(80, 20).collate_train(samples)
    assert items.numel() < unpacked["items"].numel()


def _module(tmp_path, packing, arch="qwen2"):
    from ecomtrain.config import validate_tree
    from ecomtrain.train.module import RecModule

    tree = tiny_recipe(tmp_path, tmp_path / "run", model__dropout=0.0, data__packing=packing, model__backbone__arch=arch)
    validate_tree(tree)
    torch.manual_seed(0)
    m = RecModule(tree, 80)
    m.configure_model()
    m.train()
    return m


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_packed_loss_and_gradients_equal_unpacked(tmp_path, arch):
    samples = _samples(n=32, seed=3)
    grads, losses = {}, {}
    for packing in (False, True):
        m = _module(tmp_path, packing, arch)
        batch = m.task.collate_train(samples)
        assert ("position_ids" in batch) == packing
        loss = m.task.loss(m.net, batch)
        loss.backward()
        losses[packing] = loss.item()
        grads[packing] = {n: p.grad.clone() for n, p in m.net.named_parameters() if p.grad is not None}
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)
    assert grads[True].keys() == grads[False].keys() and grads[True]
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_packing_without_restart_would_differ(tmp_path):
    """The equality above is not vacuous: without restarting positions (so without the
    block-diagonal mask) segments attend to each other and the hidden states change."""
    m = _module(tmp_path, True)
    batch = m.task.collate_train(_samples(n=32, seed=3))
    with torch.no_grad():
        good = m.net.hidden(batch["items"], position_ids=batch["position_ids"])
        leaky = m.net.hidden(batch["items"])
    real = batch["labels"] > 0
    assert (good[real] - leaky[real]).abs().max() > 1e-2


def test_training_with_packing_runs(tiny_dataset, tmp_path):
    import json

    from ecomtrain.config import validate_tree
    from ecomtrain.train.runner import train

    cfg = validate_tree(tiny_recipe(tiny_dataset, tmp_path / "run", data__packing=True, trainer__max_epochs=2))
    run_dir = train(cfg, log=lambda *_: None)
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["test/ndcg@10"] > m["baseline/popularity/test/ndcg@10"]
    assert m["perf/token_efficiency"] >= 0.9


def _history_reference(samples, max_len=21):
    """(label, set of earlier items except the label) per labelled position, in segment order."""
    out = []
    for s in samples:
        seq = s["items"][-max_len:]
        for t in range(len(seq) - 1):
            out.append((seq[t + 1], set(seq[: t + 1]) - {seq[t + 1]}))
    return out


@pytest.mark.parametrize("packing", [False, True])
def test_exclude_seen_drops_exactly_the_earlier_items_but_never_the_label(packing):
    """task.exclude_seen: each position's softmax loses the items its segment has shown so far; a label that repeats
    one of them stays. Small catalog, so repeats occur; checked against a plain-Python reference."""
    from ecomtrain.tasks.next_item import NextItemTask, drop_history, history_columns

    samples = _samples(n=24, seed=5, items=12)
    batch = NextItemTask(12, 20, packing=packing).collate_train(samples)
    mask = batch["labels"] > 0
    target = batch["labels"][mask] - 1
    out = drop_history(torch.zeros(len(target), 12), target, history_columns(batch["items"], batch.get("position_ids"), mask))
    got = [(int(t) + 1, {j + 1 for j in torch.nonzero(torch.isneginf(r)).flatten().tolist()}) for t, r in zip(target, out)]
    want = _history_reference(samples)
    assert sorted((lab, sorted(h)) for lab, h in got) == sorted((lab, sorted(h)) for lab, h in want)
    repeats = sum(1 for s in samples for t in range(1, len(s["items"][-21:])) if s["items"][-21:][t] in s["items"][-21:][:t])
    assert repeats > 0 and all(torch.isfinite(out.gather(1, target[:, None])))


def test_exclude_seen_loss_packed_equals_unpacked_and_is_a_smaller_softmax(tmp_path):
    samples = _samples(n=32, seed=3)
    grads, losses = {}, {}
    for packing in (False, True):
        m = _module(tmp_path, packing)
        m.task.exclude_seen = True
        batch = m.task.collate_train(samples)
        loss = m.task.loss(m.net, batch)
        loss.backward()
        losses[packing] = loss.item()
        grads[packing] = {n: p.grad.clone() for n, p in m.net.named_parameters() if p.grad is not None}
        if not packing:
            m.task.exclude_seen = False
            plain = m.task.loss(m.net, batch).item()
            # by hand: the cross-entropy over the columns left after the history
            mask = batch["labels"] > 0
            with torch.no_grad():
                logits = m.net.item_logits(m.net.hidden(batch["items"])[mask]).float()
            rows = [(seq[-21:][t + 1], set(seq[-21:][: t + 1])) for seq in (s["items"] for s in samples) for t in range(len(seq[-21:]) - 1)]
            order = batch["labels"][mask].tolist()
            assert [r[0] for r in rows] == order
            ce = [-(logits[i, lab - 1] - logits[i, [j for j in range(80) if j + 1 not in hist - {lab}]].logsumexp(0)) for i, (lab, hist) in enumerate(rows)]
            assert losses[False] == pytest.approx(torch.stack(ce).mean().item(), abs=1e-5)
            assert losses[False] < plain  # fewer negatives
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, atol=1e-5, rtol=1e-4, msg=name)
