"""Mutation check: does some test fail when a line that carries the method is broken?

  python tests/mutants/run.py [ID ...] [--no-baseline] [--timeout SECONDS]

Each `NN-ID.patch` here is one deliberate bug (a header names it and the tests that should
catch it). For each, the repository is copied to a scratch folder (tracked and untracked,
non-ignored files), the patch applied there with `git apply`, and the named tests run with
`pytest -x`. A test failure kills the mutant; if every test passes, the mutant SURVIVED and the
suite has a hole. A patch that no longer applies is STALE: the code moved, so update it with the
line it was meant to break. The working tree is never modified.

A developer tool, not part of CI (it runs the named tests once per mutant: tens of minutes on
2 cores). Exit status 0 only when every mutant was killed.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent


@dataclasses.dataclass(frozen=True)
class Mutant:
  ident: str
  what: str
  tests: tuple[str, ...]
  patch: pathlib.Path


def read_mutants(selected: set[str]) -> list[Mutant]:
  mutants = []
  for patch in sorted(HERE.glob("*.patch")):
    header = {}
    for line in patch.read_text().splitlines():
      if not line.startswith("# "):
        break
      key, _, value = line[2:].partition(": ")
      header[key] = value.strip()
    missing = {"id", "what", "tests"} - set(header)
    if missing:
      raise SystemExit(f"error: {patch.name}: header lacks {', '.join(sorted(missing))}")
    if not selected or header["id"] in selected:
      mutants.append(Mutant(header["id"], header["what"], tuple(header["tests"].split()), patch))
  unknown = selected - {m.ident for m in mutants}
  if unknown:
    raise SystemExit(f"error: no mutant named {', '.join(sorted(unknown))} in {HERE}")
  return mutants


def copy_repository(dest: pathlib.Path) -> None:
  """The working tree as git sees it (committed or not), without ignored files (.venv, caches)."""
  files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout.split("\0")
  for name in filter(None, files):
    source = ROOT / name
    if source.is_file():
      (dest / name).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(source, dest / name)


def run_tests(tree: pathlib.Path, tests: tuple[str, ...], timeout: float) -> tuple[int, str]:
  command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
  try:
    done = subprocess.run(command, cwd=tree, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return -1, "timed out"
  lines = [l for l in done.stdout.splitlines() if l.startswith(("FAILED", "ERROR"))]
  last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-200:]
  return done.returncode, (lines[0] if lines else last)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("ids", nargs="*", help="mutant ids (default: all)")
  parser.add_argument("--no-baseline", action="store_true",
                      help="skip running the named tests on the unmutated tree first")
  parser.add_argument("--timeout", type=float, default=900, help="seconds per test run")
  args = parser.parse_args(argv)
  mutants = read_mutants(set(args.ids))

  with tempfile.TemporaryDirectory(prefix="spcl-mutants-") as scratch:
    pristine = pathlib.Path(scratch, "pristine")
    copy_repository(pristine)
    if not args.no_baseline:
      tests = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
      code, detail = run_tests(pristine, tests, args.timeout * 4)
      if code != 0:
        print(f"baseline: the named tests fail on the unmutated tree ({detail}); fix that first")
        return 2
      print(f"baseline: {len(tests)} test targets pass on the unmutated tree", flush=True)

    results = {"killed": 0, "SURVIVED": 0, "STALE": 0, "ERROR": 0}
    for mutant in mutants:
      tree = pathlib.Path(scratch, mutant.ident)
      shutil.copytree(pristine, tree)
      applied = subprocess.run(["git", "apply", str(mutant.patch)], cwd=tree,
                               capture_output=True, text=True)
      start = time.perf_counter()
      if applied.returncode != 0:
        verdict, detail = "STALE", applied.stderr.strip().splitlines()[0]
      else:
        code, detail = run_tests(tree, mutant.tests, args.timeout)
        verdict = {0: "SURVIVED", 1: "killed"}.get(code, "ERROR")
        if verdict == "ERROR":  # collection errors, timeouts: the mutant broke more than a test
          detail = f"pytest exit {code}: {detail}"
      results[verdict] += 1
      print(f"{mutant.ident:5s} {verdict:8s} {time.perf_counter() - start:6.1f}s  {mutant.what}"
            f"\n      {detail}", flush=True)
      shutil.rmtree(tree)

  print(", ".join(f"{count} {name.lower()}" for name, count in results.items()))
  return 0 if results["killed"] == len(mutants) else 1


if __name__ == "__main__":
  sys.exit(main())
