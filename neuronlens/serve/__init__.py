"""`neuronlens-serve`: an OpenAI-compatible HTTP server over the local backend.

The model is loaded once at start-up and requests are answered one at a time (a lock around the
model), so many jobs can share it. Endpoints: ``GET /v1/models``; ``POST /v1/completions`` with
the legacy ``logprobs``/``echo`` prompt scoring, vLLM's ``prompt_logprobs``, and prompts of
token ids with a ``logit_bias`` on greedy completions (logprobs before the bias, as vLLM's raw
logprobs: the vllm backend's ``next_token`` scoring);
``POST /v1/chat/completions`` with ``logprobs``/``top_logprobs``; ``GET /stats`` (request counts).

Tests use it as a stand-in for a ``vllm serve`` server, so by default it answers as vLLM does:
at most ``max_logprobs`` (20) logprobs per token, a 404 for a request naming another model
(``strict_model``), ``prompt_token_ids``/``token_ids`` only when the request sets
``return_token_ids``, and in the legacy ``logprobs`` object a ``text_offset`` that is a running
sum of the returned tokens' lengths, starting with a BOS token's text where the tokenizer adds
one. Echoed prompt tokens are written as OpenAI's legacy API wrote them: a token that is not
valid UTF-8 on its own (part of a multi-byte character) reads ``bytes:\\xNN...``.

A request's prompt shares the previous one's KV cache up to where they differ (``PrefixCache``),
and a list of greedy one-token prompts is answered in one forward pass over a tree of their
tokens (``LocalBackend.next_token_logprobs``), as vLLM batches them behind its prefix cache.

``faults`` makes successive POST requests misbehave in a cycle (429, 500, slow, truncated JSON,
answers one entry short) so that clients' retry and validation paths meet a real server.
``start_server`` runs the server in a background thread, for tests and scripts.

The rooms, lowest first: ``schemas`` (request bodies, error bodies, the answer's envelope),
``faults`` (fault injection), ``engine`` (the model, prompt scores, the prefix cache, greedy next
tokens), ``handlers`` (a request body to its answer), ``app`` (the FastAPI routes), ``server``
(``start_server``, ``serve``), ``command`` (the `neuronlens-serve` command, not imported here).
"""

from neuronlens.serve.app import build_app
from neuronlens.serve.engine import PrefixCache, PromptScores, ServerState, make_state, score_prompt
from neuronlens.serve.faults import FAULTS
from neuronlens.serve.handlers import complete, complete_chat
from neuronlens.serve.schemas import ApiError, ChatBody, ChatMessage, CompletionBody, TextPart
from neuronlens.serve.server import ServerHandle, start_server

__all__ = [
    "FAULTS",
    "ApiError",
    "ChatBody",
    "ChatMessage",
    "CompletionBody",
    "PrefixCache",
    "PromptScores",
    "ServerHandle",
    "ServerState",
    "TextPart",
    "build_app",
    "complete",
    "complete_chat",
    "make_state",
    "score_prompt",
    "start_server",
]
