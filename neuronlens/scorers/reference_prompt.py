"""OpenAI's all-at-once simulation prompt (Bills et al. 2023), for ``simulation.prompt=openai``.

The prompt, its instructions and its few-shot examples (``FewShotExampleSet.ORIGINAL``, in the
``INSTRUCTION_FOLLOWING`` format the reference uses by default) are built at run time by the
installed ``automated-interpretability`` package (``neuron_explainer``); neuronlens holds none of
their text. The excerpt is written as the reference writes it: each token raw (newlines
included), a tab and "unknown", one per line. The simulator's distribution over "0".."10" is read
at each "unknown", as for neuronlens' own prompt. One difference remains: where the reference's
tokenizer folds a newline token into the line before, the reference gives that token 0 and no
distribution, while the prediction read here is always the model's.
"""

from __future__ import annotations

from functools import cache
from types import SimpleNamespace
from typing import Callable, Sequence

from neuronlens.backends.base import PromptLogprobRequest
from neuronlens.errors import UserError

INSTALL = ("pip install --no-deps automated-interpretability==0.0.24 blobfile==2.1.1 "
           "boostedblob==0.15.6 \"orjson>=3.10,<4\" \"lxml~=4.9\"")
START, UNKNOWN, END = "<start>\n", "unknown", "<end>\n"
UNKNOWN_FORMAT = ("The installed automated-interpretability writes excerpts in a format neuronlens "
                  "does not know; use version 0.0.24 or simulation.prompt=neuronlens.")


@cache
def _builder() -> Callable[[str, Sequence[str]], str]:
    try:
        from neuron_explainer.explanations.few_shot_examples import FewShotExampleSet
        from neuron_explainer.explanations.prompt_builder import PromptFormat
        from neuron_explainer.explanations.simulator import ExplanationNeuronSimulator
    except ImportError as e:
        raise UserError("simulation.prompt=openai builds OpenAI's prompt with the "
                        f"automated-interpretability package, which does not import ({e}); "
                        f"install it with `{INSTALL}`, or use simulation.prompt=neuronlens.") from None

    def build(explanation: str, tokens: Sequence[str]) -> str:
        # The method needs only these three attributes; the instance's API client is not used.
        state = SimpleNamespace(explanation=explanation, few_shot_example_set=FewShotExampleSet.ORIGINAL,
                                prompt_format=PromptFormat.INSTRUCTION_FOLLOWING)
        return ExplanationNeuronSimulator.make_simulation_prompt(state, list(tokens))

    return build


def check() -> None:
    """A clear error now, before any model loads, when the reference package is missing."""
    _builder()


def reference_request(explanation: str, tokens: Sequence[str],
                      candidates: tuple[str, ...]) -> PromptLogprobRequest:
    """The reference's prompt for ``tokens``, with the character offset of each "unknown"."""
    prompt = _builder()(explanation, tokens)
    at = prompt.rindex(START) + len(START)
    positions = []
    for token in tokens:
        at += len(token) + 1   # the token, then its tab
        if prompt[at:at + len(UNKNOWN)] != UNKNOWN:
            raise UserError(UNKNOWN_FORMAT)
        positions.append(at)
        at += len(UNKNOWN) + 1
    if prompt[at:] != END:
        raise UserError(UNKNOWN_FORMAT)
    return PromptLogprobRequest(prompt, tuple(positions), candidates)
