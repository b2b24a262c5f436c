"""An SAE for the subject model, trained here (`neuronlens-sae`) with EleutherAI's sparsify on the
run's corpus, so that SAE latents can be interpreted offline (``subject=sae``)."""
