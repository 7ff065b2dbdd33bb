#!/usr/bin/env bash
# Cloud TPU VM slices for unigrpo_jax (multi-host SPMD: the same command on every worker).
#
#   export ZONE=us-east5-a TPU_NAME=unigrpo-v5 ACCELERATOR=v5litepod-16 \
#          REPO_URL=https://github.com/you/unigrpo_jax WORKDIR=gs://my-bucket/runs/v5
#   bash launch/tpu_vm.sh create          # on-demand; MODE=spot or MODE=queued for the others
#   bash launch/tpu_vm.sh install         # pinned jax[tpu] + the project on every worker
#   bash launch/tpu_vm.sh run [--config.key=value ...]   # starts on --worker=all, streams worker 0
#   bash launch/tpu_vm.sh logs            # follow worker 0's log again
#   bash launch/tpu_vm.sh stop            # kill the run on every worker (SIGTERM: saves first)
#   bash launch/tpu_vm.sh delete          # delete the slice (and the queued resource)
#
# A re-run of `run` with the same WORKDIR resumes from its last checkpoint (also after a spot
# preemption: `create` again, `install`, `run`). WORKDIR must be a gs:// bucket every worker
# can write: orbax writes each host's shards there; only process 0 writes metrics and samples.
set -euo pipefail
CMD="${1:-}"; shift || true
: "${ZONE:?set ZONE}" "${TPU_NAME:?set TPU_NAME}"
ACCELERATOR="${ACCELERATOR:-v5litepod-16}"
VERSION="${VERSION:-v2-alpha-tpuv5-lite}"
MODE="${MODE:-ondemand}"          # ondemand | spot | queued
# Default: the ShapeWorld pod smoke test (no weights). BAGEL-7B-MoT: CONFIG=configs/tpu_v5.py
# ACCELERATOR=v5p-128 VERSION=v2-alpha-tpuv5, and `run --config.init_checkpoint=DIR` with the
# BAGEL directory present at DIR on every worker (see launch/README.md).
CONFIG="${CONFIG:-configs/tpu_v5_shapes.py}"
JAX_VERSION="${JAX_VERSION:-0.10.2}"  # the version the project is tested with

ssh_all() { gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$1"; }
ssh_0() { gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=0 --command "$1"; }

case "$CMD" in
  create)
    case "$MODE" in
      ondemand) gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" \
                  --accelerator-type "$ACCELERATOR" --version "$VERSION" ;;
      spot)     gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" \
                  --accelerator-type "$ACCELERATOR" --version "$VERSION" --spot ;;
      queued)   gcloud compute tpus queued-resources create "$TPU_NAME-qr" --zone "$ZONE" \
                  --node-id "$TPU_NAME" --accelerator-type "$ACCELERATOR" \
                  --runtime-version "$VERSION" ${SPOT:+--spot}
                echo "queued; wait until ACTIVE: gcloud compute tpus queued-resources describe $TPU_NAME-qr --zone $ZONE" ;;
      *) echo "MODE must be ondemand, spot or queued" >&2; exit 2 ;;
    esac ;;
  install)
    : "${REPO_URL:?set REPO_URL (where workers clone unigrpo_jax from)}"
    ssh_all "set -e; [ -d unigrpo_jax ] || git clone $REPO_URL unigrpo_jax; cd unigrpo_jax; \
      git pull --ff-only; pip install -q 'jax[tpu]==$JAX_VERSION' && pip install -q -e . && \
      python -c 'import jax; print(jax.process_index(), jax.local_device_count())'" ;;
  run)
    : "${WORKDIR:?set WORKDIR (a gs:// path every worker can write)}"
    # distributed.coordinator_address=auto: JAX finds the slice's hosts on Cloud TPU.
    ssh_all "cd unigrpo_jax && nohup python -m unigrpo_jax.main --config=$CONFIG \
      --workdir=$WORKDIR --config.distributed.coordinator_address=auto $* > run.log 2>&1 &"
    ssh_0 "tail -F unigrpo_jax/run.log" ;;
  logs) ssh_0 "tail -F unigrpo_jax/run.log" ;;
  stop) ssh_all "pkill -TERM -f 'unigrpo_jax.main' || true" ;;
  delete)
    if [ "$MODE" = queued ]; then
      gcloud compute tpus queued-resources delete "$TPU_NAME-qr" --zone "$ZONE" --force --quiet
    else
      gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone "$ZONE" --quiet
    fi ;;
  *) echo "usage: $0 create|install|run|logs|stop|delete [--config.key=value ...]" >&2; exit 2 ;;
esac
