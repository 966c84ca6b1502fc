#!/usr/bin/env bash
# Launch training with the DeepSpeed launcher.
#
#   this machine, one process per GPU:  launch/deepspeed.sh CONFIG --run-dir DIR
#   the hosts of a hostfile:            HOSTFILE=launch/hostfile.example launch/deepspeed.sh CONFIG --run-dir DIR
#
# Environment (all optional):
#   HOSTFILE     "host slots=N" lines (see hostfile.example). Several hosts: the launcher starts every host's
#                processes over pdsh/ssh (passwordless ssh, the same paths and RUN_DIR on every host). A hostfile
#                naming only localhost/127.0.0.1 starts its slots on this machine, without ssh (how the test runs).
#   MASTER_ADDR  address of the first host (default: what the launcher reads there over ssh; 127.0.0.1 for localhost)
#   MASTER_PORT  rendezvous port (default 29500)
#   PYTHON       the interpreter whose deepspeed is used (default python)
# The launcher sets RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT for every process; the pipeline reads them.
# A failed process ends the whole job (no automatic restarts; see launch/torchrun.sh for those): run the same
# command again to resume from RUN_DIR/checkpoints/latest.
# tests/launch/test_launchers.py runs this script with a localhost hostfile.
set -euo pipefail
PYTHON=${PYTHON:-python}
args=(--master_port "${MASTER_PORT:-29500}" --no_local_rank)  # LOCAL_RANK comes from the environment
if [[ -n "${HOSTFILE:-}" ]]; then
  args+=(--hostfile "$HOSTFILE")
  hosts=$(awk '!/^[[:space:]]*(#|$)/ {print $1}' "$HOSTFILE" | sort -u)
  if [[ -z "$(grep -vxE 'localhost|127\.0\.0\.1' <<<"$hosts" || true)" ]]; then
    args+=(--no_ssh_check)  # this machine only: no ssh to check, and no remote host to ask for its address
    MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
  fi
fi
if [[ -n "${MASTER_ADDR:-}" ]]; then
  args+=(--master_addr "$MASTER_ADDR")
fi
exec "$PYTHON" -m deepspeed.launcher.runner "${args[@]}" --module pipeline train "$@"
