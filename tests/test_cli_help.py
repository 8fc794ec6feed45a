"""``--help`` answers for every verb and sub-verb (exit 0, usage naming the verb), and bench results are JSON.

    OMP_NUM_THREADS=1 pytest tests/test_cli_help.py
"""

from __future__ import annotations

import argparse
import json

import pytest

from conftest import REPO
from ecomtrain import cli

EXPECTED = {"data synth", "data build", "data inspect", "train", "eval", "export", "recommend", "model fetch"}


def _verbs(p: argparse.ArgumentParser, prefix: tuple = ()) -> list[tuple[str, ...]]:
    subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [prefix]
    out = []
    for name, child in subs[0].choices.items():
        out += _verbs(child, (*prefix, name))
    return out


VERBS = _verbs(cli.parser())


def test_every_verb_is_covered():
    assert {" ".join(v) for v in VERBS} == EXPECTED  # a new verb must be added here (and get --help)


@pytest.mark.parametrize("verb", [(), ("data",), *VERBS], ids=lambda v: " ".join(v) or "top")
def test_help(verb, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([*verb, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {' '.join(('ecomtrain', *verb))}"), out[:200]
    assert "--help" in out


def test_bench_results_are_json():
    files = sorted((REPO / "bench" / "results").glob("*.json"))
    assert files
    for f in files:
        json.loads(f.read_text())  # raises on anything before or after the object
