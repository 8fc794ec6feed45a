#!/usr/bin/env bash
# Launch `ecomtrain train` with torchrun: one node, or many nodes through a rendezvous.
#
#   launch/torchrun.sh RECIPE.yaml [dotted.key=value ...]                 # one node, all its GPUs
#   NPROC_PER_NODE=2 launch/torchrun.sh recipes/quickstart.yaml trainer.accelerator=cpu trainer.strategy.name=ddp
#
# Many nodes (run the same line on every node; RUN_DIR on a shared filesystem):
#   static:  NNODES=2 NODE_RANK=0|1 MASTER_ADDR=node0 MASTER_PORT=29500 RUN_ID=exp1 launch/torchrun.sh RECIPE
#   c10d:    NNODES=2 RDZV_ENDPOINT=node0:29400 RUN_ID=exp1 launch/torchrun.sh RECIPE   (node ranks assigned)
#   etcd:    NNODES=2 RDZV_BACKEND=etcd-v2 RDZV_ENDPOINT=etcd:2379 RUN_ID=exp1 launch/torchrun.sh RECIPE
#
# Environment (all optional):
#   NPROC_PER_NODE  processes per node (default: number of visible GPUs, else 1)
#   NNODES          number of nodes (default 1)
#   NODE_RANK       this node's rank, static rendezvous only (default 0)
#   MASTER_ADDR/MASTER_PORT   static rendezvous on node 0 (used when NNODES > 1 and no RDZV_ENDPOINT)
#   RDZV_ENDPOINT   host:port of a c10d store (on one of the nodes) or of etcd; RDZV_BACKEND (default c10d)
#   RUN_ID          names the run and the rendezvous (default: a timestamp; set it for multi-node so that
#                   every node agrees on RUN_DIR)
#   RUN_ROOT        parent of run directories (default runs); RUN_DIR: exact run directory
#                   (default RUN_ROOT/<recipe name>-RUN_ID)
#   MAX_RESTARTS    torchrun --max-restarts (default 3): a failed worker restarts the whole group,
#                   which resumes from RUN_DIR/checkpoints/last.ckpt (trainer.resume=auto)
#   PYTHON          interpreter (default python); TORCHRUN_ARGS: extra torchrun flags
#   ENTRY           what torchrun starts per process (default "-m ecomtrain.cli"; a script path
#                   taking the same arguments works too, e.g. the test suite's tests/faulty_train.py)
# Later overrides win, so "run.dir=..." or "trainer.resume=PATH" on the command line replace ours.
set -euo pipefail

if [[ $# -lt 1 ]]; then
  sed -n '2,9p' "$0" >&2
  exit 2
fi
RECIPE="$1"; shift

PYTHON="${PYTHON:-python}"
NNODES="${NNODES:-1}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
  [[ "$NPROC_PER_NODE" -gt 0 ]] 2>/dev/null || NPROC_PER_NODE=1
fi
if [[ "$NNODES" -gt 1 && -z "${RUN_ID:-}" && -z "${RUN_DIR:-}" ]]; then
  echo "torchrun.sh: set RUN_ID (or RUN_DIR) on every node so that all nodes write to one run directory" >&2
  exit 2
fi
RUN_ID="${RUN_ID:-$(date +%Y%m%d-%H%M%S)}"
RUN_DIR="${RUN_DIR:-${RUN_ROOT:-runs}/$(basename "${RECIPE%.*}")-${RUN_ID}}"

args=(--nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" --max-restarts="${MAX_RESTARTS:-3}")
if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
  # dynamic rendezvous: torchrun assigns node ranks; the id keeps separate jobs apart
  args+=(--rdzv-backend="${RDZV_BACKEND:-c10d}" --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="$RUN_ID")
elif [[ "$NNODES" -gt 1 ]]; then
  : "${MASTER_ADDR:?torchrun.sh: NNODES>1 needs MASTER_ADDR (or RDZV_ENDPOINT)}"
  args+=(--node-rank="${NODE_RANK:-0}" --master-addr="$MASTER_ADDR" --master-port="${MASTER_PORT:-29500}")
else
  args+=(--standalone)  # one node: a local c10d store on a free port
fi
# shellcheck disable=SC2206  # TORCHRUN_ARGS is deliberately word-split
args+=(${TORCHRUN_ARGS:-})

# With the c10d rendezvous, torchrun lets the workers reuse its own TCPStore; after a restart the
# new workers can then read the previous attempt's gloo/NCCL addresses from it and fail to connect
# (pytorch/pytorch#135712; seen here with gloo on torch 2.13). A fresh store per attempt avoids it.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"

if [[ "${NODE_RANK:-0}" == 0 ]]; then
  echo "[torchrun.sh] $NNODES node(s) x $NPROC_PER_NODE process(es), run dir $RUN_DIR, max restarts ${MAX_RESTARTS:-3}" >&2
fi
read -r -a ENTRY_CMD <<<"${ENTRY:--m ecomtrain.cli}"
exec "$PYTHON" -m torch.distributed.run "${args[@]}" "${ENTRY_CMD[@]}" train "$RECIPE" \
  run.dir="$RUN_DIR" trainer.resume=auto trainer.num_nodes="$NNODES" trainer.devices="$NPROC_PER_NODE" "$@"
