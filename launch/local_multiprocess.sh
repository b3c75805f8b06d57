#!/usr/bin/env bash
# Runs N cooperating processes on this machine (one jax.distributed job), e.g. to try the
# multi-host code path on a CPU box or on one multi-GPU node without SLURM:
#   launch/local_multiprocess.sh 2 --config=configs/demo.py --workdir=/tmp/spcl-mp
#   MODULE=spcl_jax.finetune launch/local_multiprocess.sh 2 --config=configs/finetune/nih14.py \
#     --workdir=/tmp/spcl-ft-mp --config.data.prepared=/data/nih
# MODULE is the command each process runs (default spcl_jax.main, pre-training). On CPU each
# process gets DEVICES_PER_PROCESS virtual devices (default 4) and talks over gloo.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 NUM_PROCESSES --config=... --workdir=... [--config.x=y ...]" >&2
  exit 2
fi
num=$1; shift
port=${PORT:-$((20000 + RANDOM % 20000))}
devices=${DEVICES_PER_PROCESS:-4}
module=${MODULE:-spcl_jax.main}
if [ "${JAX_PLATFORMS:-}" = "cpu" ] || ! python -c "import jax; jax.devices('gpu')" >/dev/null 2>&1; then
  export JAX_PLATFORMS=cpu JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo
  export XLA_FLAGS="--xla_force_host_platform_device_count=$devices ${XLA_FLAGS:-}"
fi
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' INT TERM
for ((i = 0; i < num; i++)); do
  python -m "$module" --distributed --coordinator_address="localhost:$port" \
    --num_processes="$num" --process_id="$i" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
