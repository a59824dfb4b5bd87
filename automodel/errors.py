"""The one exception type for bad user input (config, CLI, data, paths, checkpoints).

The CLI prints a `UserError` as a single line and exits with code 2; anything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """Input from the user that cannot be used; the message names the key, file or row and what was expected."""


class TrainingStopped(Exception):
    """The run stopped on purpose (e.g. a non-finite loss with `on_nonfinite: stop`); the CLI exits 1 with the
    message, which says at which step and what to do."""
