"""The one exception type for bad user input (config, CLI, data, paths, checkpoints).

The CLI prints a `UserError` as a single line and exits with code 2; anything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """Input from the user that cannot be used; the message names the key, file or row and what was expected."""
