#!/usr/bin/env bash
# Launch training with torchrun: one process per GPU on each node, restarted as a group when one fails.
#
#   one node:  launch/torchrun.sh CONFIG --run-dir DIR
#   N nodes:   the same command on every node, with the same NNODES, MASTER_ADDR and RDZV_ID:
#              NNODES=4 MASTER_ADDR=node0 RDZV_ID=l14 launch/torchrun.sh CONFIG --run-dir /shared/runs/l14
#
# Environment (all optional):
#   NNODES          nodes in the job (default 1). Fixed, not elastic: a checkpoint is resumed by as many ranks as
#                   wrote it, so the job waits for all NNODES nodes (RDZV_TIMEOUT) instead of shrinking.
#   NPROC_PER_NODE  processes per node (default: GPUS_PER_NODE, else the visible GPUs, else 1)
#   MASTER_ADDR     an address of the node that hosts the c10d rendezvous store (multi-node: required; it must be
#                   reachable from every node). Without it, one node (NNODES=1) uses a free local port (--standalone).
#   MASTER_PORT     the rendezvous port (default 29500)
#   RDZV_ID         the job id every node passes (default: SLURM_JOB_ID, else "t2i"); nodes of different jobs on
#                   the same MASTER_ADDR:MASTER_PORT must use different ids
#   MAX_RESTARTS    how often a failed worker restarts the whole group on every node (default 3). Each restart
#                   resumes from RUN_DIR/checkpoints/latest, losing at most the steps since that checkpoint.
#   RDZV_TIMEOUT    seconds a (re-)rendezvous waits for all nodes before the job fails (default 900)
#   PYTHON          the interpreter (default python)
# Everything after the script name goes to `python -m pipeline train`. Re-running the same command after the job
# ended resumes from RUN_DIR/checkpoints/latest. Node ranks come from the rendezvous (host name order), not from
# the command line: every rank's state lives in the shared RUN_DIR under its rank index, so any order resumes.
# tests/launch/test_launch_elastic.py runs this script as two nodes and kills a worker mid-run.
set -euo pipefail
NNODES=${NNODES:-1}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l || true)}
  [[ "${NPROC_PER_NODE}" -gt 0 ]] || NPROC_PER_NODE=1
fi
MAX_RESTARTS=${MAX_RESTARTS:-3}
RDZV_TIMEOUT=${RDZV_TIMEOUT:-900}
PYTHON=${PYTHON:-python}
# Workers get a fresh store per restart. torch counts restarts per node (the node whose worker failed counts one,
# the others do not), so with the agent's shared store (torch's default) the restarted workers read the previous
# attempt's addresses and their process group never connected (pytorch#135712; a gloo connect timeout here).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}

args=(--nproc-per-node="$NPROC_PER_NODE" --max-restarts="$MAX_RESTARTS")
if [[ "$NNODES" -eq 1 && -z "${MASTER_ADDR:-}" ]]; then
  args+=(--standalone)
else
  if [[ -z "${MASTER_ADDR:-}" ]]; then
    echo "launch/torchrun.sh: NNODES=$NNODES needs MASTER_ADDR (an address of the rendezvous node)" >&2
    exit 2
  fi
  args+=(--nnodes="$NNODES" --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}"
         --rdzv-id="${RDZV_ID:-${SLURM_JOB_ID:-t2i}}" --rdzv-conf="join_timeout=$RDZV_TIMEOUT")
fi
exec "$PYTHON" -m torch.distributed.run "${args[@]}" -m pipeline train "$@"
