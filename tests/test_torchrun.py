"""launch/torchrun.sh on CPU, 2 processes (DDP over gloo, tiny Qwen2, 200 synthetic users, 8 steps).

- restart: rank 1 dies (os._exit) after step 5 on the first attempt; torchrun (--max-restarts=1)
  restarts both workers, which resume from the step-4 checkpoint and finish;
- multi-node: two torchrun.sh "nodes" of one process each, static rendezvous on 127.0.0.1.

    OMP_NUM_THREADS=1 pytest -m distributed tests/test_torchrun.py -s
"""

from __future__ import annotations

import socket
import subprocess
import time

import pytest

from launchhelp import REPO, child_env, faulty_entry, metrics, run, starts, tiny_data, tiny_recipe

SCRIPT = str(REPO / "launch" / "torchrun.sh")
pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900)]  # two attempts of a 2-process run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_killed_rank_restarts_and_resumes(tmp_path):
    recipe = tiny_recipe(tmp_path / "tiny.yaml", tiny_data(tmp_path))
    run_dir = tmp_path / "run"
    env = child_env(NPROC_PER_NODE="2", MAX_RESTARTS="1", RUN_DIR=str(run_dir),
                    ENTRY=faulty_entry("crash_at=5,crash_rank=1,crash_attempt=0"))
    t0 = time.time()
    proc = run(["bash", SCRIPT, str(recipe)], env=env, cwd=str(tmp_path), timeout=600)
    log = proc.stdout + proc.stderr
    print(f"[timing] torchrun restart test: {time.time() - t0:.1f}s")
    assert proc.returncode == 0, log[-4000:]
    # first attempt from 0; the restarted one from the last checkpoint (every 2 steps -> step 4)
    assert starts(log) == [(0, 0), (4, 1)], log[-4000:]
    assert "(exitcode: 17) local_rank: 1" in log  # the injected death of rank 1
    assert f"resuming from {run_dir}/checkpoints/step4.ckpt" in log
    assert metrics(run_dir)["train/global_step"] == 8


def test_two_nodes_static_rendezvous(tmp_path):
    recipe = tiny_recipe(tmp_path / "tiny.yaml", tiny_data(tmp_path))
    port = str(_free_port())
    common = dict(NNODES="2", NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RUN_ID="two",
                  RUN_ROOT=str(tmp_path / "runs"), MAX_RESTARTS="0")
    t0 = time.time()
    nodes = [
        subprocess.Popen(["bash", SCRIPT, str(recipe)], env=child_env(NODE_RANK=str(r), **common), cwd=str(tmp_path),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in (0, 1)
    ]
    try:
        logs = [p.communicate(timeout=600)[0] for p in nodes]
    finally:
        for p in nodes:
            p.kill()
    print(f"[timing] torchrun 2-node static rendezvous test: {time.time() - t0:.1f}s")
    for p, log in zip(nodes, logs):
        assert p.returncode == 0, log[-4000:]
    assert "MEMBER: 2/2" in logs[0] + logs[1]
    m = metrics(tmp_path / "runs" / "tiny-two")  # one RUN_DIR for both nodes
    assert m["train/global_step"] == 8
