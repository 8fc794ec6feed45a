"""Export: a 2-process run (DDP, and DeepSpeed ZeRO-3 whose checkpoint is sharded) ->
``ecomtrain export`` -> plain transformers in a fresh subprocess (ecomtrain not importable).

Checks (fp32): (1) the exported model's logits equal those of the trained model as ecomtrain
reads it back (atol 1e-5); (2) independently of that read-back, NDCG@10 on the test split computed
from the exported model with plain transformers equals test/ndcg@10 that the 2-process run itself
wrote to metrics.json (tol 1e-4), so the export is the trained model; (3) ``ecomtrain eval`` of
the same checkpoint in one process gives the run's test/ndcg@10 (1e-5).

    OMP_NUM_THREADS=1 pytest -m distributed tests/test_export.py -s
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from disthelp import REPO, tiny_recipe, torchrun

PLAIN = textwrap.dedent(
    r'''
    import json, math, sys
    from pathlib import Path
    import torch
    try:
        import ecomtrain  # noqa: F401
        sys.exit("ecomtrain must not be importable here")
    except ImportError:
        pass
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out, data, max_hist, ids_file = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    iv = json.loads((out / "item_vocab.json").read_text())
    first, n = iv["first_item_token_id"], iv["num_items"]
    assert tok.convert_tokens_to_ids("<item_1>") == first
    ids = torch.load(ids_file)
    with torch.no_grad():
        torch.save(model(input_ids=ids).logits, ids_file + ".logits")
    ndcg, count = 0.0, 0
    for line in data.read_text().splitlines():  # the test split's samples (history, target), one JSON per line
        s = json.loads(line)
        hist = s["items"][-max_hist:]
        with torch.no_grad():
            lg = model(input_ids=torch.tensor([[first + i - 1 for i in hist]])).logits[0, -1, first:first + n]
        rank = 1 + int((lg > lg[s["target"] - 1]).sum())
        ndcg += 1.0 / math.log2(rank + 1) if rank <= 10 else 0.0
        count += 1
    print(json.dumps({"ndcg@10": ndcg / count, "count": count}))
    '''
)


@pytest.mark.distributed
@pytest.mark.timeout(900)  # several 2-process launches
@pytest.mark.parametrize("strategy", ["ddp", "zero3"])
def test_export_loads_with_plain_transformers(tmp_path, tiny_dataset, strategy):
    from ecomtrain.export import export, load_trained_lm

    run_dir = tmp_path / "run"
    args = ["trainer.strategy.name=ddp"] if strategy == "ddp" else ["trainer.strategy.name=deepspeed", "trainer.strategy.zero_stage=3"]
    recipe = tiny_recipe(tmp_path / "r.yaml", tiny_dataset, run_dir, max_steps=6, test_ckpt="last")
    torchrun(recipe, *args)
    metrics = json.loads((run_dir / "metrics.json").read_text())

    out = export(run_dir, tmp_path / "export")
    for f in ("config.json", "model.safetensors", "tokenizer.json", "item_vocab.json", "README.md"):
        assert (out / f).is_file(), f
    assert not list(tmp_path.glob(".tmp-*"))

    lm, vocab, *_ = load_trained_lm(run_dir, "last")
    ids = torch.tensor([[1, 5, 9, 2, 40], [0, 0, 3, 7, 80]]) * 1
    ids_file = str(tmp_path / "ids.pt")
    torch.save(ids, ids_file)
    # a process where ecomtrain cannot be imported: -S skips site's .pth files (the editable
    # install of ecomtrain is one), PYTHONPATH gives back only the installed site-packages
    import site

    # the test split decoded here (shards are .npy blocks, schema 2); the plain process reads plain JSON lines
    from ecomtrain.data.shardio import iter_split_samples

    manifest = json.loads((tiny_dataset / "manifest.json").read_text())
    samples_file = tmp_path / "test_samples.jsonl"
    samples_file.write_text("".join(json.dumps({"items": s["items"], "target": s["target"]}) + "\n"
                                    for s in iter_split_samples(tiny_dataset, manifest, "test")))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join(site.getsitepackages())
    proc = subprocess.run(
        [sys.executable, "-S", "-c", PLAIN, str(out), str(samples_file), "20", ids_file],
        env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300, cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with torch.no_grad():
        ref = lm(input_ids=ids).logits
    got = torch.load(ids_file + ".logits")
    print(f"[export {strategy}] max |logit diff| = {(got - ref).abs().max().item():.3g}")
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)

    plain = json.loads(proc.stdout.strip().splitlines()[-1])
    assert plain["count"] == manifest["splits"]["test"]["num_samples"] > 0
    print(f"[export {strategy}] ndcg@10 plain={plain['ndcg@10']:.6f} run={metrics['test/ndcg@10']:.6f}")
    assert abs(plain["ndcg@10"] - metrics["test/ndcg@10"]) <= 1e-4

    # `ecomtrain eval` reads the same checkpoint (a sharded folder under ZeRO-3) in one process
    from ecomtrain.train.evaluate import evaluate

    assert abs(evaluate(str(run_dir), split="test", ckpt="last")["test/ndcg@10"] - metrics["test/ndcg@10"]) <= 1e-5
