"""``python -m neuronlens.serve``: the `neuronlens-serve` command."""

from neuronlens.serve.command import main

main()
