"""The errors a user can fix from their message alone: every command reports them on one line
with exit code 2 (`cli_errors.report`). They live at the bottom of the import graph so that any
module may raise them without importing the command-line code or the config checks."""


class UsageError(ValueError):
  """A command-line argument or config value the command cannot use (exit code 2)."""


class ConfigError(ValueError):
  """A config field has a value the run cannot use; the message names the field."""
