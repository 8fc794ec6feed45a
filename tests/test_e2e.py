"""End to end through the CLI: a shrunken quickstart (synth -> shards -> train -> metrics.json)."""

import json
import subprocess
import sys

import pytest

from conftest import REPO

SHRINK = [
    "data.build.synth.num_users=400",
    "data.build.synth.num_items=100",
    "data.batch_size=32",
    "trainer.max_epochs=3",
    "trainer.progress_bar=false",
]


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "ecomtrain.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qs")
    r = _cli("train", str(REPO / "recipes" / "quickstart.yaml"), f"data.path={tmp}/data", f"run.out_dir={tmp}/runs", *SHRINK, cwd=tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, r


def test_quickstart_end_to_end(quickstart_run):
    tmp, r = quickstart_run
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("run dir: ")
    run_dir = tmp / last.split("run dir: ", 1)[1]
    m = json.loads((run_dir / "metrics.json").read_text())
    for k in ("test/ndcg@10", "test/hr@10", "test/mrr", "val/ndcg@10", "baseline/popularity/test/ndcg@10", "test/ndcg@5", "test/hr@20"):
        assert 0.0 <= m[k] <= 1.0, k
    assert m["eval/exclude_seen"] is False and "test/excl_seen/ndcg@10" in m
    # the learned model must clearly beat popularity on data with sequential structure
    assert m["test/ndcg@10"] >= 2 * m["baseline/popularity/test/ndcg@10"]
    assert (run_dir / "recipe.yaml").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    # W&B ran offline (no key) and wrote a real run folder
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert runs and any(runs[0].glob("*.wandb"))
    # ...that holds the loss, learning rate, metrics and the resolved recipe
    record = next(runs[0].glob("*.wandb")).read_bytes()
    for key in (b"train/loss", b"lr-AdamW", b"val/ndcg@10", b"test/ndcg@10", b"baseline/popularity/test/ndcg@10", b"max_history"):
        assert key in record, key
    # the resolved recipe holds the overrides
    assert "num_users: 400" in (run_dir / "recipe.yaml").read_text()


def test_eval_verb_reproduces_test_metrics(quickstart_run):
    tmp, r = quickstart_run
    run_dir = tmp / r.stdout.strip().splitlines()[-1].split("run dir: ", 1)[1]
    m = json.loads((run_dir / "metrics.json").read_text())
    e = _cli("eval", str(run_dir), cwd=tmp)
    assert e.returncode == 0, e.stderr[-3000:]
    out = json.loads(e.stdout[e.stdout.index("{"):])
    assert out["test/ndcg@10"] == pytest.approx(m["test/ndcg@10"], abs=1e-6)


def test_help_for_every_verb(tmp_path):
    for verb in (["--help"], ["data", "synth", "--help"], ["data", "build", "--help"], ["data", "inspect", "--help"], ["train", "--help"], ["eval", "--help"]):
        r = _cli(*verb, cwd=tmp_path)
        assert r.returncode == 0 and "usage:" in r.stdout


def test_same_seed_same_metrics(tmp_path, tiny_dataset):
    """Determinism: two runs with one seed on one machine give identical metrics (tolerance 0)."""
    from conftest import tiny_recipe

    from ecomtrain.config import validate_tree
    from ecomtrain.train.runner import train

    out = []
    for i in range(2):
        cfg = validate_tree(tiny_recipe(tiny_dataset, tmp_path / f"run{i}", model__hidden_dropout=0.2, model__attention_dropout=0.1))
        run_dir = train(cfg, log=lambda *_: None)
        m = json.loads((run_dir / "metrics.json").read_text())
        out.append({k: v for k, v in m.items() if k.startswith(("test/", "val/", "baseline/"))})
    assert out[0] == out[1]
