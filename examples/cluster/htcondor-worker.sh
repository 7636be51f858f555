#!/bin/sh
# Executable of htcondor-workers.sub. It runs in the job's scratch folder,
# where HTCondor put httpov.py and worker-token, and passes its arguments
# to 'httpov.py work'.
set -eu
# The token comes from a file, because the job's environment and
# arguments are visible to other users through condor_q -long.
HTTPOV_TOKEN=$(cat worker-token)
export HTTPOV_TOKEN
# exec, so that the SIGTERM of condor_rm reaches the worker, which then
# stops POV-Ray and gives its task back.
exec python3 httpov.py work "$@"
