"""python -m spcl_jax.export --workdir W [--step S] --format timm|medical_mae|npz --out PATH
[--in-chans 1|3]"""

from __future__ import annotations

import argparse
import sys

from spcl_jax import command_line
from spcl_jax.command_line import run_command
from spcl_jax.export import FORMATS, export_checkpoint
from spcl_jax.weights.layout import SUPPORTED_IN_CHANS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = command_line.ArgumentParser(
      prog="python -m spcl_jax.export",
      description="Export the encoder of an S-PCL pre-training checkpoint to PyTorch.")
  parser.add_argument("--workdir", required=True, help="the pre-training workdir")
  parser.add_argument("--step", type=int, default=None,
                      help="checkpoint step (default: the latest)")
  parser.add_argument("--format", required=True, choices=FORMATS, dest="export_format",
                      help="timm: .safetensors + .json; medical_mae: .pth {'model': ...}; "
                           "npz: big_vision names, for timm's npz loader")
  parser.add_argument("--out", required=True, help="the file to write")
  parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
  parser.add_argument("--in-chans", type=int, default=None, choices=SUPPORTED_IN_CHANS,
                      help="input channels of the exported patch embedding; 3 gives each "
                           "channel a third of the kernel (default: 3 for medical_mae, else "
                           "the trained channels)")
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)

  def export() -> int:
    written = export_checkpoint(args.workdir, args.export_format, args.out, step=args.step,
                                in_chans=args.in_chans)
    for path in written:
      print(f"wrote {path}")
    return 0
  # One `error:` line naming the file or field, not a traceback (spcl_jax.command_line).
  return run_command(export, debug=args.debug)


if __name__ == "__main__":
  sys.exit(main())
