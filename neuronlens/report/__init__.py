"""Reports (`neuronlens-report`): run directories loaded and their shards joined (``runs``), one
result per (subject, explainer, judge) (``results``), paired (``pairs``), laid out in sections and
plots (``build``, ``sections``, ``plots``, ``render``); the neuron viewer (``site``) and OpenAI's
file format (``openai_format``)."""

from neuronlens.lazy import exports

__all__, __getattr__ = exports(__name__, {
    "Experiment": "runs",
    "Figure": "content",
    "Link": "content",
    "Neuron": "results",
    "Pair": "pairs",
    "Report": "content",
    "Result": "results",
    "Run": "runs",
    "Section": "content",
    "Table": "content",
})
