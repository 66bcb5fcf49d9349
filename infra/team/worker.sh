#!/usr/bin/env bash
# Join a machine to the team's Prefect work pool, with the client settings of the head's env.sh (its URLs and, when
# the head has log-ins, PREFECT_API_AUTH_STRING and MLFLOW_TRACKING_USERNAME/PASSWORD; copied here, mode 600):
#   infra/team/worker.sh ~/rpg-head.env
# or with them in the environment already:
#   PREFECT_API_URL=http://head:4200/api MLFLOW_TRACKING_URI=http://head:5000 infra/team/worker.sh
# Run it from this machine's own checkout, at any path, after `make install`. It starts two Prefect process workers:
# - a GPU worker on queues `gpu` (train, evaluate, nightly) and `gpu-<host>` (runs resuming from a checkpoint on this
#   machine's disk) taking at most one flow run per GPU, so a sweep's runs spread over every machine's free GPUs;
# - a control worker on queue `control` (sweep coordinators: they submit and wait, and hold no GPU).
# Flow runs import the flows from this checkout (PYTHONPATH) and work in it (RPG_ROOT): sweep files, run folders and
# checkpoints are this machine's own; results reach everyone through MLflow.
# RPG_POOL (default gpu-pool), RPG_GPUS (default: every GPU nvidia-smi lists), RPG_HOST (this machine's name in
# MLflow's rpg.host and its concurrency limit rpg-gpu-<host>; default: hostname), RPG_CONTROL_SLOTS (coordinators at
# once, default 4; 0: no control worker here), PYTHON (default .venv/bin/python).
set -euo pipefail
if [ $# -gt 0 ]; then
    [ -r "$1" ] || { echo "worker.sh: $1: no such env file (copy the head's .rpg/stack/env.sh here)" >&2; exit 2; }
    # shellcheck disable=SC1090
    . "$1"                              # export lines only: the flow runs inherit them (the credentials too)
fi
cd "$(dirname "$0")/../.."
: "${PREFECT_API_URL:?set PREFECT_API_URL=http://<head>:4200/api}"
: "${MLFLOW_TRACKING_URI:?set MLFLOW_TRACKING_URI=http://<head>:5000}"
export DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true
PY="${PYTHON:-.venv/bin/python}"
POOL="${RPG_POOL:-gpu-pool}"
GPUS="${RPG_GPUS-$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | paste -sd, - || true)}"
SLOTS=$(( $(echo "${GPUS}" | tr ',' '\n' | grep -c . || true) ))
SLOTS=$(( SLOTS > 0 ? SLOTS : 1 ))
CONTROL="${RPG_CONTROL_SLOTS:-4}"
export RPG_GPUS="$GPUS"                 # the flow runs' default devices (a form's empty `gpus` field: these)
export RPG_HOST="${RPG_HOST:-$(hostname)}"
export RPG_ROOT="$PWD"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SLUG=$(echo "$RPG_HOST" | tr 'A-Z' 'a-z' | sed -E 's/[^a-z0-9-]+/-/g; s/^-+//; s/-+$//')   # flows.core.host_slug
SLUG="${SLUG:-host}"
# both servers answer with these settings (a missing or wrong login: one line naming the variable, exit 2)
"$PY" infra/stack.py check
# the pool if missing, the deployments on it, this machine's own queue (idempotent)
"$PY" -m flows.deploy --pool "$POOL" --queue "gpu-$SLUG"
echo "worker $RPG_HOST on pool $POOL with $SLOTS slot(s), GPUs '${GPUS}', $CONTROL coordinator slot(s), from $RPG_ROOT"
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true; wait' TERM INT
# queue gpu: any run; queue gpu-<host>: runs resuming from a checkpoint on this machine's disk
"$PY" -m prefect worker start --pool "$POOL" --work-queue gpu --work-queue "gpu-$SLUG" --type process \
    --limit "$SLOTS" --name "$RPG_HOST-gpu" &
pids+=($!)
if [ "$CONTROL" -gt 0 ]; then
    "$PY" -m prefect worker start --pool "$POOL" --work-queue control --type process --limit "$CONTROL" \
        --name "$RPG_HOST-control" &
    pids+=($!)
fi
wait -n "${pids[@]}"                   # one worker ended: stop the other too
kill -TERM "${pids[@]}" 2>/dev/null || true
wait
