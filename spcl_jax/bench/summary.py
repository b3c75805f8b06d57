"""A markdown table of benchmark results: python -m spcl_jax.bench summary LOG [LOG ...]

Reads the JSON lines `bench matmul` and `bench train` (with --reference torch) print, skipping
every other line, so a whole log can be given. Each train variant's images/s is set against the
measured matmul limit (`bench matmul`, the same run) and against the torch.compile reference of
the same batch, dtype and device when the log has them. Nothing is estimated: a ratio whose
yardstick is missing from the log is left blank.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable


def read_results(lines: Iterable[str]) -> list[dict]:
  """The JSON objects among `lines` that name a variant, in order."""
  results = []
  for line in lines:
    line = line.strip()
    if not line.startswith("{"):
      continue
    try:
      result = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(result, dict) and "variant" in result:
      results.append(result)
  return results


def _same_setting(a: dict, b: dict) -> bool:
  # the same log is one device; torch's device name and jax's device kind may be spelled apart
  return all(a.get(k) == b.get(k) for k in ("batch", "dtype"))


def _ratio(value: float | None, yardstick: float | None) -> str:
  return f"{value / yardstick:.2f}" if value and yardstick else ""


def table(results: list[dict]) -> str:
  """One row per train variant: images/s, its fraction of the matmul limit, x torch.compile."""
  limits = [r for r in results if r["variant"] == "matmul"]
  limit = limits[-1]["images_per_s_limit"] if limits else None
  compiled = [r for r in results if r["variant"] == "torch-compile"]
  rows = ["| variant | attention | remat | dtype | batch | images/s | step ms "
          "| of matmul limit | x torch.compile |",
          "|---|---|---|---|---|---|---|---|---|"]
  if limit:
    rows.append(f"| matmul {limits[-1]['size']}^3 {limits[-1]['dtype']} "
                f"({limits[-1]['tflops_per_s']:.0f} TFLOP/s) | | | | | {limit:.0f} | | 1.00 | |")
  for r in results:
    if r["variant"] == "matmul" or "images_per_s" not in r:
      continue
    reference = next((c["images_per_s"] for c in reversed(compiled) if _same_setting(c, r)),
                     None)
    rows.append(f"| {r['variant']} | {r.get('attention', '')} | {r.get('remat', '')} "
                f"| {r.get('dtype', '')} | {r.get('batch', '')} | {r['images_per_s']:.0f} "
                f"| {r.get('step_ms', float('nan')):.1f} | {_ratio(r['images_per_s'], limit)} "
                f"| {_ratio(r['images_per_s'], reference)} |")
  devices = sorted({str(r["device"]) for r in results if r.get("device")})
  return "\n".join(rows) + (f"\n\ndevice: {', '.join(devices)}" if devices else "")


def main(argv: list[str]) -> int:
  if not argv:
    print(__doc__.strip(), file=sys.stderr)
    return 2
  lines: list[str] = []
  for path in argv:
    if path == "-":
      lines += sys.stdin.read().splitlines()
    else:
      with open(path, encoding="utf-8") as f:
        lines += f.read().splitlines()
  results = read_results(lines)
  if not results:
    print(f"no benchmark JSON lines in {', '.join(argv)}", file=sys.stderr)
    return 1
  print(table(results))
  return 0
