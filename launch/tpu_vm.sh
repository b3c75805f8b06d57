#!/usr/bin/env bash
# Cloud TPU VM pod slice: install on every worker, then start one process per worker.
#   launch/tpu_vm.sh TPU_NAME ZONE configs/vitb512.py gs://bucket/runs/vitb512 \
#       --config.data.source=prepared:/mnt/disks/data/mimic
# The workdir must be a directory every worker sees (e.g. a Filestore or GCS-FUSE mount):
# checkpoints are written by all processes together, metrics and config.json by process 0.
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
  python3 -m pip install -q -e . 'jax[tpu]'
  python3 -m spcl_jax.main --distributed --config=$config --workdir=$workdir$extra
"
