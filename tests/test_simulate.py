"""Simulation: the prompt, placeholder finding on real tokenizers, exact candidate scoring by the
local backend (checked against plain forward passes), prefix reuse, and the Simulator engine.

Tokenizers: the real SmolLM2 tokenizer ("10" is two tokens, tab its own token), the real
Gemma-3 tokenizer (adds <bos>), and a BPE tokenizer trained here whose pre-tokenizer keeps a tab
attached to the following word, so "\\tunknown" is ONE token and the candidates become
"\\t0".."\\t10". Models are tiny random Llama / GPT-2 models built with the tokenizer's vocabulary.
"""

from __future__ import annotations

import math
import random
import warnings
from pathlib import Path

import pytest
import torch

from neuronlens.backends.base import (
    Backend,
    BackendError,
    Capabilities,
    PromptLogprobRequest,
    TokenDistributions,
    TransientError,
    Unscorable,
    Usage,
)
from neuronlens.backends.candidates import candidate_tokens
from neuronlens.backends.local import LocalBackend
from agreement import REL   # float32 along two paths (tests/agreement.py)
from neuronlens.records import ActivationRecord
from neuronlens.scorers.base import SimulationResult
from neuronlens.scorers.strategies import NUMBERS, UNKNOWN
from neuronlens.scorers.simulation import (
    FEWSHOT,
    Simulator,
    build_request,
    expected_value,
    prompt_prefix,
)

# An excerpt with spaces, digits (one and two of them), a newline (escaped by format_token), a
# tab, a multi-byte character, and the placeholder word itself as a token.
EXCERPT = ["The", " sea", " 42", "\n", "7", "10", " waves", "\t", "unknown", "é!"]


# ---- tokenizers -------------------------------------------------------------------------------

def _tab_corpus(n: int = 300) -> list[str]:
    rng = random.Random(0)
    words = ("the sea ship wave salt water Monday oven bracket value print hello world neuron "
             "token cooking waves").split()
    lines = []
    for _ in range(n):
        excerpt = "".join(f"{rng.choice(['', ' '])}{rng.choice(words)}\tunknown\n"
                          for _ in range(rng.randint(2, 6)))
        nums = " ".join(str(rng.randint(0, 10)) for _ in range(3))
        lines.append(f"{excerpt}{rng.choice(words)}\t{rng.randint(0, 10)}\n"
                     f"values {nums} and {rng.randint(0, 999)} degrees.\n")
    return lines


@pytest.fixture(scope="session")
def tab_tokenizer():
    """BPE with digits split one by one, but a tab kept with the word after it."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        # "\tword" | " word" | one digit | whitespace run | punctuation run
        pre_tokenizers.Split(Regex(r"\t?[^\s\d\p{P}]+| ?[^\s\d\p{P}]+|\d|\s+|\p{P}+"),
                             behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_tab_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


@pytest.fixture(scope="session")
def gemma3_tokenizer(request):
    """The Gemma-3-270M tokenizer from its GGUF file. Reading the GGUF takes ~30 s, so the
    converted tokenizer is kept in pytest's cache, keyed by the file and transformers version."""
    import transformers
    from transformers import AutoTokenizer

    from neuronlens.models import SubjectError, embedded_gguf

    try:
        path = embedded_gguf("gemma3")
    except SubjectError as e:
        pytest.skip(f"Gemma-3 GGUF not available: {e}")
    st = path.stat()
    key = f"{path.stem}-{st.st_size}-{int(st.st_mtime)}-tf{transformers.__version__}"
    cache = getattr(request.config, "cache", None)
    saved = Path(cache.mkdir("neuronlens-gemma3-tokenizer")) / key if cache is not None else None
    if saved is not None and (saved / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(saved)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if saved is not None:
        tok.save_pretrained(saved)
    return tok


TOKENIZERS = ["smollm2", "gemma3", "tab"]


@pytest.fixture(scope="session")
def tokenizers_by_name(request):
    return {"smollm2": lambda: request.getfixturevalue("smollm2_tokenizer"),
            "gemma3": lambda: request.getfixturevalue("gemma3_tokenizer"),
            "tab": lambda: request.getfixturevalue("tab_tokenizer")}


@pytest.fixture
def tokenizer(request, tokenizers_by_name):
    return tokenizers_by_name[request.param]()


# ---- tiny models ------------------------------------------------------------------------------

def _tiny_model(arch: str, tokenizer, seed: int = 0):
    """A random tiny model whose output rows for the candidates' tokens are scaled up, so that
    the distribution over the candidates is far from uniform and depends on the context."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    vocab = len(tokenizer)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096))
    elif arch == "gemma3":  # a sliding window far shorter than the prompts, next to a full layer
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        model = Gemma3ForCausalLM(Gemma3TextConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=16,
            layer_types=["sliding_attention", "full_attention"], max_position_embeddings=4096,
            attn_implementation="eager"))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4,
                                           n_positions=4096, tie_word_embeddings=False,
                                           bos_token_id=0, eos_token_id=0))
    boost = sorted({t for lead in ("", "\t")
                    for seq in candidate_tokens(tokenizer, lead, NUMBERS) for t in seq})
    with torch.no_grad():
        out = model.get_output_embeddings().weight
        out[boost] = torch.randn(len(boost), out.shape[1]) * 0.5
        _sharpen_ten(model.eval(), tokenizer)
    return model


def _sharpen_ten(model, tokenizer) -> None:
    """Set the logit of the last token of "10" after its first token(s) to about log(vocab) in
    the contexts of the EXCERPT placeholders: P("0" | "1") becomes substantial there (it is
    ~1/vocab in a random model), so the split of P("1") between "1" and "10" is visible."""
    req = build_request("words about the sea", EXCERPT)
    enc = tokenizer(req.prompt, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    hs, last = [], None
    for c in req.positions:
        j = next(i for i, (s, e) in enumerate(offsets) if s <= c < e)
        ten = candidate_tokens(tokenizer, req.prompt[offsets[j][0]:c], NUMBERS)[10]
        if len(ten) < 2:
            continue
        x = torch.tensor([ids[:j] + ten[:-1]])
        hs.append(model.base_model(input_ids=x).last_hidden_state[0, -1])
        last = ten[-1]
    if not hs:
        return
    H = torch.stack(hs)
    w = model.get_output_embeddings().weight
    target = torch.full((len(hs),), math.log(len(tokenizer)))
    w[last] += torch.linalg.pinv(H) @ (target - H @ w[last])


def _backend(model, tokenizer, prefix_reuse: bool = True, batch_size: int = 2) -> LocalBackend:
    be = LocalBackend(batch_size=batch_size, prefix_reuse=prefix_reuse)
    be.model, be.tokenizer = model, tokenizer
    return be


# ---- 6. the prompt ----------------------------------------------------------------------------

GOLDEN = (
    "We are studying the neurons of a language model. A neuron reads text one token at a time and "
    "gives, at each token, an activation from 0 (no response) to 10 (its strongest response). "
    "Most tokens get 0. Given a description of what a neuron responds to, predict its activation "
    "on every token of an excerpt. Each line is a token, a tab, then the activation; \"unknown\" "
    "marks an activation you are to predict.\n"
    "\n"
    "Neuron 1\n"
    "Explanation of neuron 1: the main thing this neuron does is find words about the sea.\n"
    "Activations:\n"
    "<start>\n"
    "The\tunknown\n"
    " 42\tunknown\n"
    "\n\tunknown\n"      # tokens raw, newlines included, as the method writes them
    "<end>\n"
)


def test_prompt_golden_without_fewshot():
    req = build_request(" words about the sea. ", ["The", " 42", "\n"], fewshot=False)
    assert req.prompt == GOLDEN
    assert req.candidates == tuple(str(i) for i in range(11))
    assert len(req.positions) == 3
    assert all(req.prompt[p:p + 7] == "unknown" for p in req.positions)
    assert all(req.prompt[p - 1] == "\t" for p in req.positions)
    assert req.positions == (GOLDEN.index("The\tunknown") + 4, GOLDEN.index(" 42\tunknown") + 4,
                             GOLDEN.index("\n\n\tunknown") + 3)


def test_prompt_with_fewshot_is_prefix_plus_excerpt():
    req = build_request("words about the sea", ["The", " 42", "\n"])
    n = len(FEWSHOT) + 1
    tail = (f"Neuron {n}\nExplanation of neuron {n}: the main thing this neuron does is find "
            "words about the sea.\nActivations:\n<start>\n"
            "The\tunknown\n 42\tunknown\n\n\tunknown\n<end>\n")
    assert req.prompt.endswith("\n\n" + tail)
    assert req.prompt == prompt_prefix("words about the sea", raw=True) + tail[tail.index("The\t"):]
    assert req.prompt.startswith(GOLDEN.split("\n\n")[0] + "\n\nNeuron 1\n")
    # the examples' first lines show "unknown" and then their values (the method's reveal)
    assert req.prompt.count(UNKNOWN + "\n") == 3 + sum(ex.hidden for ex in FEWSHOT)
    assert sum(ex.hidden > 0 for ex in FEWSHOT) >= 3 and all(ex.hidden < len(ex.pairs) for ex in FEWSHOT)
    for ex in FEWSHOT:
        lines = ex.lines(raw=True)
        assert lines[:ex.hidden] == [f"{t}\t{UNKNOWN}\n" for t, _ in ex.pairs[:ex.hidden]]
        assert lines[ex.hidden:] == [f"{t}\t{a}\n" for t, a in ex.pairs[ex.hidden:]]
    # the chat strategies, which read answers line by line, keep newlines and tabs escaped
    assert "\\n\t" in prompt_prefix("x") and "\\n\t" not in prompt_prefix("x", raw=True)
    assert all(req.prompt[p:p + 7] == "unknown" for p in req.positions)
    assert req.positions == tuple(sorted(req.positions))


def test_positions_for_awkward_tokens():
    req = build_request("x", EXCERPT)
    assert len(req.positions) == len(EXCERPT)
    assert all(req.prompt[p:p + 7] == "unknown" for p in req.positions)
    # each excerpt line is the token, a tab, the placeholder: newlines raw, a tab token escaped
    listing = req.prompt.split("<start>\n")[-1]
    shown = [t.replace("\t", "\\t") for t in EXCERPT]
    assert shown[3] == "\n" and shown[7] == "\\t"
    assert listing == "".join(f"{t}\tunknown\n" for t in shown) + "<end>\n"


# ---- 2. placeholder finding on three tokenizers ------------------------------------------------

def _walk(node, out):
    if node.candidate is not None:
        out[node.candidate] = node.path
    for child in node.children.values():
        _walk(child, out)
    return out


@pytest.mark.parametrize("tokenizer", TOKENIZERS, indirect=True)
def test_placeholder_tokens_and_candidates(tokenizer, request):
    name = request.node.callspec.params["tokenizer"]
    req = build_request("words about the sea", EXCERPT)
    enc = tokenizer(req.prompt, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    be = LocalBackend()
    be.tokenizer = tokenizer
    queries = be._queries(req, ids, offsets)
    assert len(queries) == len(req.positions)
    leads = []
    for c, q in zip(req.positions, queries):
        s, e = offsets[q.j]
        assert s <= c < e, "the token found must cover the placeholder's first character"
        assert req.prompt[c:c + 7] == "unknown"
        lead = req.prompt[s:c]
        if name == "tab" and req.prompt[s - 2:s] == "\n\t":
            # after a raw newline token this tokenizer's whitespace run takes the tab too, and the
            # placeholder starts a token of its own: what matters is that the token starts there
            assert lead == "" and "unknown".startswith(req.prompt[s:e])
        else:
            assert req.prompt[s:e] == lead + "unknown"      # all three: one placeholder token
        assert offsets[q.j - 1][1] <= s                     # the context ends before the token
        leads.append(lead)
        seqs = _walk(q.trie, {})
        assert sorted(seqs) == list(range(11))
        for k, cand in enumerate(NUMBERS):
            assert tokenizer.decode(list(seqs[k])) == lead + cand
        assert candidate_tokens(tokenizer, lead, NUMBERS) == [list(seqs[k]) for k in range(11)]
        assert q.n_candidates == 11
    if name == "tab":
        newline = EXCERPT.index("\n")
        assert leads[newline] == "" and set(leads[:newline] + leads[newline + 1:]) == {"\t"}
        assert all(req.prompt[offsets[q.j][0]:offsets[q.j][1]] == "\tunknown"
                   for i, q in enumerate(queries) if i != newline)
        ten = list(_walk(queries[0].trie, {})[10])
        assert len(ten) == 3                                # "\t", "1", "0"
        assert [p for p in queries[0].paths] == [(ten[0],), (ten[0], ten[1])]
    else:
        assert set(leads) == {""}
        ten = list(_walk(queries[0].trie, {})[10])
        assert len(ten) == 2                                # "1", "0"
        assert queries[0].paths == [(ten[0],)]
    if name == "gemma3":
        assert ids[0] == tokenizer.bos_token_id             # the backend keeps <bos>


def test_tab_tokenizer_merges_tab_with_placeholder(tab_tokenizer):
    text = "sea\tunknown\n 42\tunknown\n"
    enc = tab_tokenizer(text, return_offsets_mapping=True)
    spans = [text[s:e] for s, e in enc["offset_mapping"]]
    assert spans.count("\tunknown") == 2
    assert len(enc["input_ids"]) == len(spans)
    assert ["\t10"[s:e] for s, e in tab_tokenizer("\t10", return_offsets_mapping=True)
            ["offset_mapping"]] == ["\t", "1", "0"]


def test_tab_tokenizer_lead_after_whitespace_token(tab_tokenizer):
    """A token ending in whitespace swallows the tab ("  \\t" is one token); the placeholder's
    token is then plain "unknown" and the lead is empty: leads are found per position."""
    req = build_request("x", ["a", "  ", "b"])
    enc = tab_tokenizer(req.prompt, return_offsets_mapping=True)
    be = LocalBackend()
    be.tokenizer = tab_tokenizer
    queries = be._queries(req, enc["input_ids"], enc["offset_mapping"])
    leads = [req.prompt[enc["offset_mapping"][q.j][0]:c] for q, c in zip(queries, req.positions)]
    assert leads == ["\t", "", "\t"]
    assert len(_walk(queries[1].trie, {})) == 11


def test_queries_reject_uncovered_offset(smollm2_tokenizer):
    req = build_request("x", ["a"])
    bad = PromptLogprobRequest(req.prompt, (len(req.prompt) + 5,), NUMBERS)
    enc = smollm2_tokenizer(req.prompt, return_offsets_mapping=True)
    be = LocalBackend()
    be.tokenizer = smollm2_tokenizer
    with pytest.raises(Unscorable, match="covers placeholder"):
        be._queries(bad, enc["input_ids"], enc["offset_mapping"])


# ---- 3. exactness against plain forward passes ------------------------------------------------

def _explicit(model, tokenizer, req: PromptLogprobRequest):
    """Candidate distributions from separate full forward passes, no trie, no mask, no cache."""
    enc = tokenizer(req.prompt, return_offsets_mapping=True)   # as the backend: whole prompt
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    probs, mass = [], []
    for c in req.positions:
        covering = [i for i, (s, e) in enumerate(offsets) if s <= c < e]
        assert len(covering) == 1
        j = covering[0]
        lead = req.prompt[offsets[j][0]:c]
        seqs = candidate_tokens(tokenizer, lead, NUMBERS)
        memo = {}

        def nextp(prefix: tuple[int, ...]) -> torch.Tensor:
            if prefix not in memo:
                x = torch.tensor([ids[:j] + list(prefix)])
                with torch.no_grad():
                    logits = model(input_ids=x, logits_to_keep=1).logits[0, -1]
                memo[prefix] = torch.softmax(logits.double(), dim=-1)
            return memo[prefix]

        raw = []
        for seq in seqs:
            p = 1.0
            for i, t in enumerate(seq):                      # P(seq) = prod P(t_i | ctx, t_<i)
                p *= float(nextp(tuple(seq[:i]))[t])
            longer = {s[len(seq)] for s in seqs if len(s) > len(seq) and s[:len(seq)] == seq}
            if longer:                                      # "1" loses what continues into "10"
                p *= 1.0 - sum(float(nextp(tuple(seq))[t]) for t in longer)
            raw.append(p)
        total = sum(raw)
        probs.append([x / total for x in raw])
        mass.append(total)
        if len(seqs[10]) > len(seqs[1]):                    # the "10" check had its 2nd pass
            assert tuple(seqs[1]) in memo
    return probs, mass


EXACT_CASES = [("smollm2", "llama"), ("smollm2", "gpt2"), ("tab", "llama"), ("tab", "gpt2"),
               ("gemma3", "llama"), ("smollm2", "gemma3")]


@pytest.mark.parametrize("tokenizer,arch", EXACT_CASES, indirect=["tokenizer"])
def test_backend_matches_explicit_forward_passes(tokenizer, arch):
    model = _tiny_model(arch, tokenizer)
    reqs = [build_request("words about the sea", EXCERPT[:6]),
            build_request("words about the sea", EXCERPT[4:], fewshot=True)]
    dists = _backend(model, tokenizer, prefix_reuse=True).prompt_logprobs(reqs)
    for req, d in zip(reqs, dists):
        probs, mass = _explicit(model, tokenizer, req)
        assert len(d.probs) == len(req.positions) == len(d.mass)
        for got, want in zip(d.probs, probs):
            assert got == pytest.approx(want, abs=REL)
            # relative too: P("10") = P("1") P("0" | "1") is tiny under a random model, and an
            # absolute tolerance alone would not see a wrong second factor
            assert got == pytest.approx(want, rel=10 * REL, abs=0)
            assert sum(got) == pytest.approx(1.0, abs=1e-6)
            assert got[10] > 0
        assert d.mass == pytest.approx(mass, abs=REL)
        # a probability's relative error is at most twice its logits' (REL of their O(1) scale,
        # tests/agreement.py): 10 * REL leaves room
        assert d.mass == pytest.approx(mass, rel=10 * REL, abs=0)
        assert max(max(p) for p in probs) > 0.3                 # far from uniform (1/11)
        # "1" hands a real share of its mass to "10" (see _sharpen_ten)
        assert max(p[10] / (p[1] + p[10]) for p in probs) > 0.1


# ---- 4. prefix reuse == naive, order restored --------------------------------------------------

def _five_requests():
    words = ["The", " sea", " 42", "\n", "7", "10", " waves", " crash", "!"]
    lengths = [3, 7, 1, 5, 9]                                 # different excerpt lengths
    return [build_request("words about the sea", words[:n][::(-1) ** i])
            for i, n in enumerate(lengths)]


@pytest.mark.parametrize("tokenizer,arch", [("smollm2", "llama"), ("smollm2", "gpt2"),
                                            ("tab", "llama"), ("tab", "gpt2"), ("smollm2", "gemma3")],
                         indirect=["tokenizer"])
def test_prefix_reuse_equals_naive_and_keeps_order(tokenizer, arch):
    model = _tiny_model(arch, tokenizer, seed=1)
    reqs = _five_requests()
    # reference: each request alone, naive
    alone = [_backend(model, tokenizer, prefix_reuse=False).prompt_logprobs([r])[0] for r in reqs]
    # shuffled so the backend's by-length batching reorders every batch: lengths 1, 3, 5, 7, 9
    order = [2, 0, 3, 1, 4]
    shuffled = [reqs[i] for i in order]
    reuse = _backend(model, tokenizer, prefix_reuse=True).prompt_logprobs(shuffled)
    naive = _backend(model, tokenizer, prefix_reuse=False).prompt_logprobs(shuffled)
    assert len(reuse) == len(naive) == 5
    diff = 0.0
    for k, i in enumerate(order):
        for got in (reuse[k], naive[k]):
            assert len(got.probs) == len(reqs[i].positions)
            for a, b in zip(got.probs, alone[i].probs):
                diff = max(diff, max(abs(x - y) for x, y in zip(a, b)))
            assert got.mass == pytest.approx(alone[i].mass, rel=REL)
        for a, b in zip(reuse[k].probs, naive[k].probs):
            diff = max(diff, max(abs(x - y) for x, y in zip(a, b)))
    assert diff <= REL
    # the excerpts do differ, so a mixed-up order could not pass the checks above
    assert alone[0].probs[0] != alone[1].probs[0]
    n_reuse = sum(d.usage.prompt_tokens for d in reuse)
    n_naive = sum(d.usage.prompt_tokens for d in naive)
    n_prompt = sum(len(tokenizer(r.prompt)["input_ids"]) for r in reqs)
    assert n_naive >= n_prompt
    assert n_reuse < n_naive
    assert n_reuse < n_prompt / 2                             # the shared prefix counted once


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_the_prefix_kept_from_the_last_call_scores_like_a_fresh_backend(smollm2_tokenizer, arch):
    """The KV cache of the previous call's prefix is reused up to where the prompts differ (the
    explanation): every call scores as a backend that computes everything afresh."""
    model = _tiny_model(arch, smollm2_tokenizer, seed=2)
    kept = _backend(model, smollm2_tokenizer)
    words = ["The", " sea", " 42", "\n", "7", "10", " waves"]
    for explanation in ("words about the sea", "words about the land", "the sea", "words about the sea"):
        reqs = [build_request(explanation, words[:n]) for n in (3, 7)]
        got = kept.prompt_logprobs(reqs)
        fresh = _backend(model, smollm2_tokenizer, prefix_reuse=False).prompt_logprobs(reqs)
        for g, f in zip(got, fresh):
            assert max(abs(x - y) for a, b in zip(g.probs, f.probs) for x, y in zip(a, b)) <= REL
            assert g.mass == pytest.approx(f.mass, rel=REL)
    assert kept._kept is not None and len(kept._kept[0]) > 10


def _neurons_requests():
    """The excerpts of three neurons (three explanations), as three simulate calls send them."""
    words = ["The", " sea", " 42", "\n", "7", "10", " waves", " crash", "!"]
    return [[build_request(explanation, words[:n][::(-1) ** i]) for i, n in enumerate((3, 9, 5))]
            for explanation in ("words about the sea", "numbers", "the end of a sentence or line")]


def _largest_difference(got, want) -> float:
    return max(abs(x - y) for g, w in zip(got, want) for a, b in zip(g.probs, w.probs) for x, y in zip(a, b))


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_the_excerpts_of_several_neurons_in_one_call_share_their_prefixes(smollm2_tokenizer, arch):
    """One call holding the excerpts of three neurons: the instructions once, each explanation
    once (a tree), the excerpts batched across neurons; every excerpt scored as alone."""
    model = _tiny_model(arch, smollm2_tokenizer, seed=3)
    neurons = _neurons_requests()
    flat = [r for reqs in neurons for r in reqs]
    alone = [_backend(model, smollm2_tokenizer, prefix_reuse=False).prompt_logprobs([r])[0] for r in flat]
    together = _backend(model, smollm2_tokenizer, batch_size=4)
    passes = []
    tree_pass = together._tree_pass
    together._tree_pass = lambda *a, **k: passes.append(len(a[0])) or tree_pass(*a, **k)
    got = together.prompt_logprobs(flat)
    assert passes == [len(flat)]   # the explanations (and excerpts' first tokens) as one tree
    assert _largest_difference(got, alone) <= REL
    for g, a in zip(got, alone):
        assert g.mass == pytest.approx(a.mass, rel=REL)
    # the tokens run, all counted: those of the same three calls neuron by neuron (whose kept
    # prefix spares the instructions), less the excerpts' first tokens the tree shares
    one_by_one = _backend(model, smollm2_tokenizer, batch_size=4)
    apart = [d for reqs in neurons for d in one_by_one.prompt_logprobs(reqs)]
    assert _largest_difference(apart, alone) <= REL
    n_together = sum(d.usage.prompt_tokens for d in got)
    n_apart = sum(d.usage.prompt_tokens for d in apart)
    assert n_apart - len(flat) <= n_together <= n_apart
    # one neuron's excerpts alone make no tree: their prefix is the explanation's end
    passes.clear()
    together.prompt_logprobs(neurons[1])
    assert passes == []


def test_neurons_in_flight_on_threads_are_scored_in_one_call(smollm2_tokenizer):
    """``concurrency`` > 1: the simulate calls of the neurons in flight wait while one runs,
    then go together (``Gather``); each thread gets its own excerpts' distributions."""
    import threading

    model = _tiny_model("llama", smollm2_tokenizer, seed=4)
    neurons = _neurons_requests()
    be = _backend(model, smollm2_tokenizer, batch_size=8)
    gather = be._scoring
    with gather._free:
        gather._busy = True   # as if a call were running: the threads' calls queue up
    got = [None] * len(neurons)

    def neuron(k):
        got[k] = be.prompt_logprobs(neurons[k])

    threads = [threading.Thread(target=neuron, args=(k,)) for k in range(len(neurons))]
    for t in threads:
        t.start()
    while len(gather._waiting) < len(neurons):
        threading.Event().wait(0.01)
    with gather._free:
        gather._busy = False
        gather._free.notify_all()
    for t in threads:
        t.join(60)
    assert gather.runs == 1
    for k, reqs in enumerate(neurons):
        fresh = _backend(model, smollm2_tokenizer, prefix_reuse=False).prompt_logprobs(reqs)
        assert _largest_difference(got[k], fresh) <= REL


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("max_tree", [2048, 5])
def test_next_tokens_of_many_prompts_at_once_equal_a_forward_each(smollm2_tokenizer, arch, max_tree):
    """A simulator's follow-ups (the prompt up to each placeholder, then "1"), a prompt that is a
    prefix of another and one with another start, as one token tree (or, with a small
    ``max_tree``, several): each next-token distribution is that of a forward pass over its
    prompt alone, also past the sliding window (gemma3's is 16 tokens)."""
    model = _tiny_model(arch, smollm2_tokenizer, seed=3)
    backend = _backend(model, smollm2_tokenizer)
    req = build_request("words about the sea", EXCERPT)
    follow_ups = [req.prompt[:c] + "1" for c in req.positions]
    prompts = [smollm2_tokenizer(t)["input_ids"] for t in [*follow_ups, req.prompt[:req.positions[2]],
                                                           "A different start 1"]]
    got = backend.next_token_logprobs(prompts, max_tree=max_tree)
    with torch.no_grad():
        for ids, g in zip(prompts, got):
            want = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), dim=-1)
            assert (g - want).abs().max() <= REL
    assert len({round(float(g.max()), 4) for g in got}) > 1   # the contexts do differ


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_grouped_sdpa_scores_as_transformers_sdpa_without_copying_keys(smollm2_tokenizer, arch, monkeypatch):
    """Models loaded by neuronlens run attention with grouped K/V handed to the CPU kernel as
    they are (``neuronlens.attention``): the masked forward after a shared prefix, a plain
    forward and greedy generation give what transformers' ``sdpa`` gives, and no K/V is copied
    per head (transformers' ``repeat_kv``), which ``sdpa`` does under every mask."""
    import transformers.integrations.sdpa_attention as sdpa

    from neuronlens.attention import NAME, use_grouped_sdpa

    model = _tiny_model(arch, smollm2_tokenizer, seed=4)
    model.set_attn_implementation("sdpa")
    copies = []
    repeat_kv = sdpa.repeat_kv
    monkeypatch.setattr(sdpa, "repeat_kv", lambda *a: copies.append(1) or repeat_kv(*a))
    reqs = _five_requests()
    ids = torch.tensor([smollm2_tokenizer(reqs[-1].prompt)["input_ids"]])

    def outputs():
        with torch.no_grad():
            dists = _backend(model, smollm2_tokenizer).prompt_logprobs(reqs)
            logits = model(input_ids=ids).logits
            greedy = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                    do_sample=False, pad_token_id=0)
        return dists, logits, greedy

    before = outputs()
    assert copies   # transformers' sdpa copies grouped K/V under the tree mask
    use_grouped_sdpa(model)
    assert model.config._attn_implementation == NAME
    copies.clear()
    after = outputs()
    assert not copies
    for a, b in zip(before[0], after[0]):
        assert max(abs(x - y) for pa, pb in zip(a.probs, b.probs) for x, y in zip(pa, pb)) <= 1e-6
        assert a.mass == pytest.approx(b.mass, abs=1e-6)
    assert (before[1] - after[1]).abs().max() <= 1e-5
    assert torch.equal(before[2], after[2])


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_generation_reads_the_kept_prefix_and_answers_as_a_fresh_backend(smollm2_tokenizer, arch):
    """An explainer's prompts share their instructions and examples: each generation computes
    only what its prompt does not share with the last one kept, counts only those tokens, and
    answers as a backend that computes every prompt whole (greedy, and ``n`` samples with
    logprobs)."""
    from neuronlens.backends.base import GenerateRequest

    model = _tiny_model(arch, smollm2_tokenizer, seed=5)
    head = "Neuron 1 fires on words about the sea and on " * 6
    prompts = [head + tail for tail in ("waves.\nNeuron 2 fires on", "ships.\nNeuron 2 fires on")]
    kept, fresh = _backend(model, smollm2_tokenizer), _backend(model, smollm2_tokenizer, prefix_reuse=False)
    previous: list[int] = []   # the ids of the last prompt run: all but its last token are kept
    for options in (dict(), dict(temperature=1.0, n=3, top_logprobs=3)):
        for prompt in (prompts[0], prompts[0], prompts[1]):   # the same prompt again, then another
            request = GenerateRequest(prompt=prompt, max_tokens=6, seed=7, **options)
            got, want = kept.generate(request), fresh.generate(request)
            assert [c.text for c in got.completions] == [c.text for c in want.completions]
            assert len(got.completions) == options.get("n", 1)
            for g, w in zip(got.completions, want.completions):
                for a, b in zip(g.logprobs or (), w.logprobs or ()):
                    assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
            ids = smollm2_tokenizer(prompt)["input_ids"]
            assert want.usage.prompt_tokens == len(ids)
            assert got.usage.completion_tokens == want.usage.completion_tokens
            same = next((i for i, (a, b) in enumerate(zip(previous[:-1], ids[:-1])) if a != b),
                        min(len(previous), len(ids)) - 1) if previous else 0
            assert got.usage.prompt_tokens == len(ids) - same
            previous = ids
    assert got.usage.prompt_tokens < len(ids) // 3   # the shared head was not computed again


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_greedy_answers_to_several_requests_are_decoded_together(smollm2_tokenizer, arch):
    """The explanations of neurons in flight (greedy requests from several threads, gathered):
    one pass over the prompts' own tokens after their shared prefix, then one pass per token for
    all of them; every answer is the one a backend gives it alone (text, tokens, stop strings,
    logprobs, ``n`` copies). A sliding-window model (gemma3) answers them one by one, as any
    model on a CPU does unless told to batch (``batch_generations``)."""
    from dataclasses import replace

    from neuronlens.backends.base import GenerateRequest

    model = _tiny_model(arch, smollm2_tokenizer, seed=7)
    head = "Neuron 1 fires on words about the sea and on " * 6
    tails = ("waves.\nNeuron 2 fires on", "ships, boats and harbours at dusk.\nNeuron 2 fires on", "fish.")
    requests = [GenerateRequest(prompt=head + tail, max_tokens=8, top_logprobs=3 if i == 1 else 0,
                                n=2 if i == 2 else 1) for i, tail in enumerate(tails)]
    fresh = _backend(model, smollm2_tokenizer, prefix_reuse=False)
    first = fresh.generate(requests[0]).completions[0]
    stop = smollm2_tokenizer.decode(first.token_ids[3:5])   # a stop string its answer meets midway
    requests[0] = replace(requests[0], stop=(stop,))
    want = [fresh.generate(r) for r in requests]
    assert want[0].completions[0].finish_reason == "stop" and len(want[0].completions[0].token_ids) < 8
    together = _backend(model, smollm2_tokenizer)
    together.batch_generations = True
    passes = []
    hook = model.get_input_embeddings().register_forward_hook(lambda _m, x, _o: passes.append(x[0].shape))
    try:
        got = together._generate_many(requests)
    finally:
        hook.remove()
    for g, w in zip(got, want):
        assert [(c.text, c.token_ids, c.finish_reason) for c in g.completions] == \
            [(c.text, c.token_ids, c.finish_reason) for c in w.completions]
        for gc, wc in zip(g.completions, w.completions):
            assert len(gc.logprobs or ()) == len(wc.logprobs or ())
            for a, b in zip(gc.logprobs or (), wc.logprobs or ()):
                assert a.token == b.token and a.logprob == pytest.approx(b.logprob, abs=1e-4)
                assert [t for t, _ in a.top] == [t for t, _ in b.top]
        assert g.usage.completion_tokens == w.usage.completion_tokens
    assert sum(g.usage.prompt_tokens for g in got) < sum(w.usage.prompt_tokens for w in want) / 2
    if arch != "gemma3":   # the shared prefix, the three prompts' own tokens, then 7 steps at most
        assert len(passes) <= 9 and all(shape[0] == 3 for shape in passes[1:])
    passes.clear()
    hook = model.get_input_embeddings().register_forward_hook(lambda _m, x, _o: passes.append(x[0].shape))
    try:   # on a CPU, by default, one request after another
        alone = _backend(model, smollm2_tokenizer)._generate_many(requests)
        assert [c.token_ids for g in alone for c in g.completions] == [c.token_ids for g in got for c in g.completions]
    finally:
        hook.remove()
    assert passes and all(shape[0] == 1 for shape in passes)


def test_models_loaded_by_neuronlens_run_grouped_sdpa(tiny_llama_dir):
    from neuronlens.attention import NAME
    from neuronlens.models import load_model

    assert load_model(str(tiny_llama_dir), "cpu")[0].config._attn_implementation == NAME


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("max_tree", [2048, 5])
def test_greedy_steps_of_many_prompts_read_the_tree_and_equal_a_forward_each(smollm2_tokenizer, arch, max_tree):
    """``greedy_tree``: after the first step's tree pass, each later step runs only the live
    prompts' new tokens (one pass, reading the tree's keys and values); every next-token
    distribution it hands out is that of a forward pass over the prompt and the tokens chosen so
    far, also past gemma3's 16-token sliding window, and for a prompt that stops early. With a
    small ``max_tree`` (several trees) each step is a tree of its own, with the same results."""
    model = _tiny_model(arch, smollm2_tokenizer, seed=6)
    backend = _backend(model, smollm2_tokenizer)
    req = build_request("words about the sea", EXCERPT)
    prompts = [smollm2_tokenizer(req.prompt[:c] + "1")["input_ids"] for c in req.positions[:6]]
    prompts.append(smollm2_tokenizer("A different start 1")["input_ids"])
    run = []   # the token positions of each forward pass
    hook = model.get_input_embeddings().register_forward_hook(lambda _m, x, _o: run.append(x[0].numel()))
    given: dict[int, list] = {i: [] for i in range(len(prompts))}

    def choose(i, logp):
        given[i].append(logp)
        if i == 1 and len(given[i]) == 2:
            return None   # this one stops after its second step
        return [15, 16, 17][len(given[i]) - 1] if i % 2 else int(logp.argmax())

    try:
        backend.greedy_tree(prompts, 3, choose, max_tree=max_tree)
    finally:
        hook.remove()
    assert [len(g) for g in given.values()] == [3, 2, 3, 3, 3, 3, 3]
    with torch.no_grad():
        for i, ids in enumerate(prompts):
            chosen = list(ids)
            for step, logp in enumerate(given[i]):
                want = torch.log_softmax(model(input_ids=torch.tensor([chosen])).logits[0, -1].float(), dim=-1)
                assert (logp - want).abs().max() <= REL, (i, step)
                chosen.append([15, 16, 17][step] if i % 2 else int(logp.argmax()))
    if max_tree == 2048:   # the tree once, then 7 and 6 new tokens (prompt 1 stopped)
        assert run[-2:] == [7, 6] and len(run) == 3


def test_single_request_prefix_reuse_is_naive(smollm2_tokenizer):
    model = _tiny_model("llama", smollm2_tokenizer)
    req = build_request("x", ["a", " 10"])
    a = _backend(model, smollm2_tokenizer, prefix_reuse=True).prompt_logprobs([req])[0]
    b = _backend(model, smollm2_tokenizer, prefix_reuse=False).prompt_logprobs([req])[0]
    assert a.probs == b.probs and a.usage == b.usage


# ---- 5. the Simulator engine ------------------------------------------------------------------

def _onehot(k: int) -> tuple[float, ...]:
    return tuple(1.0 if i == k else 0.0 for i in range(11))


class FakeBackend(Backend):
    """Returns hand-made distributions; records what it was asked."""

    def __init__(self, answers=None, error: str | None = None, prompt_logprobs: bool = True,
                 chat: bool = True):
        self.answers, self.error, self.requests = answers, error, []
        self.capabilities = Capabilities(chat=chat, prompt_logprobs=prompt_logprobs)

    def generate(self, request):
        raise NotImplementedError

    def prompt_logprobs(self, requests):
        self.requests.extend(requests)
        if self.error:
            raise self.error
        return [self.answers[i] for i in range(len(requests))]


HALF_2_HALF_10 = tuple(0.5 if i in (2, 10) else 0.0 for i in range(11))
THIRDS = tuple(1 / 3 if i in (0, 1, 5) else 0.0 for i in range(11))


def test_expected_value_by_hand():
    assert expected_value(_onehot(7)) == 7.0
    assert expected_value(HALF_2_HALF_10) == pytest.approx(6.0)        # 0.5*2 + 0.5*10
    assert expected_value(THIRDS) == pytest.approx(2.0)                # (0+1+5)/3
    assert expected_value([0.1] * 10 + [0.0]) == pytest.approx(4.5)    # 0.1 * (0+..+9)


def test_simulator_expected_values_and_requests():
    records = [ActivationRecord(["a", " b"], [0.0, 1.0]), ActivationRecord(["c"], [2.0])]
    answers = [TokenDistributions((HALF_2_HALF_10, _onehot(3)), (0.9, 0.5), Usage(100, 0)),
               TokenDistributions((THIRDS,), (0.2,), Usage(7, 0))]
    be = FakeBackend(answers)
    sim = Simulator(be)
    assert sim.strategy == "all_at_once"
    res = sim.simulate("letters", records)
    assert isinstance(res, SimulationResult)
    assert res.expected[0] == pytest.approx((6.0, 3.0))
    assert res.expected[1] == pytest.approx((2.0,))
    assert res.distributions == (answers[0].probs, answers[1].probs)
    assert res.n_failed == 0 and res.errors == ()
    assert res.usage == Usage(107, 0)
    assert be.requests == [build_request("letters", ["a", " b"]), build_request("letters", ["c"])]


def test_simulator_zero_mass_token_reads_zero_and_keeps_its_mass():
    """A top-k without any of 0-10 (a remote server's truncation) gives that token 0, as OpenAI's
    reference does; its mass of 0 is kept so that the row says so. The excerpt does not fail."""
    records = [ActivationRecord(["a"], [0.0]), ActivationRecord(["b", "c"], [0.0, 0.0]),
               ActivationRecord(["d"], [1.0])]
    zeros = (0.0,) * 11
    answers = [TokenDistributions((_onehot(4),), (0.3,)),
               TokenDistributions((_onehot(1), zeros), (0.4, 0.0)),   # no mass at token 2
               TokenDistributions((_onehot(9),), (0.8,))]
    res = Simulator(FakeBackend(answers), fewshot=False).simulate("x", records)
    assert [list(e) for e in res.expected] == [[4.0], [1.0, 0.0], [9.0]]
    assert res.mass == ((0.3,), (0.4, 0.0), (0.8,))
    assert res.n_failed == 0 and res.errors == ()


def test_simulator_wrong_length_distribution_is_a_failure():
    records = [ActivationRecord(["a", "b"], [0.0, 0.0])]
    answers = [TokenDistributions((_onehot(4),), (0.3,))]               # one row for two tokens
    res = Simulator(FakeBackend(answers)).simulate("x", records)
    assert res.expected == (None,) and res.n_failed == 1


def test_simulator_transient_error_fails_every_excerpt_of_the_call():
    records = [ActivationRecord(["a"], [0.0]), ActivationRecord(["b"], [0.0])]
    res = Simulator(FakeBackend(error=TransientError("The server said no.", kind="timeout"))).simulate(
        "x", records)
    assert res.expected == (None, None) and res.distributions == (None, None)
    assert res.n_failed == 2
    assert res.errors == ("excerpt 0: The server said no.", "excerpt 1: The server said no.")
    assert {f.kind for f in res.failures} == {"timeout"}


def test_simulator_backend_error_is_fatal():
    records = [ActivationRecord(["a"], [0.0])]
    with pytest.raises(BackendError, match="unknown model"):
        Simulator(FakeBackend(error=BackendError("unknown model"))).simulate("x", records)


def test_simulator_no_records():
    res = Simulator(FakeBackend([])).simulate("x", [])
    assert res.expected == () and res.n_failed == 0


def test_strategy_needs_prompt_logprobs():
    sim = Simulator(FakeBackend(prompt_logprobs=False), strategy="all_at_once")
    with pytest.raises(BackendError, match="prompt logprobs") as info:
        _ = sim.strategy
    assert "FakeBackend" in str(info.value) and "all_at_once" in str(info.value)
    with pytest.raises(BackendError):
        sim.check()
    # auto on a backend that can neither score prompts nor generate text: nothing to fall back on
    with pytest.raises(BackendError, match="cannot score prompts") as info:
        Simulator(FakeBackend(prompt_logprobs=False, chat=False)).check()
    assert "FakeBackend" in str(info.value)
    # auto on a chat-only backend falls back to a strategy without prompt logprobs
    assert Simulator(FakeBackend(prompt_logprobs=False)).strategy != "all_at_once"
    assert Simulator(FakeBackend(prompt_logprobs=True)).strategy == "all_at_once"


def test_unknown_strategy_raises():
    with pytest.raises(ValueError, match="one_at_a_tim"):
        Simulator(FakeBackend([]), strategy="one_at_a_tim")
    with pytest.raises(ValueError, match="auto"):
        Simulator(FakeBackend([]), strategy="bogus")


def test_simulator_on_local_backend_end_to_end(tab_tokenizer):
    model = _tiny_model("llama", tab_tokenizer, seed=2)
    be = _backend(model, tab_tokenizer)
    records = [ActivationRecord(["The", " sea"], [0.0, 3.0]), ActivationRecord(["7", "\n", "x"],
                                                                             [1.0, 0.0, 0.0])]
    res = Simulator(be).simulate("words about the sea", records)
    assert res.n_failed == 0
    direct = be.prompt_logprobs([build_request("words about the sea", r.tokens) for r in records])
    for exp, d in zip(res.expected, direct):
        assert exp == pytest.approx(tuple(sum(k * p for k, p in enumerate(row)) for row in d.probs))
        assert all(0.0 <= e <= 10.0 for e in exp)
    # usage counts the tokens run: the same prompts again run without their kept shared prefix
    requests = [build_request("words about the sea", r.tokens) for r in records]
    fresh = _backend(model, tab_tokenizer).prompt_logprobs(requests)   # nothing kept yet
    assert res.usage.prompt_tokens == sum(d.usage.prompt_tokens for d in fresh)
    ids = [tab_tokenizer(r.prompt)["input_ids"] for r in requests]
    shared = next(i for i, (a, b) in enumerate(zip(*ids)) if a != b)
    saved = res.usage.prompt_tokens - sum(d.usage.prompt_tokens for d in direct)
    assert 0 < saved <= shared
    # one excerpt alone reuses the kept prefix too, with the distributions of a fresh forward
    (alone,) = be.prompt_logprobs(requests[:1])
    assert alone.usage.prompt_tokens < len(ids[0])
    for got, want in zip(alone.probs, fresh[0].probs):
        assert got == pytest.approx(want, abs=1e-5)


def test_best_of_n_candidates_are_scored_in_one_call(smollm2_tokenizer):
    """``score_many``: the candidates' excerpts go to the backend in one call (their explanations
    a tree after the shared instructions) and score as each candidate alone."""
    model = _tiny_model("llama", smollm2_tokenizer, seed=5)
    top = [ActivationRecord(["The", " sea", " 42"], [0.0, 3.0, 1.0]),
           ActivationRecord(["7", "\n", "10", " waves"], [1.0, 0.0, 0.0, 2.0])]
    random_ = [ActivationRecord([" crash", "!"], [0.0, 0.5])]
    candidates = ["words about the sea", "numbers", "the sea"]
    be = _backend(model, smollm2_tokenizer, batch_size=4)
    calls = []
    scoring = be.prompt_logprobs
    be.prompt_logprobs = lambda reqs: calls.append(len(reqs)) or scoring(reqs)
    many = Simulator(be).score_many(candidates, top, random_)
    assert calls == [len(candidates) * 3]
    for explanation, got in zip(candidates, many):
        alone = Simulator(_backend(model, smollm2_tokenizer, prefix_reuse=False)).score(explanation, top, random_)
        for a, b in zip(got.result.expected, alone.result.expected):
            assert a == pytest.approx(b, abs=1e-4)
        assert alone.value() is not None and got.value() == pytest.approx(alone.value(), abs=1e-4)
    assert len({g.result.expected for g in many}) == len(candidates)   # the candidates differ


def test_our_calls_raise_no_deprecation_warning(tiny_llama_dir, capfd):
    """transformers renamed ``past_key_values`` to ``cache``; passing the old name warns on every
    forward. The local backend passes the name the model takes (``backends.local.cache_argument``)."""
    from neuronlens.scorers.simulation import Simulator

    backend = LocalBackend(model=str(tiny_llama_dir), device="cpu")
    backend.load()
    records = [ActivationRecord(["x", " y", "\n"], [0.0, 1.0, 0.0]), ActivationRecord(["z"], [2.0])]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        for explanation in ("letters", "numbers"):   # the second call starts from the kept prefix
            assert Simulator(backend).simulate(explanation, records).n_failed == 0
    assert "deprecated" not in capfd.readouterr().err
