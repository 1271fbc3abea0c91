#!/usr/bin/env bash
# One-command, idempotent set-up of the project environment.
#
#   bash scripts/setup_env.sh            # creates .venv and installs everything
#   CUDA=1 bash scripts/setup_env.sh     # the same with mmcv's CUDA ops, checked on the GPU when there is one
#
# Steps: (1) virtual environment, (2) torch + torchvision (pinned below), (3) mmcv 2.1.0 with compiled ops,
# built once into a wheel cache outside the repo, (4) this package, editable, with its `detection` and `dev`
# extras, (5) a check of mmcv's ops (on the GPU too when built with CUDA ops and a GPU is visible).
# Environment knobs: VENV (default .venv), LESA_LIT_CACHE (default ~/.cache/lesa-lit-models),
# PYTHON (default python3.11 or python3), MAX_JOBS (parallel compile jobs, default: every core),
# CUDA: 1 builds mmcv's CUDA ops as well as its CPU ops, 0 the CPU ops only; default: 1 when `nvidia-smi -L` lists a
# GPU. The CUDA compiler must be of torch's CUDA version (torch 2.14.1's PyPI wheel: 13.0): a system nvcc (on PATH or
# in CUDA_HOME/bin) of that version is used, otherwise that version's compiler is installed from the package index
# into the virtual environment (scripts/cuda_toolkit.sh), so a GPU machine needs only the NVIDIA driver.
# TORCH_CUDA_ARCH_LIST: the GPU architectures to compile for (e.g. "8.0;9.0"); default: those of the GPUs
# visible now (without a visible GPU it must be set).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/cuda_toolkit.sh"
VENV="$(realpath -m "${VENV:-$ROOT/.venv}")"  # absolute: the mmcv build runs in another directory
CACHE="${LESA_LIT_CACHE:-$HOME/.cache/lesa-lit-models}"
WHEELS="$CACHE/wheels"
LOGS="$CACHE/logs"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3 || echo python3)}"
NVCC="$(command -v nvcc || true)"
[ -n "$NVCC" ] || { [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ] && NVCC="$CUDA_HOME/bin/nvcc"; } || true
gpu_visible() { command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; }
export CUDA="${CUDA:-$(gpu_visible && echo 1 || echo 0)}"
if [ "$CUDA" = 1 ]; then echo "mmcv ops: CPU and CUDA (CUDA=1)"
else echo "mmcv ops: CPU only (CUDA=0; CUDA=1 builds the CUDA ops too)"; fi
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)
MMCV_VERSION=2.1.0
mkdir -p "$WHEELS" "$LOGS"

step() { STEP="$1"; LOG="$LOGS/$2.log"; printf '\n==> %s (log: %s)\n' "$STEP" "$LOG"; }
fail() {
  printf '\nERROR: step "%s" failed. Last lines of %s:\n' "$STEP" "$LOG" >&2
  tail -n 25 "$LOG" >&2
  exit 1
}
run() {  # run a command with its output in the step's log; on failure name the step and the log
  "$@" >"$LOG" 2>&1 || fail
}
run_counting_units() {  # like run, for a ninja build: every 30 s, the compile units done and an estimate of the rest
  "$@" >"$LOG" 2>&1 &
  local pid=$! start=$SECONDS next_report=$((SECONDS + 30)) last=""
  while kill -0 "$pid" 2>/dev/null; do
    sleep 2
    [ "$SECONDS" -ge "$next_report" ] || continue
    next_report=$((SECONDS + 30))
    local count; count="$(grep -oE '^\s*\[[0-9]+/[0-9]+\]' "$LOG" | tail -n 1 | tr -d '[] ' || true)"
    [ -n "$count" ] && [ "$count" != "$last" ] || continue
    last="$count"
    local finished="${count%/*}" total="${count#*/}" elapsed=$((SECONDS - start))
    printf '    %3d/%d compile units done, %d min %02d s elapsed, about %d min left\n' "$finished" "$total" \
      $((elapsed / 60)) $((elapsed % 60)) $(( (elapsed * (total - finished) / finished + 59) / 60 ))
  done
  wait "$pid" || fail
}

step "virtual environment at $VENV" venv
[ -x "$VENV/bin/python" ] || run "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check)

step "torch + torchvision (${TORCH_PINS[*]}; ~1 min the first time)" torch
if ! "$PY" -c "import torch, torchvision; assert torch.__version__.startswith('2.14.1') and torchvision.__version__.startswith('0.29.1')" 2>/dev/null; then
  run "${PIP[@]}" "${TORCH_PINS[@]}"
fi

step "mmcv build tools (setuptools<81: mmcv and mmengine need pkg_resources; torch needs >=77)" buildtools
run "${PIP[@]}" "setuptools>=77.0.3,<81" wheel ninja "mmengine>=0.10,<1.0" "${TORCH_PINS[@]}"

MMCV_WHEELS="$WHEELS"  # CPU ops only
if [ "$CUDA" = 1 ]; then
  step "CUDA compiler of torch's CUDA version" cuda
  TORCH_CUDA="$("$PY" -c "import torch; print(torch.version.cuda or '')")"
  [ -n "$TORCH_CUDA" ] || { echo "    this torch has no CUDA support: install a CUDA build of ${TORCH_PINS[0]}" >"$LOG"; fail; }
  read -r SOURCE TOOLKIT <<<"$(cuda_toolkit_plan "$TORCH_CUDA" "$NVCC")"
  case "$SOURCE" in
    system) NVCC="$TOOLKIT"; echo "    $NVCC (CUDA $TORCH_CUDA, as torch)";;
    index)
      echo "    ${NVCC:-no nvcc found}${NVCC:+ is CUDA $(cuda_version_of "$NVCC")}: installing CUDA $TOOLKIT's" \
        "compiler from the package index into $VENV (~100 MB)"
      # shellcheck disable=SC2046  # the list of package requirements
      run "${PIP[@]}" $(cuda_toolkit_packages "$TOOLKIT") "${TORCH_PINS[@]}"
      NVCC="$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/nvidia/cu${TOOLKIT%%.*}/bin/nvcc"
      [ -x "$NVCC" ] || { echo "    the compiler packages installed no $NVCC" >"$LOG"; fail; }
      LINK_DIR="$(cuda_link_dir "$VENV" "$(dirname "$(dirname "$NVCC")")/lib" "${TOOLKIT%%.*}")"
      export LIBRARY_PATH="$LINK_DIR${LIBRARY_PATH:+:$LIBRARY_PATH}"
      unset CUDA_HOME;;
    *)
      echo "    torch is built with CUDA $TOOLKIT, whose compiler is not on the package index in a form this" \
        "script installs: put a CUDA $TOOLKIT nvcc on PATH (or in CUDA_HOME), or use a torch built with CUDA 13" \
        >"$LOG"; fail;;
  esac
  export CUDA_HOME="${CUDA_HOME:-$(dirname "$(dirname "$NVCC")")}"
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$("$PY" -c "
import torch
caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
print(';'.join(f'{major}.{minor}' for major, minor in sorted(caps)))
")}"
  [ -n "$TORCH_CUDA_ARCH_LIST" ] || { echo "    no GPU visible: set TORCH_CUDA_ARCH_LIST to the GPUs' compute" \
    "capabilities, e.g. TORCH_CUDA_ARCH_LIST=\"8.0;9.0\" for A100 and H100" >"$LOG"; fail; }
  echo "    nvcc $(cuda_version_of "$NVCC") ($NVCC), TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
  MMCV_WHEELS="$WHEELS/cuda$TORCH_CUDA-sm${TORCH_CUDA_ARCH_LIST//[;. ]/_}"
  export FORCE_CUDA=1
fi

step "mmcv $MMCV_VERSION with compiled ops$([ "$CUDA" = 1 ] && echo ' (CPU and CUDA)')" mmcv
mkdir -p "$MMCV_WHEELS"
MMCV_WHEEL="$(ls "$MMCV_WHEELS"/mmcv-$MMCV_VERSION-*.whl 2>/dev/null | head -n 1 || true)"
if [ -z "$MMCV_WHEEL" ]; then
  echo "    no cached wheel in $MMCV_WHEELS: compiling mmcv ops from source."
  if [ "$CUDA" = 1 ]; then
    echo "    With CUDA ops this compiles the CUDA kernels too, for each architecture listed: far longer than the"
    echo "    CPU-only build; MAX_JOBS (default: every core) sets the parallel jobs. Later set-ups reuse the wheel."
  else
    echo "    This takes tens of minutes on 2 cores (77 compile units; the progress follows every 30 s);"
    echo "    later set-ups reuse the wheel."
  fi
  SRC="$(mktemp -d)"
  run "$PY" -m pip download --disable-pip-version-check --no-deps --no-binary :all: -d "$SRC" "mmcv==$MMCV_VERSION"
  tar -xzf "$SRC"/mmcv-$MMCV_VERSION.tar.gz -C "$SRC"
  # torch >= 2.13 headers need C++20; mmcv 2.1.0 hard-codes c++14/c++17.
  sed -i -e 's/-std=c++14/-std=c++20/g' -e 's/-std=c++17/-std=c++20/g' "$SRC/mmcv-$MMCV_VERSION/setup.py"
  # --no-build-isolation: otherwise torch is invisible to setup.py and the ops are silently skipped.
  # -v: pip passes on ninja's "[done/total]" lines, which run_counting_units reads from the log.
  MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" run_counting_units "$PY" -m pip wheel -v \
    --disable-pip-version-check --no-build-isolation --no-deps -w "$MMCV_WHEELS" "$SRC/mmcv-$MMCV_VERSION"
  rm -rf "$SRC"
  MMCV_WHEEL="$(ls "$MMCV_WHEELS"/mmcv-$MMCV_VERSION-*.whl | head -n 1)"
else
  echo "    reusing cached wheel $MMCV_WHEEL"
fi
if ! "$PY" -c "
import mmcv, mmcv.ops
assert mmcv.__version__ == '$MMCV_VERSION'
assert (mmcv.ops.get_compiling_cuda_version() != 'not available') == ($CUDA == 1)" 2>/dev/null; then
  "$PY" -m pip uninstall --disable-pip-version-check -y mmcv >/dev/null 2>&1 || true  # a build of the other kind
  run "${PIP[@]}" "$MMCV_WHEEL" "${TORCH_PINS[@]}"
fi

step "lesa-lit-models (editable) with extras [detection,dev]" package
run "${PIP[@]}" -e "$ROOT[detection,dev]" "$MMCV_WHEEL" "${TORCH_PINS[@]}"

step "check: mmcv compiled ops (RoIAlign, nms, DeformConv2dPack) on the CPU, and on the GPU when built for it" check
run "$PY" - <<'PY'
import os
import torch
from mmcv.ops import RoIAlign, nms, DeformConv2dPack, get_compiling_cuda_version
torch.manual_seed(0)
x = torch.randn(1, 4, 16, 16)
rois = torch.tensor([[0., 1., 1., 8., 8.]])
boxes, scores = torch.tensor([[0., 0., 4., 4.], [0., 0., 4., 5.]]), torch.tensor([0.9, 0.8])
dcn = DeformConv2dPack(4, 4, 3, padding=1)
with torch.no_grad():
    dcn.conv_offset.weight.normal_(std=0.1)  # non-zero offsets: bilinear sampling between pixels
    outputs = RoIAlign((2, 2), 1.0, 0)(x, rois), nms(boxes, scores, 0.5)[1], dcn(x)
print('CPU ops OK; mmcv compiled with CUDA:', get_compiling_cuda_version())
if os.environ['CUDA'] == '1':
    if torch.cuda.is_available():
        with torch.no_grad():
            on_gpu = (RoIAlign((2, 2), 1.0, 0)(x.cuda(), rois.cuda()), nms(boxes.cuda(), scores.cuda(), 0.5)[1],
                      dcn.cuda()(x.cuda()))
        for name, cpu, gpu in zip(('RoIAlign', 'nms', 'DeformConv2dPack'), outputs, on_gpu):
            torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4, msg=f'{name}: GPU differs from CPU')
        print('CUDA ops OK on', torch.cuda.get_device_name())
    else:
        print('no GPU visible: the CUDA ops were built and not run')
import mmdet, lesa_lit_models  # noqa: F401
PY
tail -n 3 "$LOG" | sed 's/^/    /'
printf '\nEnvironment ready: %s (set-up took %d min %02d s)\n' "$VENV" $((SECONDS / 60)) $((SECONDS % 60))
