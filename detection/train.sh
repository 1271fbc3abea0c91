#!/usr/bin/env bash
# Train a detector on the CPU, one GPU, several GPUs of this node (torchrun) or several nodes.
#
#   detection/train.sh CONFIG [GPUS] [tools/train.py options: --work-dir, --data-root, --resume, --cfg-options ...]
#
# GPUS omitted: one process, on the GPU if there is one, else on the CPU. 0: the CPU. 1: one GPU.
# N > 1: torchrun with N processes (without GPUs they run on the CPU with the gloo backend).
# Several nodes: run the same command on every node with NNODES, NODE_RANK and MASTER_ADDR (and PORT) set:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.1.1.1 detection/train.sh CONFIG 8     # on the first node
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.1.1.1 detection/train.sh CONFIG 8     # on the second node
# With Slurm use detection/slurm_train.sh. PYTHON selects the interpreter (default: the active virtual
# environment, else the repository's .venv, else python3).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/_launch.sh"
[[ $# -ge 1 ]] || { echo "usage: $0 CONFIG [GPUS] [train.py options]" >&2; exit 2; }
CONFIG=$1; shift
parse_gpus "$@"; shift "$SHIFT"
launch "$HERE/tools/train.py" "$CONFIG" "$@"
