#!/usr/bin/env bash
# Evaluate a checkpoint (COCO bbox + segm) on the CPU, one GPU, several GPUs (torchrun) or several nodes.
#
#   detection/test.sh CONFIG CHECKPOINT [GPUS] [tools/test.py options: --data-root, --format-only, --test-dev,
#                                              --out-prefix, --out, --show-dir, --cfg-options ...]
#
# GPUS and the multi-node variables (NNODES, NODE_RANK, MASTER_ADDR, PORT) work as in detection/train.sh.
# Test-dev: detection/test.sh CONFIG CHECKPOINT 8 --test-dev --out-prefix work_dirs/test-dev/results
# writes results.bbox.json (and results.segm.json) to submit to the COCO evaluation server.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/_launch.sh"
[[ $# -ge 2 ]] || { echo "usage: $0 CONFIG CHECKPOINT [GPUS] [test.py options]" >&2; exit 2; }
CONFIG=$1; CHECKPOINT=$2; shift 2
parse_gpus "$@"; shift "$SHIFT"
launch "$HERE/tools/test.py" "$CONFIG" "$CHECKPOINT" "$@"
