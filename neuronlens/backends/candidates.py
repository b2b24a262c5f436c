"""Candidate scoring at placeholder positions, for tokenizers of every shape.

A candidate ("0" .. "10") may be one token or several ("10" -> "1", "0"), and the placeholder's
token may be merged with the text before it ("\\tunknown" as one token). We tokenise each
candidate in place of the placeholder and arrange the candidates' token sequences in a trie. The
probability of a candidate is the product of its tokens' conditional probabilities; a candidate
that is a prefix of another ("1" of "10") keeps only the mass that does not continue into the
longer one: P(1) = P("1") * (1 - P("0" | "1")), P(10) = P("1") * P("0" | "1").

Every trie node with children needs the model's next-token distribution after its path; the
local backend gets those in the same forward pass as the prompt (extra query tokens that see only
their own context), remote backends from extra requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrieNode:
    path: tuple[int, ...]                       # token ids from the placeholder to here
    children: dict[int, TrieNode] = field(default_factory=dict)
    candidate: int | None = None                # index of the candidate that ends here


def build_trie(sequences: list[list[int]]) -> TrieNode:
    root = TrieNode(())
    for k, seq in enumerate(sequences):
        if not seq:
            raise ValueError(f"Candidate {k} tokenises to nothing.")
        node = root
        for t in seq:
            node = node.children.setdefault(t, TrieNode(node.path + (t,)))
        if node.candidate is not None:
            raise ValueError(f"Candidates {node.candidate} and {k} tokenise identically.")
        node.candidate = k
    return root


def inner_paths(root: TrieNode) -> list[tuple[int, ...]]:
    """Paths (excluding the root) after which a next-token distribution is needed, parents first."""
    out, stack = [], list(root.children.values())
    while stack:
        node = stack.pop(0)
        if node.children:
            out.append(node.path)
            stack.extend(node.children.values())
    return out


def candidate_probs(root: TrieNode, n_candidates: int,
                    next_probs: dict[tuple[int, ...], dict[int, float]]) -> list[float]:
    """Unnormalised candidate probabilities from the next-token probabilities after each path
    (``next_probs[()]`` is the distribution at the placeholder itself)."""
    probs = [0.0] * n_candidates

    def walk(node: TrieNode, p: float) -> None:
        dist = next_probs[node.path] if node.children else {}
        continuing = sum(dist.get(t, 0.0) for t in node.children)
        if node.candidate is not None:
            probs[node.candidate] = p * max(0.0, 1.0 - continuing) if node.children else p
        for t, child in node.children.items():
            walk(child, p * dist.get(t, 0.0))

    for t, child in root.children.items():
        walk(child, next_probs[()].get(t, 0.0))
    return probs


def candidate_tokens(tokenizer, lead: str, candidates: tuple[str, ...]) -> list[list[int]]:
    """Token ids of ``lead + candidate`` as they appear mid-text (``lead`` is the part of the
    placeholder's token that precedes the placeholder, e.g. a merged tab)."""
    out = []
    for cand in candidates:
        enc = tokenizer("\n" + lead + cand, add_special_tokens=False, return_offsets_mapping=True)
        starts = [s for s, _e in enc["offset_mapping"]]
        if 1 in starts:  # the newline stayed a token of its own: keep what follows it
            ids = enc["input_ids"][starts.index(1):]
        else:            # it merged with the lead: fall back to tokenising standalone
            ids = tokenizer(lead + cand, add_special_tokens=False)["input_ids"]
        out.append(list(ids))
    return out
