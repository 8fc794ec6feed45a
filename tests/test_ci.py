""".ci/run's tier logic: pytest's exit 5 ("no tests collected") fails a tier, and a failing tier does not
stop the next one. Runs the script's own ``tier`` function (extracted from .ci/run) on real pytest calls.

    OMP_NUM_THREADS=1 pytest tests/test_ci.py
"""

from __future__ import annotations

import subprocess

from conftest import REPO


def _tiers(*calls: str) -> subprocess.CompletedProcess:
    script = (REPO / ".ci" / "run").read_text()
    start = script.index("tier() {")
    end = script.index("\n}\n", start) + 3
    body = script[start:end] + "failed=()\n" + "\n".join(calls) + '\necho "FAILED=${failed[*]}"\n'
    return subprocess.run(["bash", "-c", body], cwd=str(REPO), capture_output=True, text=True, timeout=240)


def test_no_tests_collected_fails_the_tier_and_later_tiers_still_run():
    proc = _tiers("tier empty -m no_such_marker_anywhere -p no:cacheprovider -q",
                  "tier ok tests/test_cli_help.py -p no:cacheprovider -q")
    assert "tier empty: no tests collected (exit 5)" in proc.stderr, proc.stderr
    assert "[ci] tier ok: exit 0" in proc.stderr, proc.stderr  # the next tier ran and passed
    assert proc.stdout.strip().splitlines()[-1] == "FAILED=empty", proc.stdout


def test_ci_runs_every_marked_tier():
    script = (REPO / ".ci" / "run").read_text()
    for tier in ("tier default", "tier launch -m launch", "tier distributed -m distributed", "tier slurm -m slurm"):
        assert tier in script
    assert "SKIPPED" in script and 'id -u' in script  # non-root: Slurm skipped with a reason, never fatal
