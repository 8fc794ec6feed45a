"""``ecomtrain`` with fault injection, for subprocess tests only (the package has no such hooks).

    python tests/faulty_train.py --faults crash_at=4 train RECIPE.yaml [dotted.key=value ...]
    torchrun --standalone --nproc_per_node 2 tests/faulty_train.py --faults nan_at=3,nan_rank=1 train RECIPE.yaml

Everything after ``--faults SPEC`` is the ``ecomtrain`` command line (see tests/faults.py for SPEC).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from faults import FaultInjector  # noqa: E402

from ecomtrain.cli import main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    if len(argv) < 2 or argv[0] != "--faults":
        sys.exit("usage: faulty_train.py --faults SPEC ecomtrain-args...")
    sys.exit(main(argv[2:], callbacks=[FaultInjector.from_spec(argv[1])]))
