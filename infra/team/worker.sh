#!/usr/bin/env bash
# Join a GPU machine to the team's Prefect work pool: one flow run (one training process) per GPU at a time.
#   PREFECT_API_URL=http://head:4200/api MLFLOW_TRACKING_URI=http://head:5000 infra/team/worker.sh
# Run it from a checkout of this repository at the same path as the head's (the flows run from this folder), with
# `make install` done. RPG_POOL (default gpu-pool), RPG_GPUS (default: every GPU nvidia-smi lists), PYTHON (default
# .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${PREFECT_API_URL:?set PREFECT_API_URL=http://<head>:4200/api}"
: "${MLFLOW_TRACKING_URI:?set MLFLOW_TRACKING_URI=http://<head>:5000}"
export DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true
PY="${PYTHON:-.venv/bin/python}"
POOL="${RPG_POOL:-gpu-pool}"
GPUS="${RPG_GPUS-$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | paste -sd, - || true)}"
SLOTS=$(( $(echo "${GPUS}" | tr ',' '\n' | grep -c . || true) ))
SLOTS=$(( SLOTS > 0 ? SLOTS : 1 ))
export RPG_GPUS="$GPUS"                 # the flow runs' default devices (a sweep's empty `gpus` field: these)
"$PY" -m flows.deploy --pool "$POOL"    # the pool if missing, and the deployments on it (idempotent)
echo "worker on pool $POOL with $SLOTS slot(s), GPUs '${GPUS}'"
exec "$PY" -m prefect worker start --pool "$POOL" --type process --limit "$SLOTS" --name "$(hostname)-rpg"
