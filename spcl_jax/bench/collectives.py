"""The collectives of a compiled XLA program, read from its HLO text, with their bytes per step.

Each collective instruction is counted once per execution: an instruction inside a while loop
(a `lax.scan`) counts as many times as the loop's known trip count. Bytes are the payload per
device: an all-reduce's operand, an all-gather's output, a reduce-scatter's input. What the
wire carries follows from the algorithm (a ring all-reduce sends about twice the payload);
that is the scaling model's business, not this module's.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import defaultdict

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
               "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}

_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$")
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT )?%?[\w.\-]+ = (.+?) (" + "|".join(KINDS) + r")(?:-start)?\((.*)$")
_ARRAY = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\]")
_WHILE = re.compile(r" while\(.*body=%?([\w.\-]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CALLS = re.compile(r"(?:calls|to_apply|condition)=%?([\w.\-]+)|branch_computations=\{([^}]*)\}")
_GROUPS_LIST = re.compile(r"replica_groups=\{\{([\d,]+)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[(\d+),(\d+)\]")
# Newer XLA: replica_groups=mesh['axis_0'=2,'axis_1'=4][, device_ids=(...)] {'axis_0'}
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}")
_MESH_AXIS = re.compile(r"'([^']+)'=(\d+)")


@dataclasses.dataclass(frozen=True)
class Collective:
  kind: str
  shapes: tuple[tuple[str, tuple[int, ...]], ...]  # (dtype, dims) of the payload arrays
  payload_bytes: int                             # per device, per execution
  group_size: int
  executions: int                                # per step (loop trip counts multiplied in)

  @property
  def bytes_per_step(self) -> int:
    return self.payload_bytes * self.executions


def _arrays(text: str) -> list[tuple[str, tuple[int, ...]]]:
  return [(dtype, tuple(int(d) for d in dims.split(",") if d)) for dtype, dims in
          _ARRAY.findall(text)]


def _nbytes(arrays: list[tuple[str, tuple[int, ...]]]) -> int:
  total = 0
  for dtype, dims in arrays:
    n = DTYPE_BYTES[dtype]
    for d in dims:
      n *= d
    total += n
  return total


def _group_size(line: str) -> int:
  listed = _GROUPS_LIST.search(line)
  if listed:
    return len(listed.group(1).split(","))
  iota = _GROUPS_IOTA.search(line)
  if iota:
    return int(iota.group(2))
  mesh = _GROUPS_MESH.search(line)
  if mesh:
    sizes = {name: int(size) for name, size in _MESH_AXIS.findall(mesh.group(1))}
    size = 1
    for axis in re.findall(r"'([^']+)'", mesh.group(2)):
      size *= sizes[axis]
    return size
  return 1


def _computations(hlo: str) -> tuple[dict[str, list[str]], str]:
  bodies: dict[str, list[str]] = {}
  entry, current = "", None
  for line in hlo.splitlines():
    header = _HEADER.match(line)
    if header and "=" not in line.split("(")[0]:
      current = header.group(2)
      bodies[current] = []
      if header.group(1):
        entry = current
    elif current is not None:
      bodies[current].append(line)
  return bodies, entry


def _executions(bodies: dict[str, list[str]], entry: str) -> dict[str, int]:
  """How often each computation runs per call of the entry computation."""
  calls: dict[str, list[tuple[str, int]]] = defaultdict(list)
  for name, lines in bodies.items():
    for line in lines:
      loop = _WHILE.search(line)
      if loop:
        trips = _TRIP_COUNT.search(line)
        if trips is None:
          raise ValueError(f"a while loop without a known trip count in {name}: {line[:120]}")
        calls[name].append((loop.group(1), int(trips.group(1))))
      for single, listed in _CALLS.findall(line):
        for callee in (single or listed).replace("%", "").split(","):
          if callee.strip() in bodies:
            calls[name].append((callee.strip(), 1))
  counts: dict[str, int] = defaultdict(int)

  def visit(name: str, times: int) -> None:
    counts[name] += times
    for callee, factor in calls[name]:
      visit(callee, times * factor)
  visit(entry, 1)
  return counts


def collectives(hlo: str) -> list[Collective]:
  """Every collective of an optimised HLO module (`compiled.as_text()`)."""
  bodies, entry = _computations(hlo)
  if not entry:
    raise ValueError("no ENTRY computation in the HLO text")
  executions = _executions(bodies, entry)
  found = []
  for name, lines in bodies.items():
    for line in lines:
      match = _INSTRUCTION.match(line)
      if not match or executions.get(name, 0) == 0:
        continue
      result, kind = _arrays(match.group(1)), match.group(2)
      group = _group_size(line)
      payload = _nbytes(result)
      if kind == "reduce-scatter":
        payload *= group  # the input: each device contributes the whole array
      found.append(Collective(kind, tuple(result), payload, group, executions[name]))
  return found


def bytes_by_kind(found: list[Collective]) -> dict[str, int]:
  totals = {kind: 0 for kind in KINDS}
  for c in found:
    totals[c.kind] += c.bytes_per_step
  return totals


def describe(found: list[Collective]) -> str:
  return json.dumps([dataclasses.asdict(c) for c in found], indent=1)
