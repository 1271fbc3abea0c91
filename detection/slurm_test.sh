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
GPUS="${GPUS:-8}"
GPUS_PER_NODE="${GPUS_PER_NODE:-$(( GPUS < 8 ? GPUS : 8 ))}"
CPUS_PER_TASK="${CPUS_PER_TASK:-5}"
# shellcheck disable=SC2086  # SRUN_ARGS is a list of options
srun -p "$PARTITION" --job-name="$JOB_NAME" --gres=gpu:"$GPUS_PER_NODE" --ntasks="$GPUS" \
  --ntasks-per-node="$GPUS_PER_NODE" --cpus-per-task="$CPUS_PER_TASK" --kill-on-bad-exit=1 ${SRUN_ARGS:-} \
  "$PYTHON" -u "$HERE/tools/test.py" "$CONFIG" "$CHECKPOINT" --launcher=slurm "$@"
