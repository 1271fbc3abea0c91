#!/usr/bin/env bash
# One-command, idempotent set-up of the project environment.
#
#   bash scripts/setup_env.sh            # creates .venv and installs everything
#
# Steps: (1) virtual environment, (2) torch + torchvision from this machine's local wheels,
# (3) mmcv 2.1.0 with compiled ops, built once into a wheel cache outside the repo,
# (4) this package, editable, with its `detection` and `dev` extras.
# Environment knobs: VENV (default .venv), LESA_LIT_CACHE (default ~/.cache/lesa-lit-models),
# PYTHON (default python3.11 or python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
CACHE="${LESA_LIT_CACHE:-$HOME/.cache/lesa-lit-models}"
WHEELS="$CACHE/wheels"
LOGS="$CACHE/logs"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
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

step "torch + torchvision (${TORCH_PINS[*]}, from local wheels; ~1 min the first time)" torch
if ! "$PY" -c "import torch, torchvision; assert torch.__version__.startswith('2.14.1') and torchvision.__version__.startswith('0.29.1')" 2>/dev/null; then
  run "${PIP[@]}" "${TORCH_PINS[@]}"
fi

step "mmcv build tools (setuptools<81: mmcv and mmengine need pkg_resources; torch needs >=77)" buildtools
run "${PIP[@]}" "setuptools>=77.0.3,<81" wheel ninja "mmengine>=0.10,<1.0" "${TORCH_PINS[@]}"

step "mmcv $MMCV_VERSION with compiled ops" mmcv
MMCV_WHEEL="$(ls "$WHEELS"/mmcv-$MMCV_VERSION-*.whl 2>/dev/null | head -n 1 || true)"
if [ -z "$MMCV_WHEEL" ]; then
  echo "    no cached wheel in $WHEELS: compiling mmcv ops from source."
  echo "    This takes 13 (AVX-512) to 35 (AVX2 only) minutes on 2 cores (77 compile units);"
  echo "    later set-ups reuse the wheel."
  SRC="$(mktemp -d)"
  run "$PY" -m pip download --disable-pip-version-check --no-deps --no-binary :all: -d "$SRC" "mmcv==$MMCV_VERSION"
  tar -xzf "$SRC"/mmcv-$MMCV_VERSION.tar.gz -C "$SRC"
  # torch >= 2.13 headers need C++20; mmcv 2.1.0 hard-codes c++14/c++17.
  sed -i -e 's/-std=c++14/-std=c++20/g' -e 's/-std=c++17/-std=c++20/g' "$SRC/mmcv-$MMCV_VERSION/setup.py"
  # --no-build-isolation: otherwise torch is invisible to setup.py and the ops are silently skipped.
  # -v: pip passes on ninja's "[done/total]" lines, which run_counting_units reads from the log.
  MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" run_counting_units "$PY" -m pip wheel -v \
    --disable-pip-version-check --no-build-isolation --no-deps -w "$WHEELS" "$SRC/mmcv-$MMCV_VERSION"
  rm -rf "$SRC"
  MMCV_WHEEL="$(ls "$WHEELS"/mmcv-$MMCV_VERSION-*.whl | head -n 1)"
else
  echo "    reusing cached wheel $MMCV_WHEEL"
fi
if ! "$PY" -c "import mmcv, mmcv.ops; assert mmcv.__version__ == '$MMCV_VERSION'" 2>/dev/null; then
  run "${PIP[@]}" "$MMCV_WHEEL" "${TORCH_PINS[@]}"
fi

step "lesa-lit-models (editable) with extras [detection,dev]" package
run "${PIP[@]}" -e "$ROOT[detection,dev]" "$MMCV_WHEEL" "${TORCH_PINS[@]}"

step "check: mmcv compiled ops (RoIAlign, nms, DeformConv2dPack) on CPU" check
run "$PY" - <<'PY'
import torch
from mmcv.ops import RoIAlign, nms, DeformConv2dPack
x = torch.randn(1, 4, 16, 16)
RoIAlign((2, 2), 1.0, 0)(x, torch.tensor([[0., 1., 1., 8., 8.]]))
nms(torch.tensor([[0., 0., 4., 4.], [0., 0., 4., 5.]]), torch.tensor([0.9, 0.8]), 0.5)
DeformConv2dPack(4, 4, 3, padding=1)(x)
import mmdet, lesa_lit_models  # noqa: F401
print('mmcv ops OK')
PY
printf '\nEnvironment ready: %s (set-up took %d min %02d s)\n' "$VENV" $((SECONDS / 60)) $((SECONDS % 60))
