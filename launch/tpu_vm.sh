#!/usr/bin/env bash
# Cloud TPU VM pod slice: install on every worker, then start one process per worker.
#   launch/tpu_vm.sh TPU_NAME ZONE configs/vitb512.py gs://bucket/runs/vitb512 \
#       --config.data.source=prepared:/mnt/disks/data/mimic
# The workdir is a gs:// URL (or a folder every worker mounts): checkpoints are written there by
# all processes together through orbax, metrics, history and config.json by process 0 (through
# gcsfs: the `gcs` extra installed below). No TensorBoard events for a gs:// workdir:
# metrics.jsonl has every value. The prepared data must be on each worker's local disk (a
# gs:// data folder is refused at start); copy it there first, on every worker, e.g.
#   gcloud compute tpus tpu-vm ssh TPU_NAME --zone=ZONE --worker=all --command="mkdir -p \
#       /mnt/disks/data && gcloud storage cp -r gs://bucket/mimic /mnt/disks/data/"
# jax.distributed.initialize() finds the pod's coordinator by itself on TPU VMs.
set -euo pipefail
name=${1:?usage: $0 TPU_NAME ZONE CONFIG WORKDIR [--config.x=y ...]}
zone=${2:?zone}; config=${3:?config}; workdir=${4:?workdir}; shift 4
repo=${REPO_URL:-$(git config --get remote.origin.url)}
extra=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="
  set -e
  [ -d spcl-jax ] || git clone $repo spcl-jax
  cd spcl-jax && git pull --ff-only
  python3 -m pip install -q -e '.[gcs]' 'jax[tpu]'
  python3 -m spcl_jax.main --distributed --config=$config --workdir=$workdir$extra
"
