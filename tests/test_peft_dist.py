"""AdaLoRA under DDP, DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU processes (gloo), and a ZeRO-3 adapter export.

    OMP_NUM_THREADS=1 pytest -m distributed tests/test_peft_dist.py

Each case launches tests/peft_dist_worker.py with torchrun (a real 2-rank job,
real DeepSpeed engines) and checks what every rank wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("peft_dist_worker.py")
_RUNS: dict[str, Path] = {}


def run_worker(data: Path, out: Path, strategy: str) -> Path:
    if strategy in _RUNS:
        return _RUNS[strategy]
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), str(data), str(out), strategy]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    _RUNS[strategy] = out
    return out


@pytest.mark.distributed
@pytest.mark.timeout(900)  # several 2-process launches
@pytest.mark.parametrize("strategy", ["ddp", "zero2", "zero3"])
def test_adalora_budget_shrinks_identically_on_every_rank(strategy, tiny_dataset, tmp_path_factory):
    out = run_worker(tiny_dataset, tmp_path_factory.mktemp(f"adalora_{strategy}"), strategy)
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    steps = r0["global_step"]
    # accumulate_grad_batches=2: one allocation per optimizer step, total_step from the trainer
    assert steps >= 4 and r0["total_step"] == steps
    assert [h["step"] for h in r0["history"]] == list(range(1, steps + 1))
    budgets = [h["budget"] for h in r0["history"]]
    ranks = [h["rank"] for h in r0["history"]]
    # 2 layers x 7 projections; init_r=4 -> target_r=2
    assert r0["init_bgt"] == 14 * 4 and r0["target_bgt"] == 14 * 2
    assert budgets[0] == r0["init_bgt"] and budgets[-1] == r0["target_bgt"]
    assert all(a >= b for a, b in zip(budgets, budgets[1:])) and min(budgets) < budgets[0]
    assert ranks[-1] == r0["target_bgt"] == sum(sum(v) for v in r0["rank_pattern"].values())
    # every rank computed the same allocation on its own (no repair by rank 0 was needed)
    assert r0["rank_pattern"] == r1["rank_pattern"] and r0["history"] == r1["history"]
    assert r0["divergences"] == r1["divergences"] == 0
    # the gradient AdaLoRA scored is the one the optimizer applied (sign of AdamW's first update)
    assert r0["sign_total"] > 1000 and r0["sign_agree"] == r0["sign_total"]


@pytest.mark.distributed
@pytest.mark.timeout(900)  # several 2-process launches
def test_zero3_adapter_reloads_with_plain_peft(tiny_dataset, tmp_path_factory):
    """ZeRO-3-trained AdaLoRA -> export (fresh process) -> plain peft (another fresh process): same logits."""
    out = run_worker(tiny_dataset, tmp_path_factory.mktemp("adalora_zero3"), "zero3")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    export, export_merged = out / "export", out / "export_merged"
    items = torch.randint(1, 81, (4, 10), generator=torch.Generator().manual_seed(0))
    items[1, 6:] = 0
    torch.save(items, out / "items.pt")
    # 1) `ecomtrain export --merge` and `ecomtrain export` (fresh processes, the user's path) and the
    #    trained model's logits (the checkpoint's weights in the training code's own model)
    for args in (["--merge", "--out", str(export_merged)], ["--out", str(export)]):
        proc = subprocess.run([sys.executable, "-m", "ecomtrain.cli", "export", str(out), "--ckpt", str(out / "final.ckpt"), *args],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    code = textwrap.dedent(f"""
        import torch
        from pathlib import Path
        from ecomtrain.export import load_trained_lm
        from ecomtrain.model.backbone import ItemLM
        lm, vocab, *_ = load_trained_lm(Path({str(out)!r}), {str(out / 'final.ckpt')!r})
        with torch.no_grad():
            torch.save(ItemLM(lm, vocab).eval()(torch.load({str(out / 'items.pt')!r})), {str(out / 'ref.pt')!r})
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 2) nothing empty from ZeRO-3 partitions: every tensor has the shape the rank pattern says
    from safetensors.torch import load_file

    cfg = json.loads((export / "adapter" / "adapter_config.json").read_text())
    pattern = cfg["rank_pattern"]
    assert cfg["peft_type"] == "ADALORA" and sum(sum(v) for v in pattern.values()) == 14 * 2
    tensors = load_file(export / "adapter" / "adapter_model.safetensors")
    assert tensors["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"].shape == (80, 32)
    for key, t in tensors.items():
        if ".lora_" in key:
            module = key.split("base_model.model.", 1)[1].rsplit(".lora_", 1)[0]
            r = sum(pattern[f"{module}.lora_E"])
            want_r = t.shape[1] if key.endswith("lora_B") else t.shape[0]
            assert t.ndim == 2 and want_r == r, key  # a ZeRO-3 partition would be 1-d and empty
            assert t.shape[0 if key.endswith("lora_B") else 1] > 0, key
    # 3) plain peft in a fresh process (no ecomtrain import), and the merged model
    code = textwrap.dedent(f"""
        import json, torch, peft, transformers
        items = torch.load({str(out / 'items.pt')!r}); ref = torch.load({str(out / 'ref.pt')!r})
        mask = (items > 0).long()
        base = transformers.AutoModelForCausalLM.from_pretrained({str(export)!r})
        pm = peft.PeftModel.from_pretrained(base, {str(export / 'adapter')!r}).eval()
        merged = transformers.AutoModelForCausalLM.from_pretrained({str(export_merged)!r}).eval()
        with torch.no_grad():
            a = pm(input_ids=items, attention_mask=mask).logits[..., 1:81]
            b = merged(input_ids=items, attention_mask=mask).logits[..., 1:81]
        print(json.dumps([(a - ref).abs().max().item(), (b - ref).abs().max().item(), ref.abs().max().item()]))
    """)
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300, cwd=str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    adapter_err, merged_err, scale = json.loads(proc.stdout.strip().splitlines()[-1])
    assert scale > 0.1 and adapter_err < 1e-5 and merged_err < 1e-5, (adapter_err, merged_err)


_RESUMED: dict[str, tuple[Path, Path]] = {}


def resumed_pair(tiny_dataset: Path, tmp: Path) -> tuple[Path, Path]:
    """(uninterrupted, killed-after-step-4-and-resumed) AdaLoRA runs under ZeRO-2, made once per session.
    ZeRO-2 because DeepSpeed restores callbacks *after* fit start (the other path of the callback)."""
    if "zero2" not in _RESUMED:
        sys.path.insert(0, str(Path(__file__).parent))
        from disthelp import tiny_recipe, torchrun

        common = ["trainer.strategy.name=deepspeed", "trainer.strategy.zero_stage=2", "trainer.max_steps=8",
                  "trainer.checkpoint.every_n_steps=2", "finetune.method=adalora", "finetune.adalora.init_r=4",
                  "finetune.adalora.target_r=2", "finetune.adalora.tinit=1", "finetune.adalora.tfinal=2"]
        full, part = tmp / "full", tmp / "part"
        torchrun(tiny_recipe(tmp / "full.yaml", tiny_dataset, full), *common)
        recipe = tiny_recipe(tmp / "part.yaml", tiny_dataset, part)
        proc, _ = torchrun(recipe, *common, faults="crash_at=4", check=False)
        assert proc.returncode != 0
        torchrun(recipe, *common, "trainer.resume=auto")
        _RESUMED["zero2"] = (full, part)
    return _RESUMED["zero2"]


def logged(run_dir: Path, key: str) -> dict[int, float]:
    import csv

    with open(run_dir / "logs" / "metrics.csv") as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


@pytest.mark.distributed
@pytest.mark.timeout(900)  # several 2-process launches
def test_adalora_resume_continues_schedule(tiny_dataset, tmp_path_factory):
    """The resumed run picks the schedule up where it stopped: the same budget at every later step,
    and the same adapter weights at the first resumed step (orthogonality penalty to 1e-6)."""
    full, part = resumed_pair(tiny_dataset, tmp_path_factory.mktemp("adalora_resume"))
    want, got = logged(full, "adalora/budget"), logged(part, "adalora/budget")
    assert min(got) == 4 and all(want[s] == got[s] for s in range(4, 8)), (want, got)
    assert want[0] == 14 * 4 and want[7] == 14 * 2
    assert abs(logged(full, "train/orth_reg")[4] - logged(part, "train/orth_reg")[4]) < 1e-6


@pytest.mark.distributed
@pytest.mark.timeout(900)  # several 2-process launches
def test_adalora_resume_matches_uninterrupted(tiny_dataset, tmp_path_factory):
    """Killed after step 4 and resumed == uninterrupted: losses and penalties at every later step."""
    full, part = resumed_pair(tiny_dataset, tmp_path_factory.mktemp("adalora_resume"))
    for key in ("train/loss", "train/orth_reg"):
        want, got = logged(full, key), logged(part, key)
        assert all(abs(want[s] - got[s]) < 1e-6 for s in range(4, 8)), (key, want, got)
