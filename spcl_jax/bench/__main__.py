"""python -m spcl_jax.bench WHAT [flags]

  train   jitted S-PCL train steps on synthetic uint8 images: images/s, TFLOP/s, MFU
  finetune  jitted fine-tuning steps (classifier, BCE, LLRD AdamW) on synthetic images: images/s
  input   the input pipeline alone on prepared data: decoded images/s (datasets wing)
"""

import importlib
import sys

BENCHMARKS = {"train": "spcl_jax.bench.train", "input": "spcl_jax.bench.input",
              "finetune": "spcl_jax.bench.finetune"}


def main() -> int:
  if len(sys.argv) < 2 or sys.argv[1] not in BENCHMARKS:
    print(__doc__.strip(), file=sys.stderr)
    return 2
  module = importlib.import_module(BENCHMARKS[sys.argv[1]])
  return module.main(sys.argv[2:])  # each benchmark's main takes its arguments alone


if __name__ == "__main__":
  sys.exit(main())
