"""No committed file holds an absolute path of one machine's work folder (e.g. the shared data folder):
recipes, tests and results use repo-relative paths such as ../shared/data/... instead.

docker/ is exempt: the work folder there is the image's WORKDIR, a path inside the container.
Outside tests/, a path under the system temp folder is one run's scratch folder (a recorded bench command, a results
file): it says WORK or a repo-relative path instead.
"""

from __future__ import annotations

import re
import subprocess

from conftest import REPO

FORBIDDEN = re.compile("/" + "work" + "/")  # split so that this file does not match itself
TMP = re.compile("/" + "tmp" + "/")
EXEMPT = ("docker/",)


def test_no_absolute_work_paths_in_committed_files():
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    assert len(files) > 50  # the listing worked
    hits = []
    for name in files:
        if name.startswith(EXEMPT):
            continue
        try:
            text = (REPO / name).read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue
        scratch = not name.startswith("tests/")
        hits += [f"{name}:{i}: {line.strip()[:120]}" for i, line in enumerate(text.splitlines(), 1)
                 if FORBIDDEN.search(line) or (scratch and TMP.search(line))]
    assert not hits, "absolute machine paths:\n" + "\n".join(hits)
