"""Fuzzing: from the explanation alone, are the marked tokens of an excerpt the ones it speaks of?

Each top excerpt of the split scored is shown twice: once with its activating tokens marked
(activation at least ``threshold`` times the largest of the top excerpts), once with as many
tokens marked at random among the others (a seeded draw). So half the items are marked right and
half misplaced, and each excerpt is its own control. Quantile samples of the split
(``recording.quantiles``) are shown the same way, so that weaker activations are marked too (one
below the cut has nothing to mark). An excerpt with no activating token, or no other token to
misplace the marks on, is left out. The prompt machinery and the scores are
``classification``'s.
"""

from __future__ import annotations

import random
from typing import Sequence

from neuronlens.records import ActivationRecord
from neuronlens.scorers.classification import Item, ListClassifier, shown


class Fuzzing(ListClassifier):
    """Fuzzing on any backend that writes text (``conf/simulator/fuzzing.yaml``)."""

    INSTRUCTIONS = (
        "A unit of a language model (a neuron, or a feature of a sparse autoencoder) fires on some "
        "tokens of text and stays quiet on the rest. You get a description of what one unit fires on "
        "and a few numbered excerpts of text in which some tokens are marked <<like this>>. In some "
        "excerpts the marks sit on the tokens the unit fires on; in the others they were put on "
        "tokens picked at random. Going by the description alone, say for each excerpt whether its "
        "marks sit on what the description speaks of: 1 for yes, 0 for no. Answer with a JSON list "
        "holding one number per excerpt, in order.")
    EXAMPLE = ("the word \"rain\" and other words for wet weather",
               (("We stayed in all day because the <<rain>> would not stop.", 1),
                ("Dark clouds, and <<then>> a heavy drizzle all afternoon.", 0),
                ("We stayed <<in>> all day because the rain would not stop.", 0),
                ("Bring an umbrella: <<showers>> are expected by noon.", 1),
                ("Dark clouds, and then a heavy <<drizzle>> all afternoon.", 1),
                ("The <<garden>> was soaked after the storm.", 0)))

    def items(self, top: Sequence[ActivationRecord], random_: Sequence[ActivationRecord],
              quantile: Sequence[ActivationRecord] = ()) -> list[Item]:
        cut, rng, out = self.cut(top), random.Random(self.seed), []
        if cut <= 0:
            return out
        offset = len(top) + len(random_)   # quantile samples follow top and random
        for i, r in [*enumerate(top), *enumerate(quantile, offset)]:
            firing = [t for t, a in enumerate(r.activations) if a >= cut]
            rest = [t for t, a in enumerate(r.activations) if a < cut]
            if firing and rest:
                wrong = sorted(rng.sample(rest, min(len(firing), len(rest))))
                out += [Item(i, shown(r.tokens, firing), 1), Item(i, shown(r.tokens, wrong), 0)]
        return out
