#!/bin/bash
# Slurm batch script: each array task runs one httpov worker until the
# farm has had no work for it for 10 minutes, the job's time limit or
# scancel. Usage: README.md in this folder.
#SBATCH --job-name=httpov-workers
#SBATCH --array=1-8
#SBATCH --cpus-per-task=4
#SBATCH --mem-per-cpu=2G
#SBATCH --time=04:00:00
#SBATCH --output=httpov-worker-%A_%a.log
# Send SIGTERM to this script (B:) 120 s before the time limit, so that
# the worker can give its task back before Slurm kills every process.
#SBATCH --signal=B:TERM@120

set -euo pipefail

url=${HTTPOV_URL:-http://farm.example:8080/}
httpov=${HTTPOV_PY:-$HOME/httpov/httpov.py}
# The worker token comes from a file, which keeps it off the job's command
# line. HTTPOV_TOKEN from the submitting shell is not used: sbatch passes
# it on, and there it is often the admin token.
token_file=${HTTPOV_TOKEN_FILE:-$HOME/.config/httpov/worker-token}
HTTPOV_TOKEN=${HTTPOV_WORKER_TOKEN:-$(cat "$token_file")}
export HTTPOV_TOKEN

# Node-local work folder, removed when this script exits.
workdir=${TMPDIR:-/tmp}/httpov-worker-${SLURM_JOB_ID:-$$}
trap 'rm -rf "$workdir"' EXIT

python3 "$httpov" work "$url" \
    --name "slurm-${SLURM_ARRAY_JOB_ID:-0}-${SLURM_ARRAY_TASK_ID:-0}" \
    --group slurm \
    --threads "${SLURM_CPUS_PER_TASK:-1}" \
    --workdir "$workdir" \
    --exit-when-idle "${HTTPOV_IDLE_SECONDS:-600}" &
worker=$!

# bash runs a trap only when the command in the foreground ends, so the
# worker runs in the background and the script waits for it.
stopping=0
stop_worker() {
    stopping=1
    kill -TERM "$worker" 2>/dev/null || true
}
trap stop_worker TERM INT

status=0
wait "$worker" || status=$?
# A trapped signal ends wait early: wait again until the worker has
# given its task back and exited.
while [ "$stopping" = 1 ] && kill -0 "$worker" 2>/dev/null; do
    status=0
    wait "$worker" || status=$?
done
exit "$status"
