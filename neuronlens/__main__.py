from neuronlens.cli import main

main()
