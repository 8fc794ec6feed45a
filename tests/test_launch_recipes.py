"""Every recipe's documented launch line runs: the exact command from the recipe's ``# Launch`` comment
(``ecomtrain train ...`` or ``torchrun --standalone --nproc_per_node 2 -m ecomtrain.cli train ...``),
run from the repo root as documented, with overrides that only shorten it (2 steps, 1 validation
batch, batch size 16) and keep its output in a temporary folder. Single process, DDP, ZeRO-2 and ZeRO-3, on CPU.
Amazon Beauty recipes read a 600-user sample of ../shared/data/amazon-beauty/sequential_data.txt
(data.build.input overridden); they are skipped where that file is absent.

    OMP_NUM_THREADS=1 pytest -m launch tests/test_launch_recipes.py --durations=0
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO
from ecomtrain.config import load_recipe

RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))
BEAUTY = REPO.parent / "shared" / "data" / "amazon-beauty" / "sequential_data.txt"
STEPS = 2

pytestmark = [pytest.mark.launch, pytest.mark.timeout(600)]


def setup_lines(path: Path) -> list[list[str]]:
    """The one-time steps a recipe's header asks for before its launch line (`ecomtrain model fetch ...`)."""
    out = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        m = re.match(r"(ecomtrain model fetch [\w.-]+ --out [\w./-]+)", line[1:].strip())
        if m:
            out.append(shlex.split(m.group(1)))
    return out


def launch_line(path: Path) -> list[str]:
    """The command of the recipe's '# Launch' comment (one line, or continued on the next comment lines)."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    start = next(i for i, ln in enumerate(lines) if ln.startswith("Launch"))
    first = lines[start].split(":", 1)[1].strip()
    cmd = [first] if first else []
    for ln in lines[start + 1:]:
        if not cmd or cmd[-1].endswith("\\"):
            cmd.append(ln)
        else:
            break
    text = " ".join(c.rstrip("\\") for c in cmd)
    text = re.sub(r"\s+\([^)]*\)\s*$", "", text)  # a trailing remark, e.g. "(from the repo root)"
    words = shlex.split(text)
    assert words and words[0] in ("ecomtrain", "torchrun"), f"{path}: launch line {words}"
    return words


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("launch")


def _beauty_sample(work: Path) -> Path:
    sample = work / "beauty_sample.txt"
    if not sample.exists():
        with open(BEAUTY) as f:
            sample.write_text("".join(next(f) for _ in range(600)))
    return sample


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(REPO / "recipes")) for p in RECIPES])
def test_documented_launch_line_runs(path: Path, work: Path):
    words = launch_line(path)
    cfg = load_recipe(path)
    steps = STEPS
    extra = []
    if cfg.finetune.method == "adalora":
        # its rank schedule needs steps between tinit and tfinal: a 4-step run with a 1-step warm-up and tail
        steps, extra = 4, ["finetune.adalora.tinit=1", "finetune.adalora.tfinal=1"]
    # shorter, not different: the strategy, precision, model and data pipeline stay the recipe's; only the
    # number of steps, validation batches and the batch sizes shrink (a 2-core CI box, ~1 min per recipe).
    # A pretrained backbone (SmolLM2-135M) gets batches of 4: in bf16 on an AVX2 CPU every matmul is emulated,
    # and one training step at batch 16 took 86 s of a 480 s run (py-spy), the test batch's consistency passes 171 s
    batch, eval_batch = (4, 8) if cfg.model.backbone.pretrained else (16, 32)
    overrides = [*extra, f"trainer.max_steps={steps}", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "trainer.progress_bar=false",
                 f"data.batch_size={batch}", f"data.eval_batch_size={eval_batch}",
                 f"run.dir={work / 'runs' / path.stem}-{path.parent.name}"]
    build = cfg.data.build.model_dump(mode="json") if cfg.data.build else {}
    if cfg.data.build and cfg.data.build.input and "amazon-beauty" in cfg.data.build.input:
        if not BEAUTY.is_file():
            pytest.skip(f"{BEAUTY} not present")
        build["input"] = str(_beauty_sample(work))
        overrides.append(f"data.build.input={build['input']}")
    # recipes with the same build options share one built dataset (built by the first of them)
    key = hashlib.sha256(json.dumps(build, sort_keys=True).encode()).hexdigest()[:12]
    overrides.append(f"data.path={work / 'data' / key}")
    bindir = str(Path(sys.executable).parent)  # the checkout's venv: its ecomtrain and torchrun
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for step in setup_lines(path):  # as documented, from the repo root; a folder already fetched is reused
        if not (REPO / step[-1] / "config.json").is_file():
            fetched = subprocess.run(step, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=600)
            assert fetched.returncode == 0, f"{' '.join(step)} failed:\n{fetched.stdout[-2000:]}{fetched.stderr[-2000:]}"
    t0 = time.time()
    proc = subprocess.run([*words, *overrides], cwd=str(REPO), env=env, capture_output=True, text=True, timeout=600)
    took = time.time() - t0
    out = proc.stdout + proc.stderr
    print(f"[timing] {path.relative_to(REPO)}: {took:.1f}s")
    errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 0, f"{' '.join(words)} failed (rc={proc.returncode}):\n" + "\n".join(errors + out.splitlines()[-30:])
    run_dir = work / "runs" / f"{path.stem}-{path.parent.name}"
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["train/global_step"] == steps
    from ecomtrain.tasks import task_class

    # the primary task's own model-selection metric, on the test split (ndcg@K for next_item, rmse for rating, ...)
    monitor = "test/" + task_class(cfg.task[0].name).monitor(cfg.eval.ks)[0].removeprefix("val/")
    assert monitor in m and m[monitor] == m[monitor] and m[monitor] >= 0.0, (monitor, sorted(m))
    if cfg.trainer.precision.startswith("bf16") and torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "AVX2"):
        # no AVX512 at all, so no native bf16: the run says so and names the key to change
        assert "WARNING: trainer.precision=" in out and "set trainer.precision=32 for CPU runs" in out, out[-3000:]
    if words[0] == "torchrun":
        assert f"MEMBER: 2/2" in out or "GLOBAL_RANK: 1" in out, "not launched on 2 processes"
    assert proc.stdout.rstrip().splitlines()[-1] == f"run dir: {run_dir}"  # the documented last line
