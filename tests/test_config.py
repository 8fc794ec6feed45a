import subprocess
import sys

import pytest
import yaml

from ecomtrain.config import RecipeError, apply_overrides, dump_recipe, load_recipe, redact, validate_tree

from conftest import REPO


def _write(tmp_path, tree, name="r.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(tree) if not isinstance(tree, str) else tree)
    return p


def test_quickstart_recipe_is_valid():
    cfg = load_recipe(REPO / "recipes" / "quickstart.yaml")
    assert cfg.data.build is not None and cfg.model.backbone.hidden_size == 64


def test_misspelt_key_gets_did_you_mean(tmp_path):
    p = _write(tmp_path, {"data": {"path": "x"}, "trainer": {"max_epoch": 3}})
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert "trainer.max_epoch" in msg and "did you mean 'max_epochs'" in msg
    assert str(p) in msg


def test_all_problems_reported_together(tmp_path):
    p = _write(
        tmp_path,
        {"data": {"batch_size": "big"}, "optim": {"lr": "fast", "sheduler": "cosine"}, "trainer": {"precision": "fp8"}},
    )
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert "5 problems" in msg
    assert "data.path: required field is missing" in msg
    assert "data.batch_size" in msg and "valid integer" in msg and "'big'" in msg
    assert "optim.lr" in msg and "valid number" in msg
    assert "optim.sheduler: unknown key; did you mean 'scheduler'" in msg
    assert "trainer.precision" in msg and "'bf16-mixed'" in msg


def test_yaml_numbers_and_precision_coercion(tmp_path):
    # PyYAML reads 1e-3 as a string; it must still be accepted as a float
    p = _write(tmp_path, "data: {path: x}\noptim: {lr: 1e-3}\ntrainer: {precision: 32}\n")
    cfg = load_recipe(p)
    assert cfg.optim.lr == pytest.approx(1e-3) and cfg.trainer.precision == "32"


def test_unsafe_yaml_is_refused(tmp_path):
    p = _write(tmp_path, "data: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(p)


def test_overrides(tmp_path):
    p = _write(tmp_path, {"data": {"path": "x"}})
    cfg = load_recipe(p, ["trainer.max_epochs=7", "model.backbone.arch=llama", "eval.ks=[1, 3]"])
    assert cfg.trainer.max_epochs == 7 and cfg.model.backbone.arch == "llama" and cfg.eval.ks == [1, 3]
    with pytest.raises(RecipeError, match="trainer.max_epocs: unknown key; did you mean 'max_epochs'"):
        load_recipe(p, ["trainer.max_epocs=7"])
    with pytest.raises(RecipeError, match="not of the form"):
        apply_overrides({}, ["novalue"])


def test_redaction_and_dump(tmp_path):
    tree = {"a": {"api_key": "s3cret", "wandb_token": "t", "keep_last": 2, "tokens": 5}}
    r = redact(tree)
    assert r["a"]["api_key"] == "<redacted>" and r["a"]["wandb_token"] == "<redacted>"
    assert r["a"]["keep_last"] == 2 and r["a"]["tokens"] == 5
    cfg = validate_tree({"data": {"path": "x"}})
    dump_recipe(cfg, tmp_path / "out.yaml")
    assert validate_tree(yaml.safe_load((tmp_path / "out.yaml").read_text())) == cfg


def test_cli_rejects_bad_recipe_before_building_anything(tmp_path):
    p = _write(tmp_path, {"data": {"path": str(tmp_path / "never")}, "model": {"dropuot": 0.1}})
    r = subprocess.run([sys.executable, "-m", "ecomtrain.cli", "train", str(p)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2
    assert "model.dropuot: unknown key; did you mean 'dropout'" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "never").exists() and not (tmp_path / "runs").exists()
