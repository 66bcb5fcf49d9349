#!/usr/bin/env bash
# Join a GPU machine to the team's Prefect work pool: one flow run (one training process) per GPU at a time.
#   PREFECT_API_URL=http://head:4200/api MLFLOW_TRACKING_URI=http://head:5000 infra/team/worker.sh
# Run it from a checkout of this repository with `make install` done (the flows run from this folder).
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${PREFECT_API_URL:?set PREFECT_API_URL=http://<head>:4200/api}"
: "${MLFLOW_TRACKING_URI:?set MLFLOW_TRACKING_URI=http://<head>:5000}"
export DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true
POOL="${RPG_POOL:-gpu-pool}"
GPUS="${RPG_GPUS:-$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | paste -sd, - || true)}"
SLOTS=$(( $(echo "${GPUS}" | tr ',' '\n' | grep -c . || true) ))
SLOTS=$(( SLOTS > 0 ? SLOTS : 1 ))
.venv/bin/prefect work-pool create "$POOL" --type process 2>/dev/null || true   # once per team; idempotent here
.venv/bin/python -m flows.deploy --pool "$POOL"                                  # deployments on the pool
echo "worker on pool $POOL with $SLOTS slot(s), GPUs '${GPUS}'"
exec .venv/bin/prefect worker start --pool "$POOL" --limit "$SLOTS"
