"""One convention for how every command fails: `error: ...` on one line of stderr, no traceback.

  exit 2  usage and config: a bad flag or argument, a bad config field (`errors.ConfigError`), a
          workdir whose recorded config forbids the change (`errors.UsageError` subclasses)
  exit 1  runtime: a missing or unreadable file, a corrupt checkpoint, a locked workdir, a
          non-finite loss or state, and anything unexpected

The traceback is printed only with `--debug`: a user who can fix the problem needs the one line;
a bug report needs the traceback. The entry points (spcl_jax.main, data.prepare, export,
extract) wrap their body in `run_command`.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable
from typing import Any

from spcl_jax.errors import ConfigError, UsageError

USAGE_EXIT_CODE = 2
RUNTIME_EXIT_CODE = 1
DEBUG_FLAG = "--debug"


def exit_code_for(error: BaseException) -> int:
  return USAGE_EXIT_CODE if isinstance(error, (UsageError, ConfigError)) else RUNTIME_EXIT_CODE


def _is_expected(error: BaseException) -> bool:
  """Errors whose message is the whole story: the user can act on it without a traceback."""
  return isinstance(error, (OSError, ValueError, KeyError, FloatingPointError, ImportError))


def one_line(error: BaseException) -> str:
  """The message on one line; an unexpected error is also named by its type."""
  message = error.args[0] if isinstance(error, KeyError) and len(error.args) == 1 else error
  text = " ".join(str(message).split())
  if _is_expected(error) and text:
    return text
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


def report(error: BaseException, debug: bool = False) -> int:
  """Prints the error (and with `debug` its traceback) to stderr; returns the exit code."""
  if debug:
    traceback.print_exception(error, file=sys.stderr)
  hint = "" if debug or _is_expected(error) else f" (rerun with {DEBUG_FLAG} for the traceback)"
  print(f"error: {one_line(error)}{hint}", file=sys.stderr, flush=True)
  return exit_code_for(error)


def fail_usage(message: str) -> None:
  """A usage error found before `run_command` runs (flag parsing): one line, exit 2."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(USAGE_EXIT_CODE)


def loaded_config(flag_values: Any) -> Any:
  """`flag_values.config`, loaded now: ml_collections loads the file lazily, so a missing or
  broken config file would otherwise fail later as a traceback; here it is a usage error."""
  try:
    config = flag_values.config
    config.get("model")
  except (OSError, SyntaxError, ImportError, ValueError) as e:
    raise UsageError(f"--config: {' '.join(str(e).split())}") from e
  return config


def absl_flags_parser(flag_values: Any) -> Callable[[list[str]], list[str]]:
  """A `flags_parser` for `absl.app.run` with one-line errors for bad flags and --config.x.

  absl and ml_collections raise on an unknown flag, a --config.x path that is not in the config
  or a value of the wrong type; the user gets the one line, not a traceback.
  """
  def parse(argv: list[str]) -> list[str]:
    try:
      return flag_values(argv)
    except (AttributeError, KeyError) as e:  # ml_collections: a --config.x that is not there
      overrides = " ".join(a for a in argv[1:] if a.startswith("--config."))
      fail_usage(f"unknown config field {str(e).strip(chr(34))} in: {overrides}")
    except Exception as e:  # pylint: disable=broad-except  # absl's flags.Error, bad values
      fail_usage(" ".join(str(e).split()) or type(e).__name__)
    return []
  return parse


class ArgumentParser(argparse.ArgumentParser):
  """argparse with the one-line error convention (argparse prints the usage block too)."""

  def error(self, message: str):
    print(f"error: {' '.join(message.split())} (see {self.prog} --help)", file=sys.stderr,
          flush=True)
    sys.exit(USAGE_EXIT_CODE)


def run_command(body: Callable[[], int | None], debug: bool = False) -> int:
  """Runs a command's body; every exception becomes one `error:` line and an exit code."""
  try:
    return int(body() or 0)
  except KeyboardInterrupt:
    print("error: interrupted", file=sys.stderr, flush=True)
    return 130
  except SystemExit:
    raise
  except Exception as e:  # pylint: disable=broad-except  # the point: no traceback by default
    return report(e, debug)


def define_training_run_flags(allow_change_example: str) -> None:
  """The flags every training command shares (pre-training and fine-tuning): the process group
  and the engine's resume controls. `allow_change_example` names fields of that command."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_bool("distributed", False,
                    "Call jax.distributed.initialize() (auto-detects SLURM, TPU pods, MPI; "
                    "else give --coordinator_address, --num_processes, --process_id).")
  flags.DEFINE_string("coordinator_address", None,
                      "host:port of process 0 (with --distributed).")
  flags.DEFINE_integer("num_processes", None, "Total processes (with --distributed).")
  flags.DEFINE_integer("process_id", None, "This process's index (with --distributed).")
  flags.DEFINE_integer("restore_step", None,
                       "Resume from this checkpoint step instead of the latest; the checkpoints "
                       "after it are moved to WORKDIR/checkpoints_superseded/.")
  flags.DEFINE_list("allow_config_change", [],
                    f"Config fields (e.g. {allow_change_example}) a resume may change although "
                    "they decide what is trained; recorded in WORKDIR/history.jsonl.")
  flags.DEFINE_bool("debug", False, "Print the full traceback of an error.")


def join_process_group(flag_values: Any) -> None:
  """--distributed: jax.distributed.initialize with the given (or auto-detected) coordinator."""
  if flag_values.distributed:
    import jax  # pylint: disable=g-import-not-at-top
    jax.distributed.initialize(flag_values.coordinator_address, flag_values.num_processes,
                               flag_values.process_id)
