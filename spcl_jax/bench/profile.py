"""Where a step's time goes: python -m spcl_jax.bench profile TRACE.json.gz [--steps N] [--top 20]

Reads the Perfetto trace `bench train --profile_dir=DIR` writes (jax.profiler, one file under
DIR/plugins/profile/*/perfetto_trace.json.gz) and sums the time of the operations that ran on
the accelerator (the `/device:...` processes: GPU kernels, TPU ops); on a CPU-only trace, the
host's. Prints the time per step of each kind of work (matmuls, attention kernels, fusions,
copies and transposes, collectives) and the operations that took longest, then one JSON line.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re

# Kinds of work, by a pattern of the kernel/op name (lowercase); first match wins.
KINDS: tuple[tuple[str, str], ...] = (
    ("attention", r"cudnn|flash|fmha|attention|sdpa"),
    ("matmul", r"gemm|cublas|cutlass|xmma|wgmma|dot|matmul|convolution"),
    ("collective", r"nccl|all-reduce|all_reduce|all-gather|all_gather|reduce-scatter|"
                   r"reduce_scatter|collective|all-to-all"),
    ("copy/transpose", r"copy|transpose|memcpy|memset|dynamic-update-slice"),
    ("fusion", r"fusion|loop_|input_|reduce|convert|select|gather|scatter"),
)


def kind_of(name: str) -> str:
  lowered = name.lower()
  for kind, pattern in KINDS:
    if re.search(pattern, lowered):
      return kind
  return "other"


def load_events(path: str | pathlib.Path) -> list[dict]:
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8") as f:
    trace = json.load(f)
  return trace["traceEvents"] if isinstance(trace, dict) else trace


def find_trace(profile_dir: str | pathlib.Path) -> pathlib.Path:
  """The newest perfetto trace jax.profiler wrote under `profile_dir`."""
  traces = sorted(pathlib.Path(profile_dir).glob("plugins/profile/*/perfetto_trace.json.gz"))
  if not traces:
    raise FileNotFoundError(f"no plugins/profile/*/perfetto_trace.json.gz under {profile_dir}")
  return traces[-1]


def device_op_times(events: list[dict]) -> tuple[dict[str, float], dict[str, int], str]:
  """Total microseconds and counts per op name on the accelerator (else the host), and which."""
  processes = {e.get("pid"): e.get("args", {}).get("name", "")
               for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
  devices = {pid for pid, name in processes.items() if name.startswith("/device:")}
  chosen = devices or set(processes)
  where = ", ".join(sorted(processes[p] for p in chosen)) or "no process names"
  totals: dict[str, float] = collections.defaultdict(float)
  counts: dict[str, int] = collections.defaultdict(int)
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in chosen:
      totals[e["name"]] += float(e.get("dur", 0.0))
      counts[e["name"]] += 1
  return dict(totals), dict(counts), where


def summarise(events: list[dict], steps: int, top: int) -> dict:
  totals, counts, where = device_op_times(events)
  if not totals:
    raise ValueError("the trace has no timed operations")
  all_us = sum(totals.values())
  by_kind: dict[str, float] = collections.defaultdict(float)
  for name, us in totals.items():
    by_kind[kind_of(name)] += us
  ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
  return {
      "where": where, "steps": steps, "busy_ms_per_step": all_us / 1e3 / steps,
      "kinds": {k: {"ms_per_step": us / 1e3 / steps, "share": us / all_us}
                for k, us in sorted(by_kind.items(), key=lambda kv: -kv[1])},
      "top": [{"name": n, "kind": kind_of(n), "ms_per_step": us / 1e3 / steps,
               "share": us / all_us, "calls_per_step": counts[n] / steps} for n, us in ranked],
  }


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="python -m spcl_jax.bench profile", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("trace", help="a perfetto_trace.json.gz, or the --profile_dir folder")
  parser.add_argument("--steps", type=int, default=3, help="steps the trace holds (default 3, "
                      "what bench train --profile_dir traces)")
  parser.add_argument("--top", type=int, default=20)
  args = parser.parse_args(argv)
  path = pathlib.Path(args.trace)
  if path.is_dir():
    path = find_trace(path)
  if args.steps < 1:
    parser.error("--steps must be >= 1")
  result = summarise(load_events(path), args.steps, args.top)
  print(f"{path}: {result['where']}, {result['busy_ms_per_step']:.2f} ms busy per step")
  for kind, figures in result["kinds"].items():
    print(f"  {kind:15s} {figures['ms_per_step']:9.2f} ms/step  {figures['share']:6.1%}")
  print(f"top {len(result['top'])} operations:")
  for op in result["top"]:
    print(f"  {op['ms_per_step']:9.3f} ms/step {op['share']:6.1%} x{op['calls_per_step']:<5g} "
          f"[{op['kind']}] {op['name'][:100]}")
  print(json.dumps({"variant": "profile", **result}))
  return 0
