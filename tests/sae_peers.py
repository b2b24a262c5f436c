"""sae-lens and EleutherAI's sparsify as peers: SAEs written by the libraries themselves.

sae-lens brings transformer-lens, wandb and dozens more, none of which neuronlens needs, so it
lives in a venv of its own that sees this environment's packages (torch, transformers) through a
.pth file, whether this environment is a venv or not:

    python tests/sae_peers.py install        # the venv (~/.cache/neuronlens/sae-peers-venv)
    python tests/sae_peers.py write OUT      # (run by the tests, with the venv's python)

``write`` saves one SAE of each architecture the subject reads (random weights, thresholds
above 0), each library's own way, and ``OUT/expected.safetensors``: a batch of inputs ``x``
and what each library's own ``encode`` makes of it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

VENV = Path(os.environ.get("NEURONLENS_SAE_PEERS_VENV",
                           Path.home() / ".cache" / "neuronlens" / "sae-peers-venv"))
PINS = ["sae-lens==6.54.12", "eai-sparsify==1.3.3"]
D_IN, LATENTS = 32, 24


def python() -> Path:
    return VENV / "bin" / "python"


def install() -> None:
    import sysconfig

    if not python().exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    # this environment's packages after the venv's own (a --system-site-packages venv would see
    # the base interpreter's instead, when this one is itself a venv)
    site = subprocess.run([str(python()), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    mine = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (Path(site) / "neuronlens-parent.pth").write_text("\n".join(mine) + "\n")
    subprocess.run([str(python()), "-m", "pip", "install", "--quiet", *PINS], check=True)


def write(out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from sae_lens import (JumpReLUSAE, JumpReLUSAEConfig, JumpReLUTranscoder, JumpReLUTranscoderConfig,
                          SkipTranscoder, SkipTranscoderConfig, StandardSAE, StandardSAEConfig, TopKSAE,
                          TopKSAEConfig, Transcoder, TranscoderConfig)
    from sae_lens.saes.sae import SAEMetadata
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(0)
    x = torch.randn(4, 7, D_IN)
    expected = {"x": x}
    resid, mlp_in = "blocks.1.hook_resid_post", "blocks.1.hook_mlp_in"
    transcoding = {"d_out": D_IN, "apply_b_dec_to_input": False}
    lens = {
        "standard": (StandardSAE, StandardSAEConfig, {}, resid),
        "topk": (TopKSAE, TopKSAEConfig, {"k": 5}, resid),
        "topk_rescaled": (TopKSAE, TopKSAEConfig, {"k": 5, "rescale_acts_by_decoder_norm": True}, resid),
        "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig, {}, resid),
        "transcoder": (Transcoder, TranscoderConfig, transcoding, mlp_in),
        "skip_transcoder": (SkipTranscoder, SkipTranscoderConfig, transcoding, mlp_in),
        "jumprelu_transcoder": (JumpReLUTranscoder, JumpReLUTranscoderConfig, transcoding, mlp_in),
    }
    for name, (cls, config, extra, hook) in lens.items():
        sae = cls(config(d_in=D_IN, d_sae=LATENTS, metadata=SAEMetadata(hook_name=hook, model_name="tiny"),
                         **extra))
        with torch.no_grad():
            for p in sae.parameters():
                p.copy_(torch.randn_like(p) * 0.5)
            if hasattr(sae, "threshold"):
                sae.threshold.copy_(torch.rand_like(sae.threshold))
        sae.save_model(out / name)
        with torch.no_grad():
            expected[name] = sae.encode(x)
    for name, config in {"sparsify": SparseCoderConfig(k=6, num_latents=LATENTS),
                         "sparsify_transcoder": SparseCoderConfig(k=4, num_latents=LATENTS,
                                                                  transcode=True)}.items():
        coder = SparseCoder(D_IN, config)
        with torch.no_grad():
            for p in coder.parameters():
                p.copy_(torch.randn_like(p) * 0.5)
            coder.save_to_disk(out / name / "layers.1")   # sparsify names the folder for its hookpoint
            got = coder.encode(x.reshape(-1, D_IN))
            dense = torch.zeros(len(got.top_acts), LATENTS).scatter_(-1, got.top_indices, got.top_acts)
        expected[name] = dense.reshape(*x.shape[:-1], LATENTS)
    save_file({k: v.contiguous() for k, v in expected.items()}, out / "expected.safetensors")


if __name__ == "__main__":
    if sys.argv[1:2] == ["install"]:
        install()
    elif sys.argv[1:2] == ["write"] and len(sys.argv) == 3:
        write(Path(sys.argv[2]))
    else:
        sys.exit("usage: python tests/sae_peers.py install | write OUT")
