"""Every file in recipes/ validates, opens with purpose / hardware / launch comments, and is listed in recipes/README.md.

    OMP_NUM_THREADS=1 pytest tests/test_recipes.py
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ecomtrain.config import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
FILES = sorted(p for p in RECIPES.rglob("*.yaml"))
NAMED = re.compile(r"^(full|lora|dora|adalora|qlora)_(single|ddp|zero[123])$")
# recipes/quickstart/<task>_single.yaml: one task per recipe (multi_task: several), method full;
# <task>_<method>.yaml (e.g. smollm2-135m/purchase_intent_lora.yaml): one process, that method
TASK_NAMED = re.compile(r"^(next_item|purchase_intent|rating|candidate_ranking|multi_task)_(single|full|lora|dora|adalora|qlora)$")


def test_recipes_exist():
    assert FILES and (RECIPES / "quickstart.yaml") in FILES


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(RECIPES)) for p in FILES])
def test_recipe_validates_and_documents_itself(path: Path):
    cfg = load_recipe(path)  # schema: unknown keys, wrong types -> RecipeError
    text = path.read_text()
    head = text.split("\n")
    comments = []
    for line in head:
        if not line.startswith("#"):
            break
        comments.append(line)
    joined = "\n".join(comments)
    assert len(comments) >= 3, f"{path}: must open with a comment (purpose, hardware, launch command)"
    assert re.search(r"^# Hardware:", joined, re.M), f"{path}: no '# Hardware:' line"
    # "# Launch: CMD" or "# Launch (...):" followed by the command on the next comment lines
    start = re.search(r"^# Launch[^\n]*:", joined, re.M)
    launch = joined[start.start():] if start else ""
    rel = str(path.relative_to(RECIPES.parent))
    assert rel in launch, f"{path}: the '# Launch' comment must give the command, naming {rel}"
    if path.parent == RECIPES:
        return
    # recipes/<dataset-or-model>/<method>_<parallelism>.yaml must say what its name says
    m = NAMED.match(path.stem)
    t = TASK_NAMED.match(path.stem)
    assert m or t, f"{path}: name must be <method>_<parallelism>.yaml or <task>_single.yaml"
    if t:
        task, suffix = t.groups()
        assert (len(cfg.task) > 1) if task == "multi_task" else [x.name for x in cfg.task] == [task]
        assert re.search(r"^# Measured:", joined, re.M), f"{path}: no '# Measured:' line"
        method, par = ("full", "single") if suffix == "single" else (suffix, "single")
    else:
        method, par = m.groups()
    assert cfg.finetune.method == method
    st = cfg.trainer.strategy
    if par == "single":
        assert st.name in ("auto", "single") and cfg.trainer.devices in (1, "auto")
        assert "torchrun" not in launch
    elif par == "ddp":
        assert st.name == "ddp"
    else:
        assert st.name == "deepspeed" and st.zero_stage == int(par[-1])
    if par != "single":
        assert "--nproc_per_node" in launch
    if method == "adalora":
        a = cfg.finetune.adalora
        assert a.target_r < a.init_r and not cfg.trainer.early_stopping.enabled


def test_readme_lists_every_recipe():
    readme = (RECIPES / "README.md").read_text()
    for path in FILES:
        assert str(path.relative_to(RECIPES)) in readme, f"recipes/README.md does not list {path.relative_to(RECIPES)}"
