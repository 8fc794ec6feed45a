"""``ecomtrain recommend`` whose rank ``--fail-rank R`` raises in its 2nd scoring batch, for the
multi-process atomic-output test only (the package has no such hook).

    torchrun --standalone --nproc_per_node 2 tests/faulty_recommend.py --fail-rank 1 recommend RUN --split test --out X --devices 2
"""

from __future__ import annotations

import os
import sys

from ecomtrain.cli import main
from ecomtrain.serve.recommend import Recommender

if __name__ == "__main__":
    argv = sys.argv[1:]
    if len(argv) < 2 or argv[0] != "--fail-rank":
        sys.exit("usage: faulty_recommend.py --fail-rank R ecomtrain-args...")
    fail_rank, calls = int(argv[1]), []
    real = Recommender.rank_batch

    def rank_batch(self, *a, **kw):
        calls.append(1)
        if int(os.environ.get("RANK", "0")) == fail_rank and len(calls) == 2:
            raise RuntimeError(f"injected failure on rank {fail_rank}")
        return real(self, *a, **kw)

    Recommender.rank_batch = rank_batch
    sys.exit(main(argv[2:]))
