"""A neuron's activation at every token of a few texts, as one self-contained HTML page: negative
values red, positive green, the colour's strength the size of the value (the picture of the
sentiment-neuron post). Text is escaped by jinja2's autoescape, never pasted in raw.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from jinja2 import Environment

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{{ title }}</title>
<style>
body { font-family: sans-serif; max-width: 60em; margin: 2em auto; line-height: 1.9; }
.text { font-family: monospace; white-space: pre-wrap; margin: .4em 0 1.2em; }
.tok { border-radius: 3px; }
.meta { color: #555; font-size: 90%; }
</style></head><body>
<h1>{{ title }}</h1>
<p class="meta">{{ note }} Colour: red negative, green positive, full strength at
|activation| &ge; {{ "%.3g"|format(scale) }}. Hover over a token for its value.</p>
{% for item in items %}
<div class="meta">{{ item.caption }}</div>
<div class="text">{% for tok, act in item.tokens %}<span class="tok" title="{{ "%.3f"|format(act) }}"
 style="background: {{ colour(act) }}">{{ tok }}</span>{% endfor %}</div>
{% endfor %}
</body></html>
"""


def colour(act: float, scale: float) -> str:
    strength = min(abs(act) / scale, 1.0) if scale > 0 else 0.0
    rgb = "220, 40, 40" if act < 0 else "30, 170, 60"
    return f"rgba({rgb}, {strength:.3f})"


def render(title: str, note: str, traces: Sequence[tuple[list[str], list[float]]],
           captions: Sequence[str]) -> str:
    """The HTML page of per-token traces; one colour scale for all texts, so they compare. The
    scale is the 98th percentile of |activation|, so that one outlier token (a first-token spike is
    common) does not wash out the rest."""
    values = [abs(a) for _, acts in traces for a in acts]
    scale = float(np.percentile(values, 98)) if values else 0.0
    items = [{"caption": c, "tokens": list(zip(toks, acts))} for (toks, acts), c in zip(traces, captions)]
    env = Environment(autoescape=True)
    return env.from_string(PAGE).render(title=title, note=note, items=items, scale=scale,
                                        colour=lambda a: colour(a, scale))
