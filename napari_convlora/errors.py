"""The one exception type the core raises for problems the user can fix.

Every user-facing entry point (CLI, widget) catches :class:`InputError` and
shows its message as one line; anything else is a bug and is reported as such.
"""


class InputError(ValueError):
    """Bad input (file, argument, adapter): the message names the thing and the problem."""
