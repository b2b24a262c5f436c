"""The command line: the `neuronlens` command (``command.py``), the one ``main`` every Hydra command
of neuronlens runs through (``main.py``), its ``--help`` (``help.py``) and its reading of a bad
command line (``checks.py``)."""

from neuronlens.cli.main import Command, fail_cleanly, main as run_command, user_error

__all__ = ["Command", "fail_cleanly", "main", "run_command", "user_error"]


def main() -> None:
    """The `neuronlens` command."""
    from neuronlens.cli.command import main as neuronlens

    neuronlens()
