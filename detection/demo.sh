#!/usr/bin/env bash
# The main job on the embedded default data, on a CPU (docs/development.md names a measured run):
#   1. generate a synthetic COCO-format dataset (shapes with polygon masks) into WORK_DIR/data,
#   2. train a small-input Mask R-CNN LIT-Ti from scratch (configs/demo/), logging losses and the ETA,
#   3. evaluate it on the validation images (COCO bbox + segm tables) and
#   4. draw its predictions next to the ground truth into WORK_DIR/predictions.png, and print the AP table.
#
#   detection/demo.sh [WORK_DIR]        (default: work_dirs/demo)
#
# Every step is one of the documented commands (printed before it runs). WORK_DIR must be new, empty or a
# previous demo's folder: anything else is left untouched and the demo stops.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/_launch.sh"
WORK_DIR="${1:-work_dirs/demo}"
CONFIG="$HERE/configs/demo/mask-rcnn_lit-ti_fpn_128-demo_synthetic-coco.py"
MARKER="$WORK_DIR/.lesa_lit_demo"

if [[ -d "$WORK_DIR" && -n "$(ls -A "$WORK_DIR")" && ! -f "$MARKER" ]]; then
  echo "error: $WORK_DIR exists and was not made by this demo; refusing to write into it." >&2
  echo "       Pass another folder: detection/demo.sh WORK_DIR" >&2
  exit 1
fi
mkdir -p "$WORK_DIR" && touch "$MARKER"
START=$SECONDS
echo "The training step logs how long training takes on this machine after its first 10 iterations."
run() { printf '\n$ %s\n' "$*"; "$@"; }

# up to six shapes an image (the generator's default: four); --overwrite replaces a previous demo's dataset of other
# settings (never a foreign folder)
run "$PYTHON" "$HERE/tools/make_synthetic_coco.py" "$WORK_DIR/data" --num-train 900 --num-val 48 --num-test 0 \
  --max-objects 6 --no-stuff-maps --overwrite
run "$HERE/train.sh" "$CONFIG" 0 --data-root "$WORK_DIR/data" --work-dir "$WORK_DIR/train"
CHECKPOINT="$(cat "$WORK_DIR/train/last_checkpoint")"
run "$HERE/test.sh" "$CONFIG" "$CHECKPOINT" 0 --data-root "$WORK_DIR/data" --work-dir "$WORK_DIR/test" \
  --out-prefix "$WORK_DIR/test/results"
run "$PYTHON" "$HERE/tools/draw_predictions.py" "$WORK_DIR/data/annotations/instances_val2017.json" \
  "$WORK_DIR/data/val2017" "$WORK_DIR/test/results" "$WORK_DIR/predictions.png" --metrics "$WORK_DIR/test/metrics.json"

printf '\nDemo finished in %d s.\n  predictions: %s\n  metrics:     %s\n  checkpoint:  %s\n  logs:        %s\n' \
  $(( SECONDS - START )) "$WORK_DIR/predictions.png" "$WORK_DIR/test/metrics.json" "$CHECKPOINT" \
  "$WORK_DIR/train/ (training), $WORK_DIR/test/ (evaluation)"
