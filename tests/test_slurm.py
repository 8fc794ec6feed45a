"""launch/slurm.sbatch on a real one-node Slurm (installed and started by tests/slurm_harness.py).

Two tasks on CPU (DDP over gloo, Qwen2 with 2 layers / hidden 64, 200 synthetic users), 8 steps:
a plain job; a job signalled by hand mid-run (requeue + resume); a job signalled by the time limit
(the slowest, ~3 min: it waits for Slurm's clock).

    sudo OMP_NUM_THREADS=1 pytest -m slurm tests/test_slurm.py -s
"""

from __future__ import annotations

import subprocess
import time

import pytest

from launchhelp import PY, REPO, child_env, faulty_entry, metrics, starts, tiny_data, tiny_recipe
from slurm_harness import cancel, job_info, read, sbatch, slurm_cluster, wait_done, wait_for

SCRIPT = REPO / "launch" / "slurm.sbatch"
# 2 tasks of 1 CPU: the header's 8 CPUs per task are for GPU nodes
OPTS = ("--ntasks-per-node=2", "--cpus-per-task=1")

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(1200)]  # the time-limit job alone waits ~4 min for Slurm's clock


@pytest.fixture(scope="module")
def cluster():
    slurm_cluster()


def _submit(tmp_path, **env):
    ds = tiny_data(tmp_path)
    recipe = tiny_recipe(tmp_path / "tiny.yaml", ds)
    e = child_env(RUN_ROOT=str(tmp_path / "runs"), **env)
    return sbatch(SCRIPT, str(recipe), sbatch_opts=OPTS, cwd=tmp_path, env=e)


def test_sbatch_trains_two_tasks(cluster, tmp_path):
    t0 = time.time()
    job = _submit(tmp_path)
    try:
        info = wait_done(job, timeout=600)
    finally:
        cancel(job)
    log = read(tmp_path / f"ecomtrain-{job}.out")
    print(f"[timing] slurm 2-task DDP job: {time.time() - t0:.1f}s")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log[-3000:])
    assert "1 node(s) x 2 task(s)" in log
    assert "MEMBER: 2/2" in log  # Lightning's SLURMEnvironment saw both tasks
    run_dir = tmp_path / "runs" / f"tiny-{job}"  # RUN_DIR from the job id
    m = metrics(run_dir)
    assert m["train/global_step"] == 8
    assert 0.0 <= m["test/ndcg@10"] <= 1.0 and "baseline/popularity/test/ndcg@10" in m
    assert starts(log) == [(0, 0)]


def test_sbatch_requeue_resumes_from_checkpoint(cluster, tmp_path):
    """SIGUSR1 to the batch shell (what --signal=B:USR1@120 does before the time limit) -> every task
    checkpoints at the same step and exits 75 -> the script requeues -> the job resumes there and ends."""
    t0 = time.time()
    # pause_at=3: the first attempt holds at step 3 until the signal comes, so it is surely mid-run
    job = _submit(tmp_path, ECOMTRAIN=f"{PY} {faulty_entry('pause_at=3')}")
    out = tmp_path / f"ecomtrain-{job}.out"
    try:
        wait_for(lambda: starts(read(out)), 300, "the first attempt to start training")
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
        requeued = lambda: (i := job_info(job)).get("Restarts") == "1" and i.get("JobState") == "PENDING"  # noqa: E731
        wait_for(requeued, 180, "the job to be requeued")
        # Slurm holds a requeued job for 120 s (BeginTime) before it may start again; on a test
        # cluster there is nothing to wait for. Not sooner than 2 s after the requeue, though:
        # slurmd rejects a credential issued in the same second as the revoked one
        time.sleep(3)
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)
        info = wait_done(job, timeout=600)
    finally:
        cancel(job)
    log = read(out)
    print(f"[timing] slurm requeue job (2 attempts): {time.time() - t0:.1f}s")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log[-3000:])
    assert info["Restarts"] == "1"
    assert "exit 75" in log and f"requeueing job {job}" in log

    attempts = starts(log)
    assert len(attempts) == 2 and attempts[0] == (0, 0), attempts
    resumed_at, restart = attempts[1]
    assert restart == 1 and 1 <= resumed_at <= 4, attempts  # from where it stopped (at most 1 step past the pause), not 0
    assert f"preempted at step {resumed_at}" in log
    run_dir = tmp_path / "runs" / f"tiny-{job}"  # the same RUN_DIR on both attempts
    assert f"resuming from {run_dir}/checkpoints/" in log
    assert metrics(run_dir)["train/global_step"] == 8
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp-")]


def test_time_limit_signal_requeues_and_finishes(cluster, tmp_path):
    """The header's own --signal=B:USR1@120, fired by Slurm's clock: a 4-minute limit sends SIGUSR1
    60-120 s after the start (Slurm may send it up to 60 s early); the first attempt holds at step 3
    until then. Each later attempt must start from a checkpoint (step > 0) and the job must finish."""
    t0 = time.time()
    ds = tiny_data(tmp_path)
    recipe = tiny_recipe(tmp_path / "tiny.yaml", ds)
    env = child_env(RUN_ROOT=str(tmp_path / "runs"), ECOMTRAIN=f"{PY} {faulty_entry('pause_at=3')}")
    job = sbatch(SCRIPT, str(recipe), sbatch_opts=(*OPTS, "--time=4"), cwd=tmp_path, env=env)
    final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}
    try:
        while True:
            info = job_info(job)
            if info.get("JobState") in final or time.time() - t0 > 900:
                break
            if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
                time.sleep(3)  # lift the 120 s requeue hold (see the test above)
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)
            time.sleep(1)
    finally:
        cancel(job)
    log = read(tmp_path / f"ecomtrain-{job}.out")
    print(f"[timing] slurm time-limit requeue job: {time.time() - t0:.1f}s")
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1, (info, log[-3000:])
    assert "SIGUSR1: asking the tasks to checkpoint" in log and "exit 75" in log
    attempts = starts(log)
    assert attempts[0] == (0, 0) and len(attempts) == int(info["Restarts"]) + 1, attempts
    assert all(step > 0 for step, _ in attempts[1:]), attempts
    assert metrics(tmp_path / "runs" / f"tiny-{job}")["train/global_step"] == 8
