#!/usr/bin/env bash
# Cloud TPU VM pod: run the same `cinema-jax train` on every worker; JAX's TPU backend discovers the pod, and
# CINEMA_DISTRIBUTED=auto makes the loop call jax.distributed.initialize() (no arguments) on each worker.
#
#   launch/tpu_pod.sh TPU_NAME ZONE --config=configs/mae_pretrain.py:base --workdir=gs://BUCKET/runs/mae [--config.k=v ...]
# Env: PROJECT (gcloud project), REPO_DIR (checkout on the workers, default ~/cinema-jax), VENV (default $REPO_DIR/.venv).
# The workdir must be shared by all workers (a gs:// bucket or NFS) for Orbax multi-host checkpoints.
# Re-running the same command resumes from the latest checkpoint.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  sed -n '2,9p' "$0"; exit 2
fi
TPU_NAME=$1; ZONE=$2; shift 2
REPO_DIR=${REPO_DIR:-'~/cinema-jax'}
VENV=${VENV:-"$REPO_DIR/.venv"}
ARGS=$(printf '%q ' "$@")
PROJECT_FLAG=()
if [[ -n "${PROJECT:-}" ]]; then PROJECT_FLAG=(--project "$PROJECT"); fi
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" --worker=all --command \
  "cd $REPO_DIR && CINEMA_DISTRIBUTED=auto CINEMA_NO_PROGRESS=\${CINEMA_NO_PROGRESS:-} launch/with_tcmalloc.sh $VENV/bin/python -m cinema_jax train $ARGS"
