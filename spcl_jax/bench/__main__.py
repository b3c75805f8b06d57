"""python -m spcl_jax.bench WHAT [flags]

  train    the train step's memory for k = 1, 2, 4 micro-batches, the largest batch that fits
           --memory_gb, then jitted steps on synthetic uint8 images: images/s, TFLOP/s, MFU;
           --reference torch also times the PyTorch (timm) step, eager and torch.compile
  scaling  a model of the step on 8 .. 1024 accelerators: compute vs communication, efficiency
           (--check: its bytes against the compiled step's collectives on 8 CPU devices)
  finetune jitted fine-tuning steps (classifier, BCE, LLRD AdamW) on synthetic images: images/s
  transfer S-PCL vs random init on a synthetic labelled CXR-like set, pool cls/avg, full vs
           linear, 1/10/100% labels, 3 seeds: a Table-1-shaped grid (minutes on 2 CPU cores)
  input    the input pipeline alone on prepared data: decoded images/s
  matmul   a square bf16 matmul: the FLOP/s this device reaches, and the images/s limit it sets
  profile  where a step's time went, from the trace `train --profile_dir` wrote
  summary  a table (markdown) of the JSON lines the benchmarks printed, e.g. launch/device_check.sh's
"""

import importlib
import sys

BENCHMARKS = {"train": "spcl_jax.bench.train", "input": "spcl_jax.bench.input",
              "scaling": "spcl_jax.bench.scaling", "finetune": "spcl_jax.bench.finetune",
              "transfer": "spcl_jax.bench.transfer",
              "matmul": "spcl_jax.bench.matmul", "summary": "spcl_jax.bench.summary",
              "profile": "spcl_jax.bench.profile"}


def main() -> int:
  if len(sys.argv) < 2 or sys.argv[1] not in BENCHMARKS:
    print(__doc__.strip(), file=sys.stderr)
    return 2
  module = importlib.import_module(BENCHMARKS[sys.argv[1]])
  return module.main(sys.argv[2:])  # each benchmark's main takes its arguments alone


if __name__ == "__main__":
  sys.exit(main())
