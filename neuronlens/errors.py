"""The one exception type users see: a problem they can fix, said in one clear sentence.

The command-line entry points catch it and print its message instead of a traceback. Its message
never holds a key (see `neuronlens.secrets`).
"""

from neuronlens.secrets import redact


class UserError(ValueError):
    """A problem the user can fix (bad name, bad index, bad input, bad configuration)."""

    def __init__(self, message: object = "", *args: object):
        super().__init__(redact(str(message)), *args)
