#!/usr/bin/env bash
# Fig. 5 in miniature: UniGRPO's image policy on a reward it can game (ShapeWorld + JPEG
# compressibility, configs/ablations/hackable.py) under each regulariser, several seeds; then
# the table and the picture (launch/summarize_hacking.py).
#
#   bash launch/hacking.sh runs/hacking [STEPS] [SEEDS...]
#   REGULARIZERS="none" bash launch/hacking.sh ...     # a subset of the regularisers
#   EXTRA="--config.objective.reg_weight=1.5e-3" bash launch/hacking.sh ...   # more overrides
set -euo pipefail
OUT="${1:-runs/hacking}"; STEPS="${2:-30}"; shift 2 || true
SEEDS=("${@:-0 1 2 3 4}"); [ "$#" -gt 0 ] || SEEDS=(0 1 2 3 4)
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
for seed in "${SEEDS[@]}"; do
  for reg in ${REGULARIZERS:-velocity_mse latent_kl none}; do
    python -m unigrpo_jax.main --config="configs/ablations/hackable.py:$reg" \
      --workdir="$OUT/$reg/seed$seed" --config.seed="$seed" --config.total_steps="$STEPS" \
      --config.eval_every="${EVAL_EVERY:-$STEPS}" --config.checkpoint_every="$STEPS" \
      --config.data.eval_tasks="${EVAL_TASKS:-256}" --config.tensorboard=False ${EXTRA:-} 2>&1 \
      | grep -v "^[IW][0-9]"
  done
done
python launch/summarize_hacking.py "$OUT"
