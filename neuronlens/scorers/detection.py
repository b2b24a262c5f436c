"""Detection: from the explanation alone, does an excerpt hold tokens the unit fires on?

Activating excerpts are the neuron's top excerpts of the split scored; non-activating ones are its
random excerpts whose largest activation is below ``threshold`` times the largest of the top
excerpts (dense GELU/SiLU neurons are rarely exactly 0). Quantile samples of the split, where
the recording has them (``recording.quantiles``), join the side of that cut their max falls on:
activating excerpts of every strength, not only the strongest. The two sets are made the same size
(a seeded draw from the larger). ``negatives=hard`` picks, instead of a random draw, the
non-activating excerpts that share the most distinct tokens with the activating tokens of the top
excerpts: text like what the unit fires on, where it does not. The prompt machinery and the scores
are ``classification``'s.
"""

from __future__ import annotations

import random
from typing import Sequence

from neuronlens.backends.base import Backend
from neuronlens.errors import UserError
from neuronlens.records import ActivationRecord
from neuronlens.scorers.classification import Item, ListClassifier, shown


class Detection(ListClassifier):
    """Detection on any backend that writes text (``conf/simulator/detection.yaml``)."""

    INSTRUCTIONS = (
        "A unit of a language model (a neuron, or a feature of a sparse autoencoder) fires on some "
        "tokens of text and stays quiet on the rest. You get a description of what one unit fires on "
        "and a few numbered excerpts of text. Some excerpts hold tokens the unit fires on strongly; "
        "the others hold none. Going by the description alone, say for each excerpt whether the unit "
        "fires strongly somewhere in it: 1 for yes, 0 for no. Answer with a JSON list holding one "
        "number per excerpt, in order.")
    EXAMPLE = ("the word \"rain\" and other words for wet weather",
               (("We stayed in all day because the rain would not stop.", 1),
                ("She paid for the concert tickets with her card.", 0),
                ("The committee will meet again on Thursday morning.", 0),
                ("Dark clouds, and then a heavy drizzle all afternoon.", 1),
                ("Bring an umbrella: showers are expected by noon.", 1),
                ("He fixed the bicycle chain in ten minutes.", 0)))
    NEGATIVES = ("random", "hard")

    def __init__(self, backend: Backend, examples_per_prompt: int = 5, threshold: float = 0.25,
                 seed: int = 0, top_logprobs: int = 20, negatives: str = "random"):
        super().__init__(backend, examples_per_prompt, threshold, seed, top_logprobs)
        if negatives not in self.NEGATIVES:
            raise UserError(f"Unknown detection negatives {negatives!r}; choose one of "
                            f"{', '.join(self.NEGATIVES)}.")
        self.negatives = negatives

    def items(self, top: Sequence[ActivationRecord], random_: Sequence[ActivationRecord],
              quantile: Sequence[ActivationRecord] = ()) -> list[Item]:
        cut = self.cut(top)
        if cut <= 0:
            return []
        records, offset = [*top, *random_, *quantile], len(top) + len(random_)
        above = lambda j: max(records[j].activations, default=0.0) >= cut   # noqa: E731
        # quantile samples are random excerpts too: on the side of the cut their max falls
        positives = [*range(len(top)), *(j for j in range(offset, len(records)) if above(j))]
        pool = [j for j in range(len(top), len(records)) if not above(j)]
        n = min(len(positives), len(pool))
        rng = random.Random(self.seed)
        positives = sorted(rng.sample(positives, n))
        if self.negatives == "hard":
            firing = {t for r in top for t, a in zip(r.tokens, r.activations) if a >= cut}
            shared = lambda j: len(firing & set(records[j].tokens))   # noqa: E731
            negatives = sorted(sorted(pool, key=lambda j: (-shared(j), j))[:n])
        else:
            negatives = sorted(rng.sample(pool, n))
        return ([Item(i, shown(records[i].tokens), 1) for i in positives]
                + [Item(j, shown(records[j].tokens), 0) for j in negatives])
