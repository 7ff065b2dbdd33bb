#!/usr/bin/env bash
# Create a Cloud TPU VM slice, install unigrpo_jax on every worker, and start a run.
#
#   ZONE=us-east5-a TPU_NAME=unigrpo-v5 ACCELERATOR=v5litepod-16 \
#   WORKDIR=gs://my-bucket/runs/v5 bash launch/tpu_vm.sh [--config.key=value ...]
#
# Every worker runs the same command (JAX multi-host SPMD); only process 0 writes metrics.
set -euo pipefail
: "${ZONE:?set ZONE}" "${TPU_NAME:?set TPU_NAME}" "${WORKDIR:?set WORKDIR (a gs:// path)}"
ACCELERATOR="${ACCELERATOR:-v5litepod-16}"
VERSION="${VERSION:-v2-alpha-tpuv5-lite}"
CONFIG="${CONFIG:-configs/tpu_v5.py}"
REPO_URL="${REPO_URL:?set REPO_URL (where workers clone unigrpo_jax from)}"

if ! gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone "$ZONE" >/dev/null 2>&1; then
  gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" \
    --accelerator-type "$ACCELERATOR" --version "$VERSION"
fi

ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$1"
}

ssh_all "set -e; [ -d unigrpo_jax ] || git clone $REPO_URL unigrpo_jax; cd unigrpo_jax && git pull --ff-only; \
  pip install -q -e . && pip install -q 'jax[tpu]==0.10.2'"
# The same command on every host; a re-run resumes from the last checkpoint in WORKDIR.
ssh_all "cd unigrpo_jax && nohup python -m unigrpo_jax.main --config=$CONFIG --workdir=$WORKDIR $* \
  > run.log 2>&1 &"
echo "started; follow with: gcloud compute tpus tpu-vm ssh $TPU_NAME --zone $ZONE --worker=0 --command 'tail -f unigrpo_jax/run.log'"
