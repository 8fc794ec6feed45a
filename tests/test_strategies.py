"""Recipe -> accelerator/precision checks in ecomtrain.train.strategies."""

from __future__ import annotations

import torch

from ecomtrain.train.strategies import cpu_has_bf16_kernels, cpu_precision_warning


def test_bf16_on_a_cpu_without_native_bf16_is_warned_about():
    # fp32 and fp16, and anything on a GPU, say nothing
    assert cpu_precision_warning("32", "cpu") is None
    assert cpu_precision_warning("16-mixed", "cpu") is None
    assert cpu_precision_warning("bf16-mixed", "gpu") is None
    native = cpu_has_bf16_kernels()
    for p in ("bf16-mixed", "bf16-true"):
        w = cpu_precision_warning(p, "cpu")
        assert (w is None) == native
        if w is not None:
            assert f"trainer.precision={p}" in w and "trainer.precision=32" in w
    if torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "AVX2"):
        # no AVX512 at all: oneDNN has no bf16 path, so the warning must come
        assert not native and cpu_precision_warning("bf16-mixed", "cpu") is not None


def test_cpu_precision_bench_prints_its_json(tmp_path):
    """bench/cpu_precision.py (cited by the warning and docs/dist.md) runs as documented, at a tiny size."""
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO

    out = tmp_path / "p.json"
    proc = subprocess.run([sys.executable, "bench/cpu_precision.py", "--batch", "1", "--seq", "8", "--repeats", "1", "--out", str(out)],
                          cwd=str(REPO), env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert json.loads(proc.stdout) == r
    for part in ("matmul", "train_step"):
        assert set(r[part]["seconds_median"]) == {"fp32", "bf16_autocast"} and r[part]["bf16_over_fp32"] > 0
    assert r["ecomtrain_warns"] == (cpu_precision_warning("bf16-mixed", "cpu") is not None)
