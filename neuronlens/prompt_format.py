"""What explainer and simulator prompts share: the sentence an explanation completes, the 0-10
activation scale, and how a token is written on a ``token<TAB>activation`` line."""

from __future__ import annotations

import math
from typing import Sequence

PHRASE = "the main thing this neuron does is find"   # every explanation completes this sentence


def normalize_activations(activations: Sequence[float], max_activation: float) -> list[int]:
    """OpenAI's prompt scale: floor(10 * relu(a) / max_activation), clipped to 0..10."""
    if not max_activation > 0:
        return [0] * len(activations)
    # Divide before multiplying by 10: 10 * a / a can round to 9.999…, so a == max would give 9.
    return [min(10, max(0, math.floor(10 * (max(float(a), 0.0) / max_activation))))
            for a in activations]


def format_token(token: str, newlines: bool = False) -> str:
    """A token made safe for a `token<TAB>activation` line: tabs (which would split the line) as
    escapes, and newlines and carriage returns too unless ``newlines`` keeps them raw."""
    escapes = (("\t", "\\t"),) if newlines else (("\n", "\\n"), ("\r", "\\r"), ("\t", "\\t"))
    for raw, shown in escapes:
        token = token.replace(raw, shown)
    return token
