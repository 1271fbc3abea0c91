# Shared by train.sh, test.sh, slurm_train.sh, slurm_test.sh and demo.sh (sourced): pick the interpreter, start
# one process or torchrun, or srun one task per GPU.

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -n "${VIRTUAL_ENV:-}" ]]; then PYTHON="$VIRTUAL_ENV/bin/python"
  elif [[ -x "$HERE/../.venv/bin/python" ]]; then PYTHON="$HERE/../.venv/bin/python"
  else PYTHON=python3
  fi
fi
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
PORT="${PORT:-29500}"

# parse_gpus ARGS...: GPUS from the first argument when it is a number; SHIFT = arguments consumed
parse_gpus() {
  GPUS=""; SHIFT=0
  if [[ $# -ge 1 && "$1" =~ ^[0-9]+$ ]]; then GPUS=$1; SHIFT=1; fi
}

# launch SCRIPT ARGS...: one process, or torchrun for several GPUs or nodes (adds --launcher pytorch)
launch() {
  local script=$1; shift
  if [[ "$GPUS" == 0 ]]; then
    export CUDA_VISIBLE_DEVICES=-1
  fi
  if [[ "$NNODES" -eq 1 && ( -z "$GPUS" || "$GPUS" -le 1 ) ]]; then
    exec "$PYTHON" "$script" "$@"
  fi
  exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --node_rank="$NODE_RANK" \
    --master_addr="$MASTER_ADDR" --master_port="$PORT" --nproc_per_node="${GPUS:-1}" \
    "$script" "$@" --launcher pytorch
}

# slurm_launch PARTITION JOB_NAME SCRIPT ARGS...: srun one task per GPU running SCRIPT ARGS (mmengine's slurm
# launcher: ARGS include --launcher=slurm). GPUS (default 8) tasks, GPUS_PER_NODE (default min(GPUS, 8)) per node,
# CPUS_PER_TASK (default 5) cores each; SRUN_ARGS: further srun options.
slurm_launch() {
  local partition=$1 job_name=$2 script=$3; shift 3
  GPUS="${GPUS:-8}"
  GPUS_PER_NODE="${GPUS_PER_NODE:-$(( GPUS < 8 ? GPUS : 8 ))}"
  CPUS_PER_TASK="${CPUS_PER_TASK:-5}"
  # shellcheck disable=SC2086  # SRUN_ARGS is a list of options
  srun -p "$partition" --job-name="$job_name" --gres=gpu:"$GPUS_PER_NODE" --ntasks="$GPUS" \
    --ntasks-per-node="$GPUS_PER_NODE" --cpus-per-task="$CPUS_PER_TASK" --kill-on-bad-exit=1 ${SRUN_ARGS:-} \
    "$PYTHON" -u "$script" "$@"
}
