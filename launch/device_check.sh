#!/usr/bin/env bash
# Every performance figure docs/benchmarks.md's table reports, from one run on one NVIDIA H100/H200:
#   bash launch/device_check.sh [OUT_DIR]        (from the repository root; default ./bench-results)
# The variants use explicit overrides (vitb512, global batch 256, k = 1, bf16), so the figures do
# not depend on what the config files say today:
#   1. bench matmul: a bf16 8192^3 matmul, the images/s limit it sets for vitb512
#   2. bench train, attention xla, remat none, with --reference torch: the timm PyTorch step,
#      eager and torch.compile, in the same process and on the same GPU
#   3. bench train with attention cudnn (padded to 8), cudnn padded to 64, remat save_dots and
#      remat full (each with cudnn)
#      The cuDNN variant also traces 3 steps (jax.profiler): OUT_DIR/profile_cudnn.json.gz (open
#      it in ui.perfetto.dev) and `bench profile`'s time per kind of work and top operations.
#   4. bench input --formats: JPEG/PNG decode images/s on one of this machine's cores and the
#      cores that feed the target rate; with INPUT_DATA=PREPARED_DIR also the training input
#      pipeline with INPUT_WORKERS (default 16) workers (needs grain and array_record)
#   5. bench summary: the table, in OUT_DIR/summary.md
# Everything goes to OUT_DIR/device_check.log (JSON lines included). A variant that fails or
# outlives VARIANT_TIMEOUT (s, default 240) is reported and the script goes on. STEPS (default
# 20) sets the timed steps; EXTRA adds overrides to every train variant (a dry run on a CPU:
# EXTRA="--config.model.variant=pico/16 --config.model.image_size=64 --config.batch_size_per_device=8
# --torch_compile_backend=aot_eager" MATMUL_SIZE=512 STEPS=1; the cudnn variants fail there).
# Needs jax, flax, optax, numpy, Pillow, absl-py and ml-collections (+ torch and timm for the
# reference). Where pip cannot reach the internet, run launch/device_wheels.sh on a machine that
# can: it fills .whl/, which this script installs into /tmp/site first.
set -uo pipefail
out=${1:-${OUT:-bench-results}}
mkdir -p "$out"
log=$out/device_check.log
: >"$log"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
steps=${STEPS:-20}

say() { echo "$*" | tee -a "$log"; }
bench() {
  say "### python -m spcl_jax.bench $*"
  timeout "${VARIANT_TIMEOUT:-240}" python3 -m spcl_jax.bench "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || say "### FAILED (exit $rc): python -m spcl_jax.bench $*"
}

say "### $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null || echo 'no git') on $(hostname)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 \
  | tee -a "$log"
python3 - <<'EOF' 2>&1 | tee -a "$log"
import importlib, platform
versions = {"python": platform.python_version()}
for name in ("jax", "jaxlib", "flax", "optax", "torch", "timm", "ml_collections"):
  try:
    versions[name] = importlib.import_module(name).__version__
  except Exception as e:  # report, do not stop: the bench says what it misses
    versions[name] = f"missing ({type(e).__name__})"
print("###", versions)
EOF

# batch_size_per_device, not batch_size: vitb512.py sets the former (1200), which would win
vitb="--config=configs/vitb512.py --config.batch_size_per_device=256 --config.grad_accum_steps=1"
vitb+=" --config.model.dtype=bfloat16 --memory_k= --memory_gb=0 --steps=$steps --warmup_steps=3"
vitb+=" ${EXTRA:-}"

bench matmul --config=configs/vitb512.py --size="${MATMUL_SIZE:-8192}"
# the torch reference rides on the XLA variant, which runs everywhere, so a cuDNN failure
# cannot take the reference figures with it
bench train $vitb --config.model.attention_impl=xla --config.model.remat=none --reference=torch
bench train $vitb --config.model.attention_impl=cudnn --config.model.remat=none \
  --profile_dir=/tmp/spcl-profile --profile_steps=3
trace=$(ls -t /tmp/spcl-profile/plugins/profile/*/perfetto_trace.json.gz 2>/dev/null | head -1)
if [ -n "$trace" ]; then
  cp "$trace" "$out/profile_cudnn.json.gz"
  bench profile "$out/profile_cudnn.json.gz" --steps 3 --top 25
fi
bench train $vitb --config.model.attention_impl=cudnn --config.model.attention_seq_multiple=64
bench train $vitb --config.model.attention_impl=cudnn --config.model.remat=save_dots
bench train $vitb --config.model.attention_impl=cudnn --config.model.remat=full
bench input --formats --image-size 512 --seconds 5
if [ -n "${INPUT_DATA:-}" ]; then
  bench input --data "$INPUT_DATA" --workers "${INPUT_WORKERS:-16}" --batch-size 256 --seconds 20
fi
python3 -m spcl_jax.bench summary "$log" | tee "$out/summary.md"
