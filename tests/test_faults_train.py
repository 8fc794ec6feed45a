"""Fault matrix, training side: each row is one bad input and its exact outcome.

Every row runs the real ``ecomtrain`` command in a subprocess and must end with exit status 2,
stderr of exactly one line that starts with ``error:`` and names the file / key / checkpoint /
run folder / flag, no traceback, and every file that existed before unchanged (nothing written
earlier is lost or altered). The crafted-pickle rows also check that the pickle's payload never ran.
The table in docs/reliability.md lists these rows.

    OMP_NUM_THREADS=1 pytest tests/test_faults_train.py
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, tiny_recipe

MARKER = "PWNED"


class _Payload:
    """Unpickling this runs a shell command (what a hostile 'checkpoint' would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted_checkpoint(path: Path, marker: Path) -> Path:
    import torch

    torch.save({"state_dict": {}, "hyper_parameters": {}, "x": _Payload(marker)}, path)
    return path


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_dataset) -> Path:
    """A workspace: one trained run (single process, 3 steps), and every bad input of the matrix."""
    import torch

    from ecomtrain.config import validate_tree
    from ecomtrain.train.runner import train

    ws = tmp_path_factory.mktemp("faults")
    train(validate_tree(tiny_recipe(tiny_dataset, ws / "run", trainer__max_steps=3)), log=lambda *_: None)
    good = ws / "good.yaml"
    good.write_text(yaml.safe_dump(tiny_recipe(tiny_dataset, ws / "new-run")))
    (ws / "malformed.yaml").write_text("run: {name: [unclosed\ntrainer: {max_epochs: 2}\n")
    bad = tiny_recipe(tiny_dataset, ws / "r")
    bad["trainer"]["max_epocs"] = 2
    (ws / "unknown_key.yaml").write_text(yaml.safe_dump(bad))
    bad = tiny_recipe(tiny_dataset, ws / "r")
    bad["trainer"]["max_epochs"] = "three"
    (ws / "wrong_type.yaml").write_text(yaml.safe_dump(bad))
    bad = tiny_recipe(tiny_dataset, ws / "r")
    bad["eval"] = {"ks": [5, 20]}
    bad["trainer"]["early_stopping"] = {"enabled": True, "monitor": "val/ndcg@10"}
    (ws / "bad_monitor.yaml").write_text(yaml.safe_dump(bad))
    (ws / "latin1.yaml").write_bytes("run: {name: caf\xe9}\n".encode("latin-1"))
    (ws / "list.yaml").write_text("- run\n- data\n")
    crafted_checkpoint(ws / "crafted.ckpt", ws / MARKER)
    (ws / "empty.ckpt").write_bytes(b"")
    (ws / "foreign.ckpt").write_text("this is a text file, not a checkpoint\n")
    torch.save({"weights": torch.zeros(3)}, ws / "tensors_only.pt")
    (ws / "plain_folder.ckpt").mkdir()
    ds = ws / "crafted_ds.ckpt"  # a DeepSpeed checkpoint folder whose shard files are crafted pickles
    (ds / "checkpoint").mkdir(parents=True)
    (ds / "latest").write_text("checkpoint")
    crafted_checkpoint(ds / "checkpoint" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", ws / MARKER)
    crafted_checkpoint(ds / "checkpoint" / "mp_rank_00_model_states.pt", ws / MARKER)
    (ws / "not_a_run").mkdir()
    (ws / "no_ckpt_run").mkdir()
    (ws / "no_ckpt_run" / "recipe.yaml").write_text((ws / "run" / "recipe.yaml").read_text())
    return ws


# id: (argv with {ws} placeholders, exact first part of the single stderr line)
ROWS = {
    # recipes
    "recipe-malformed-yaml": (["train", "{ws}/malformed.yaml", "--check"], "error: {ws}/malformed.yaml: not valid YAML: "),
    "recipe-unknown-key": (["train", "{ws}/unknown_key.yaml", "--check"],
                           "error: {ws}/unknown_key.yaml: trainer.max_epocs: unknown key; did you mean 'max_epochs'?"),
    "recipe-wrong-type": (["train", "{ws}/wrong_type.yaml", "--check"],
                          "error: {ws}/wrong_type.yaml: trainer.max_epochs: Input should be a valid integer"),
    "recipe-bad-monitor": (["train", "{ws}/bad_monitor.yaml", "--check"],
                           "error: {ws}/bad_monitor.yaml: trainer.early_stopping.monitor: 'val/ndcg@10' is not logged with eval.ks=[5, 20]"),
    "recipe-missing-file": (["train", "{ws}/nope.yaml"], "error: recipe file not found: {ws}/nope.yaml"),
    "recipe-not-utf8": (["train", "{ws}/latin1.yaml", "--check"], "error: {ws}/latin1.yaml: not UTF-8 text"),
    "recipe-not-a-mapping": (["train", "{ws}/list.yaml", "--check"], "error: {ws}/list.yaml: a recipe must be a YAML mapping, got list"),
    # overrides
    "override-not-yaml": (["train", "{ws}/good.yaml", "optim.lr=[1,", "--check"],
                          "error: override 'optim.lr=[1,': the value is not valid YAML"),
    "override-no-equals": (["train", "{ws}/good.yaml", "optim.lr", "--check"],
                           "error: override 'optim.lr' is not of the form dotted.key=value"),
    "override-parent-not-section": (["train", "{ws}/good.yaml", "optim.lr.x=1", "--check"],
                                    "error: override 'optim.lr.x': 'lr' is not a section"),
    "override-empty-key": (["train", "{ws}/good.yaml", "=3", "--check"], "error: override '=3' has an empty key"),
    "override-unknown-key": (["train", "{ws}/good.yaml", "optim.lrr=0.1", "--check"],
                             "error: {ws}/good.yaml: optim.lrr: unknown key; did you mean 'lr'?"),
    # checkpoints
    "ckpt-missing-export": (["export", "{ws}/run", "--ckpt", "{ws}/nope.ckpt", "--out", "{ws}/out"],
                            "error: checkpoint not found: {ws}/nope.ckpt"),
    "ckpt-crafted-pickle-export": (["export", "{ws}/run", "--ckpt", "{ws}/crafted.ckpt", "--out", "{ws}/out"],
                                   "error: {ws}/crafted.ckpt: refused to load: the file holds code"),
    "ckpt-crafted-pickle-eval": (["eval", "{ws}/run", "--ckpt", "{ws}/crafted.ckpt"],
                                 "error: {ws}/crafted.ckpt: refused to load: the file holds code"),
    "ckpt-crafted-deepspeed-folder-eval": (["eval", "{ws}/run", "--ckpt", "{ws}/crafted_ds.ckpt"],
                                           "error: {ws}/crafted_ds.ckpt/checkpoint/"),
    "ckpt-crafted-deepspeed-folder-export": (["export", "{ws}/run", "--ckpt", "{ws}/crafted_ds.ckpt", "--out", "{ws}/out"],
                                             "error: {ws}/crafted_ds.ckpt/checkpoint/"),
    "ckpt-crafted-pickle-resume": (["train", "{ws}/good.yaml", "trainer.resume={ws}/crafted.ckpt"],
                                   "error: {ws}/crafted.ckpt: refused to load: the file holds code"),
    "ckpt-resume-missing": (["train", "{ws}/good.yaml", "trainer.resume={ws}/nope.ckpt"],
                            "error: trainer.resume: checkpoint not found: {ws}/nope.ckpt"),
    "ckpt-empty-file": (["export", "{ws}/run", "--ckpt", "{ws}/empty.ckpt", "--out", "{ws}/out"],
                        "error: {ws}/empty.ckpt: empty file, not a checkpoint"),
    "ckpt-foreign-file": (["eval", "{ws}/run", "--ckpt", "{ws}/foreign.ckpt"], "error: {ws}/foreign.ckpt: not a PyTorch checkpoint"),
    "ckpt-tensors-not-ours": (["export", "{ws}/run", "--ckpt", "{ws}/tensors_only.pt", "--out", "{ws}/out"],
                              "error: {ws}/tensors_only.pt: not an ecomtrain checkpoint (no 'state_dict')"),
    "ckpt-plain-folder": (["eval", "{ws}/run", "--ckpt", "{ws}/plain_folder.ckpt"],
                          "error: {ws}/plain_folder.ckpt: a folder but not a DeepSpeed checkpoint (no 'latest' file)"),
    # run folders
    "run-no-recipe": (["eval", "{ws}/not_a_run"], "error: {ws}/not_a_run: not a run directory (no recipe.yaml)"),
    "run-no-checkpoint": (["eval", "{ws}/no_ckpt_run"], "error: {ws}/no_ckpt_run: no complete checkpoint in {ws}/no_ckpt_run/checkpoints"),
    "export-out-not-empty": (["export", "{ws}/run", "--out", "{ws}/run"], "error: {ws}/run: exists and is not empty (pass --force to replace it)"),
    # CLI flags
    "flag-bad-split": (["eval", "{ws}/run", "--split", "train"],
                       "error: ecomtrain eval: argument --split: invalid choice: 'train' (choose from 'val', 'test')"),
    "flag-unknown-verb": (["fly"], "error: ecomtrain: argument verb: invalid choice: 'fly'"),
    "flag-missing-out": (["export", "{ws}/run"], "error: ecomtrain export: the following arguments are required: --out"),
}


def _snapshot(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_symlink():
            out[str(p.relative_to(root))] = "->" + os.readlink(p)
    return out


@pytest.mark.parametrize("row", list(ROWS))
def test_fault_row(ws, row):
    argv, expected = ROWS[row]
    argv = [a.format(ws=ws) for a in argv]
    expected = expected.format(ws=ws)
    before = _snapshot(ws)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "ecomtrain.cli", *argv], capture_output=True, text=True, env=env,
                          cwd=str(ws), timeout=300)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(expected), f"\n got: {lines[0]}\nwant: {expected}..."
    if "crafted" in row:
        assert "refused to load: the file holds code" in lines[0]
    assert _snapshot(ws) == before  # nothing written earlier lost or changed, nothing new left behind
    assert not (ws / MARKER).exists(), "the crafted pickle ran its payload"
