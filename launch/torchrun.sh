#!/usr/bin/env bash
# Launch training with torchrun: one process per GPU on each node.
#
#   single node:  launch/torchrun.sh configs/clip/vit_b32.yaml --run-dir runs/clip-b32
#   multi node:   on every node, with the same MASTER_ADDR (the first node's address):
#                 NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=node0 launch/torchrun.sh CONFIG --run-dir DIR
#
# Environment: NNODES (default 1), NODE_RANK (default 0), GPUS_PER_NODE (default: all visible GPUs, or 1),
# MASTER_ADDR (default 127.0.0.1), MASTER_PORT (default 29500). Everything after the script name is passed to
# `python -m pipeline train`. Re-running the same command resumes from RUN_DIR/checkpoints/latest.
set -euo pipefail
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
if [[ -z "${GPUS_PER_NODE:-}" ]]; then
  GPUS_PER_NODE=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  [[ "${GPUS_PER_NODE}" -gt 0 ]] || GPUS_PER_NODE=1
fi
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
PYTHON=${PYTHON:-python}

exec "$PYTHON" -m torch.distributed.run \
  --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$GPUS_PER_NODE" \
  --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
  -m pipeline train "$@"
