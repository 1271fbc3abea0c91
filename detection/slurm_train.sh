#!/usr/bin/env bash
# Train on a Slurm cluster (one task per GPU, mmengine's slurm launcher).
#
#   [GPUS=8] [GPUS_PER_NODE=8] [CPUS_PER_TASK=5] [SRUN_ARGS=...] \
#     detection/slurm_train.sh PARTITION JOB_NAME CONFIG WORK_DIR [tools/train.py options]
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/_launch.sh"
[[ $# -ge 4 ]] || { echo "usage: $0 PARTITION JOB_NAME CONFIG WORK_DIR [train.py options]" >&2; exit 2; }
PARTITION=$1; JOB_NAME=$2; CONFIG=$3; WORK_DIR=$4; shift 4
slurm_launch "$PARTITION" "$JOB_NAME" "$HERE/tools/train.py" "$CONFIG" --work-dir="$WORK_DIR" --launcher=slurm "$@"
