#!/usr/bin/env bash
# Launch training with the DeepSpeed launcher (pdsh over the hosts of a hostfile).
#
#   launch/deepspeed.sh configs/clip/vit_l14.yaml --run-dir runs/clip-l14
#   HOSTFILE=launch/hostfile.example launch/deepspeed.sh CONFIG --run-dir DIR
#
# Environment: HOSTFILE (default: none = this machine only), MASTER_PORT (default 29500).
# The launcher sets RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR for every process; the pipeline reads them.
# The run directory must be on a filesystem shared by all hosts (every rank writes its checkpoint shard).
set -euo pipefail
MASTER_PORT=${MASTER_PORT:-29500}
args=(--master_port "$MASTER_PORT")
if [[ -n "${HOSTFILE:-}" ]]; then
  args+=(--hostfile "$HOSTFILE")
fi
exec deepspeed "${args[@]}" --module pipeline train "$@"
