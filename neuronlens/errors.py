"""The one exception type users see: a problem they can fix, said in one clear sentence.

The command-line entry points catch it and print its message instead of a traceback.
"""


class UserError(ValueError):
    """A problem the user can fix (bad name, bad index, bad input, bad configuration)."""
