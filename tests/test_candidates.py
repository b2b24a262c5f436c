"""The candidate trie: pure logic on hand-made token sequences, probabilities worked out by hand.

Token ids in these tests: digit d is id d (so "0".."9" are ids 0..9), "10" is [1, 0], and id 20
plays a merged lead such as a tab ("\\t0" = [20, 0], "\\t10" = [20, 1, 0]).
"""

from __future__ import annotations

import pytest

from neuronlens.backends.candidates import build_trie, candidate_probs, inner_paths

DIGITS_AND_TEN = [[d] for d in range(10)] + [[1, 0]]        # "0".."9" single ids, "10" = 1, 0
TAB = 20
TAB_LEAD = [[TAB, d] for d in range(10)] + [[TAB, 1, 0]]   # "\t0".."\t10"


def _node(root, path):
    node = root
    for t in path:
        node = node.children[t]
    return node


# ---- build_trie -------------------------------------------------------------------------------

def test_trie_shape_for_two_token_ten():
    root = build_trie(DIGITS_AND_TEN)
    assert root.path == () and root.candidate is None
    assert sorted(root.children) == list(range(10))
    for d in range(10):
        assert root.children[d].candidate == d
        assert root.children[d].path == (d,)
    one = root.children[1]
    assert list(one.children) == [0]                     # only "1" continues, into "10"
    assert one.children[0].candidate == 10
    assert one.children[0].path == (1, 0)
    assert not one.children[0].children
    assert all(not root.children[d].children for d in range(10) if d != 1)


def test_trie_with_shared_lead_token():
    root = build_trie(TAB_LEAD)
    assert list(root.children) == [TAB]
    tab = root.children[TAB]
    assert tab.candidate is None                         # "\t" alone is no candidate
    assert sorted(tab.children) == list(range(10))
    assert _node(root, (TAB, 1, 0)).candidate == 10
    assert _node(root, (TAB, 7)).candidate == 7


def test_duplicate_tokenisation_raises():
    with pytest.raises(ValueError, match="identically"):
        build_trie([[3], [4], [3]])
    with pytest.raises(ValueError, match="identically"):
        build_trie([[1, 0], [1, 0]])


def test_empty_tokenisation_raises():
    with pytest.raises(ValueError, match="nothing"):
        build_trie([[0], [], [2]])


# ---- inner_paths ------------------------------------------------------------------------------

def test_inner_paths_single_token_candidates_need_none():
    assert inner_paths(build_trie([[d] for d in range(11)])) == []


def test_inner_paths_two_token_ten():
    assert inner_paths(build_trie(DIGITS_AND_TEN)) == [(1,)]


def test_inner_paths_parents_first():
    paths = inner_paths(build_trie(TAB_LEAD))
    assert paths == [(TAB,), (TAB, 1)]
    # a deeper, branchier trie: every parent path comes before any of its extensions
    paths = inner_paths(build_trie([[5, 6, 7], [5, 8], [5, 6, 9, 1], [2]]))
    assert set(paths) == {(5,), (5, 6), (5, 6, 9)}
    for p in paths:
        for q in paths:
            if len(q) > len(p) and q[:len(p)] == p:
                assert paths.index(p) < paths.index(q)


# ---- candidate_probs --------------------------------------------------------------------------

def test_candidate_probs_single_token_reads_distribution():
    root = build_trie([[d] for d in range(11)])
    dist = {d: 0.01 * (d + 1) for d in range(11)}
    dist[99] = 0.34                                          # a non-candidate token: ignored
    assert candidate_probs(root, 11, {(): dist}) == pytest.approx([0.01 * (d + 1) for d in range(11)])


def test_candidate_probs_two_token_ten_by_hand():
    root = build_trie(DIGITS_AND_TEN)
    p0 = {0: 0.05, 1: 0.30, 2: 0.10, 3: 0.05, 4: 0.05, 5: 0.05, 6: 0.05, 7: 0.05, 8: 0.05, 9: 0.05,
          42: 0.20}
    after_one = {0: 0.25, 5: 0.5, 42: 0.25}                  # P("0" | "1") = 0.25
    probs = candidate_probs(root, 11, {(): p0, (1,): after_one})
    # P(1) = P("1") * (1 - P("0"|"1")) = 0.30 * 0.75 = 0.225 ; P(10) = 0.30 * 0.25 = 0.075
    expected = [0.05, 0.225, 0.10, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.075]
    assert probs == pytest.approx(expected, abs=1e-12)
    assert sum(probs) == pytest.approx(0.80)                # mass: all but the 0.20 on token 42


def test_candidate_probs_missing_tokens_count_as_zero():
    root = build_trie(DIGITS_AND_TEN)
    probs = candidate_probs(root, 11, {(): {1: 0.5, 9: 0.1}, (1,): {}})
    # P("0"|"1") absent -> 0, so "1" keeps all its mass and "10" gets none
    assert probs == pytest.approx([0, 0.5, 0, 0, 0, 0, 0, 0, 0, 0.1, 0])


def test_candidate_probs_shared_lead_by_hand():
    root = build_trie(TAB_LEAD)
    at_placeholder = {TAB: 0.8, 7: 0.2}                      # P("\t") = 0.8
    after_tab = {d: 0.1 for d in range(10)}                  # P(d | "\t") = 0.1 each
    after_tab_one = {0: 0.4}                                 # P("0" | "\t1") = 0.4
    probs = candidate_probs(root, 11, {(): at_placeholder, (TAB,): after_tab,
                                       (TAB, 1): after_tab_one})
    # d != 1: 0.8 * 0.1 = 0.08 ; "1": 0.8 * 0.1 * 0.6 = 0.048 ; "10": 0.8 * 0.1 * 0.4 = 0.032
    expected = [0.08] * 10 + [0.032]
    expected[1] = 0.048
    assert probs == pytest.approx(expected, abs=1e-12)
    assert sum(probs) == pytest.approx(0.8 * 1.0)


def test_candidate_probs_respect_candidate_order():
    # candidates listed in an order unrelated to token ids: results follow the candidate index
    root = build_trie([[7], [3], [3, 4]])
    probs = candidate_probs(root, 3, {(): {7: 0.1, 3: 0.6}, (3,): {4: 0.5}})
    assert probs == pytest.approx([0.1, 0.3, 0.3])
