#!/usr/bin/env bash
# The README's results table: SFT (the warm start, evaluated), TextGRPO only, Flow-GRPO only and
# joint UniGRPO, same budget, several seeds; then the table and the reward curve.
#
#   bash launch/ablations.sh runs/ablations [STEPS] [SEEDS...]
#   VARIANTS="text_only image_only" bash launch/ablations.sh ...   # a subset of the variants
#   EVAL_EVERY=25 bash launch/ablations.sh ...   # held-out evaluations along the way (a curve)
set -euo pipefail
OUT="${1:-runs/ablations}"; STEPS="${2:-30}"; shift 2 || true
SEEDS=("${@:-0 1 2}"); [ "$#" -gt 0 ] || SEEDS=(0 1 2)
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
for seed in "${SEEDS[@]}"; do
  for variant in ${VARIANTS:-joint text_only image_only}; do
    case "$variant" in
      joint) config=configs/shapes_cpu.py ;;
      *) config=configs/ablations/$variant.py ;;
    esac
    python -m unigrpo_jax.main --config="$config" --workdir="$OUT/$variant/seed$seed" \
      --config.seed="$seed" --config.total_steps="$STEPS" --config.eval_every="${EVAL_EVERY:-$STEPS}" \
      --config.checkpoint_every="$STEPS" --config.tensorboard=False 2>&1 | grep -v "^[IW][0-9]"
  done
done
python launch/summarize.py "$OUT"
