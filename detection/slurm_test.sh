#!/usr/bin/env bash
# Evaluate on a Slurm cluster (one task per GPU, mmengine's slurm launcher).
#
#   [GPUS=8] [GPUS_PER_NODE=8] [CPUS_PER_TASK=5] [SRUN_ARGS=...] \
#     detection/slurm_test.sh PARTITION JOB_NAME CONFIG CHECKPOINT [tools/test.py options]
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/_launch.sh"
[[ $# -ge 4 ]] || { echo "usage: $0 PARTITION JOB_NAME CONFIG CHECKPOINT [test.py options]" >&2; exit 2; }
PARTITION=$1; JOB_NAME=$2; CONFIG=$3; CHECKPOINT=$4; shift 4
slurm_launch "$PARTITION" "$JOB_NAME" "$HERE/tools/test.py" "$CONFIG" "$CHECKPOINT" --launcher=slurm "$@"
