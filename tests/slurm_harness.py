"""A real one-node Slurm for the @pytest.mark.slurm tests.

``slurm_cluster()`` runs ``.ci/slurm-setup.sh`` (installs slurm-wlm + munge with apt when
missing, writes /etc/slurm/slurm.conf for this host, starts munged, slurmctld and slurmd; a
healthy cluster is left alone). It needs root; without root the tests are skipped with the reason.
The helpers below submit with ``sbatch`` and follow a job through ``squeue`` / ``scontrol``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SETUP = REPO / ".ci" / "slurm-setup.sh"


def slurm_cluster() -> None:
    if os.geteuid() != 0 and not shutil.which("sbatch"):
        pytest.skip("the Slurm tests install and start Slurm, which needs root (or run .ci/slurm-setup.sh first)")
    if os.geteuid() != 0:
        ok = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
        if "is UP" not in ok.stdout:
            pytest.skip("Slurm is installed but not running, and starting it needs root (.ci/slurm-setup.sh)")
        return
    proc = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f".ci/slurm-setup.sh failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


def sbatch(script: Path, *args: str, sbatch_opts: tuple[str, ...] = (), cwd: Path, env: dict) -> str:
    cmd = ["sbatch", "--parsable", *sbatch_opts, str(script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(cwd), env=env)
    assert proc.returncode == 0, f"sbatch failed: {proc.stderr}"
    return proc.stdout.strip().split(";")[0]


def job_info(job: str) -> dict[str, str]:
    """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...); {} once Slurm forgot it."""
    proc = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True)
    if proc.returncode != 0:
        return {}
    return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))


def wait_for(pred, timeout: float, what: str, poll: float = 1.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        got = pred()
        if got:
            return got
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def wait_done(job: str, timeout: float = 600) -> dict[str, str]:
    """Wait until the job left the queue for good (COMPLETED/FAILED/CANCELLED/TIMEOUT); returns its info."""
    final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL"}
    return wait_for(lambda: (i := job_info(job)) and i.get("JobState") in final and i, timeout, f"job {job} to end")


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def cancel(job: str) -> None:
    subprocess.run(["scancel", job], capture_output=True)
