"""The `neuronlens` command's settings, typed once.

Each block of the run's config (``neurons``, ``recording``, ...) is a dataclass here, and each field
holds its type, its default, its range or choices where it has them, and a one-line doc. They are
registered in Hydra's ConfigStore as the schema of ``conf/config.yaml`` (``- run_schema`` in its
defaults list), so Hydra types them at compose time; ``--help``, the README's settings table and
:func:`check` (the ranges, before anything loads) are all read from them. A new setting is one
field here.

The config groups (``subject``, ``corpus``, ``explainer``, ``simulator``, ``judges``) keep their
YAML files: each option builds its own class (``_target_``) and that class checks its arguments.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union, get_args, get_origin, get_type_hints

from omegaconf import MISSING, DictConfig, OmegaConf

from neuronlens.errors import UserError

FREE_FORM = ("subject", "corpus", "explainer", "simulator", "judges")   # the groups: any keys


def setting(default: Any, doc: str, *, low: float | None = None,
            choices: tuple[str, ...] | None = None) -> Any:
    """A field with its doc, and its smallest value or its choices where it has them."""
    meta = {"doc": doc, "low": low, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Neurons:
    """Which neurons: layers, how many, which."""

    layers: Optional[List[int]] = setting(None, "layer indices, e.g. [3,5]; null: the middle layer", low=0)
    per_layer: int = setting(8, "neurons per layer", low=1)
    which: str = setting("random", "how they are picked", choices=("first", "random", "list"))
    indices: List[int] = setting([], "neuron indices, with which=list", low=0)
    shard: Optional[int] = setting(None, "this job's part: every n_shards-th neuron from `shard` "
                                         "(sharded sweeps)", low=0)
    n_shards: int = setting(1, "how many parts a sharded sweep splits the neurons into", low=1)


@dataclass
class Recording:
    """How excerpts are recorded over the corpus."""

    window: int = setting(64, "tokens per excerpt", low=1)
    max_windows: Optional[int] = setting(None, "stop after this many windows (null: the whole corpus)", low=1)
    top_k: int = setting(32, "top-activating excerpts kept per neuron", low=1)
    n_random: int = setting(32, "random excerpts, shared by all neurons", low=0)
    batch_size: int = setting(16, "windows per forward pass", low=1)
    cache: bool = setting(True, "reuse an identical earlier recording from the cache folder")
    quantiles: int = setting(0, "bins of random excerpts per unit by their max (random_sample_by_quantile, "
                                "OpenAI's records have 5), split at evenly spaced quantiles; 0: none "
                                "(each other value costs a second pass over the corpus)", low=0)
    per_quantile: int = setting(20, "random excerpts kept per quantile bin", low=1)


@dataclass
class Explain:
    """The LLM explainer's method (any backend)."""

    n: int = setting(1, "candidate explanations per neuron; the best on `valid` is kept", low=1)
    max_records: int = setting(6, "top train excerpts shown", low=1)
    max_tokens: int = setting(40, "longest explanation, in tokens", low=1)
    temperature: Optional[float] = setting(None, "sampling temperature; null: 0 for n=1, 1.0 for n>1", low=0)
    prompt_format: str = setting("auto", "how the prompt is sent", choices=("auto", "chat", "completion"))
    seed: int = setting("${seed}", "the explainer's sampling seed")
    show_logits: bool = setting(False, "also show the tokens each neuron's output promotes and suppresses "
                                       "(model subjects; `logits` in neurons.jsonl)")
    revisions: int = setting(0, "rounds of revision: the explainer sees its explanation simulated on the "
                                "train excerpts it was shown, where it missed most, and writes a better one; "
                                "the better of the two on `valid` is kept", low=0)


@dataclass
class Simulation:
    """The simulation scorer's method (any backend)."""

    strategy: str = setting("auto", "how excerpts are put to the simulator", choices=(
        "auto", "all_at_once", "one_at_a_time", "generated_sequence", "json"))
    fewshot: bool = setting(True, "show worked examples before the excerpts")
    prompt: str = setting("neuronlens", "openai: the reference's prompt and examples, built at run time by "
                          "the installed automated-interpretability (all_at_once only)",
                          choices=("neuronlens", "openai"))


@dataclass
class Scoring:
    """Which excerpts are shown, validated and scored."""

    splits: str = setting("auto", "hash: by each excerpt's tokens; openai: the reference's interleaved "
                          "slices; auto: openai for subject=openai_records, else hash",
                          choices=("auto", "hash", "openai"))
    split_seed: int = setting(0, "which excerpts go to train / calibration / valid / test (hash splits)")
    calibrate: bool = setting(False, "fit a linear calibration on `calibration`, report it on `test`")


@dataclass
class Remote:
    """Policy for the remote backends (openai, vllm, litellm)."""

    cache: bool = setting(True, "on-disk response cache keyed by the full request: a rerun makes 0 requests")
    cache_dir: Optional[str] = setting(None, "null: <user cache dir>/neuronlens/responses")
    max_retries: int = setting(6, "on 429 / 5xx / timeouts / bad answers, with exponential backoff", low=0)
    retry_budget: Optional[float] = setting(0.2, "retries per run at most this fraction of requests "
                                                 "(+10); then fail at once", low=0)
    concurrency: int = setting(8, "requests in flight at once, per backend; halved while the server is "
                                  "busy", low=1)


@dataclass
class JudgePower:
    """Can each judge tell a true explanation from a shuffled one? Each judge scores control neurons
    (the rules of subject/synthetic.yaml, with known explanations) with the true and a shuffled
    explanation."""

    enabled: bool = setting(True, "measure it on every run")
    window: int = setting(16, "tokens per control excerpt", low=2)
    top_k: int = setting(2, "top excerpts per control", low=1)
    n_random: int = setting(1, "random excerpts per control (8 controls x 2 explanations x 3 excerpts: "
                               "~11 s locally)", low=0)
    max_windows: int = setting(400, "windows of the built-in corpus the controls are recorded from", low=1)


@dataclass
class RunSettings:
    """Record -> explain -> simulate -> score (the `neuronlens` command)."""

    subject: Any = MISSING
    corpus: Any = MISSING
    explainer: Any = MISSING
    simulator: Any = MISSING
    judges: Optional[Dict[str, Any]] = setting({}, "judges beside the simulator (config.yaml adds similarity); "
                                                      "+simulator@judges.NAME=OPTION adds one, ~judges drops them")
    neurons: Neurons = field(default_factory=Neurons)
    recording: Recording = field(default_factory=Recording)
    explain: Explain = field(default_factory=Explain)
    simulation: Simulation = field(default_factory=Simulation)
    scoring: Scoring = field(default_factory=Scoring)
    remote: Remote = field(default_factory=Remote)
    judge_power: JudgePower = field(default_factory=JudgePower)
    concurrency: int = setting(1, "neurons in flight at once (raise it for remote backends)", low=1)
    seed: int = setting(0, "neuron sampling, explainer sampling, shuffles")
    progress: bool = setting(True, "progress bars and per-neuron log lines (false: only the results)")


SCHEMAS: dict[str, type] = {"config": RunSettings}   # primary config -> its schema; the commands add theirs


def register(config_name: str, schema_name: str, schema: type) -> None:
    """Register ``schema`` in Hydra's ConfigStore as ``schema_name``, the schema of the primary
    config ``config_name`` (whose defaults list names it)."""
    from hydra.core.config_store import ConfigStore

    SCHEMAS[config_name] = schema
    ConfigStore.instance().store(name=schema_name, node=schema)


register("config", "run_schema", RunSettings)


# ---- reading the schema ------------------------------------------------------------------------

def is_block(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp)


def leaves(schema: type, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Every setting of ``schema`` by its dotted key (blocks opened, the free-form groups left out)."""
    hints = get_type_hints(schema)
    out = {}
    for f in dataclasses.fields(schema):
        key = f"{prefix}{f.name}"
        if is_block(hints[f.name]):
            out |= leaves(hints[f.name], key + ".")
        elif f.metadata.get("doc"):
            out[key] = f
    return out


def blocks(schema: type) -> dict[str, type]:
    """The blocks of ``schema`` by name (``neurons``: Neurons, ...)."""
    hints = get_type_hints(schema)
    return {f.name: hints[f.name] for f in dataclasses.fields(schema) if is_block(hints[f.name])}


def type_of(schema: type, key: str) -> Any:
    """The annotated type of the setting at dotted ``key``."""
    *path, name = key.split(".")
    for part in path:
        schema = get_type_hints(schema)[part]
    return get_type_hints(schema)[name]


def _inner(tp: Any) -> tuple[Any, bool]:
    """(the type inside Optional, whether null is allowed)."""
    if get_origin(tp) is Union and type(None) in get_args(tp):
        return next(a for a in get_args(tp) if a is not type(None)), True
    return tp, False


def need(key: str, tp: Any, f: dataclasses.Field) -> str:
    """What ``key`` must be, in words: 'a whole number of at least 1 or null'."""
    tp, nullable = _inner(tp)
    low, choices = f.metadata.get("low"), f.metadata.get("choices")
    if choices:
        text = f"one of {', '.join(choices)}"
    elif tp is bool:
        text = "true or false"
    elif tp is int:
        text = "a whole number" + ("" if low is None else f" of at least {low:g}")
    elif tp is float:
        text = "a number" + ("" if low is None else f" of at least {low:g}")
    elif get_origin(tp) in (list, List):
        text = f"a list of whole numbers{'' if low is None else f' of {low:g} or more'}, e.g. {key}=[3,5]"
    else:
        text = "a string"
    return text + (" or null" if nullable else "")


def fits(value: Any, tp: Any, f: dataclasses.Field) -> bool:
    """Whether ``value`` has type ``tp`` and the field's range or choices."""
    tp, nullable = _inner(tp)
    if tp is Any:
        return True
    if value is None:
        return nullable
    low, choices = f.metadata.get("low"), f.metadata.get("choices")
    if get_origin(tp) in (list, List):
        return (isinstance(value, (list, tuple)) or OmegaConf.is_list(value)) and \
            all(fits(v, get_args(tp)[0], f) for v in value)
    if tp is bool:
        return isinstance(value, bool)
    if tp in (int, float):
        whole = isinstance(value, int) and not isinstance(value, bool)
        if not (whole or (tp is float and isinstance(value, float))):
            return False
        return low is None or value >= low
    if choices:
        return value in choices
    return isinstance(value, str)


def wrong(schema: type, key: str, value: Any) -> str:
    """The one line saying that ``value`` does not fit setting ``key``."""
    f = leaves(schema)[key]
    return f"{key} must be {need(key, type_of(schema, key), f)} (got {value!r})."


def check(cfg: DictConfig, schema: type = RunSettings) -> None:
    """Every setting of ``schema`` in ``cfg`` has its type and range, and no key is unknown: the
    first one that is not is a UserError naming it. Run before anything is written or loaded."""
    for key, f in leaves(schema).items():
        value = OmegaConf.select(cfg, key, default="<absent>", throw_on_missing=False)
        if key in FREE_FORM or value == "<absent>":
            continue
        if OmegaConf.is_list(value):
            value = OmegaConf.to_container(value)
        if not fits(value, type_of(schema, key), f):
            raise UserError(wrong(schema, key, value))
    unknown = [k for k in known_keys(cfg) if k not in leaves(schema) and k.split(".")[0] not in FREE_FORM
               and k.split(".")[0] != "hydra" and k not in blocks(schema)]
    if unknown:
        raise UserError(no_setting(unknown[0], list(leaves(schema))))
    for group in FREE_FORM:
        node = OmegaConf.select(cfg, group, throw_on_missing=False)
        if group == "judges":
            for name, judge in (node or {}).items():
                check_target(judge, f"judges.{name}")
        else:
            check_target(node, group)
    simulator = OmegaConf.select(cfg, "simulator", throw_on_missing=False)
    if isinstance(simulator, DictConfig) and not getattr(target_class(simulator, "simulator"), "per_token", True):
        raise UserError(f"simulator={str(simulator._target_).rpartition('.')[2].lower()} answers per excerpt, "
                        "not per token, so it cannot be the run's simulator; add it as a judge beside one "
                        "(+simulator@judges.NAME=OPTION).")
    shard, n = OmegaConf.select(cfg, "neurons.shard"), OmegaConf.select(cfg, "neurons.n_shards")
    if shard is not None and n is not None and shard >= n:
        raise UserError(f"neurons.shard must be below neurons.n_shards (got shard={shard}, n_shards={n}).")


def known_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """The dotted keys of ``cfg``'s settings (a block's inside, not the free-form groups')."""
    out = []
    for k in cfg.keys():
        key = f"{prefix}{k}"
        value = cfg._get_node(k)
        if isinstance(value, DictConfig) and key.split(".")[0] not in FREE_FORM and key != "hydra":
            out += known_keys(value, key + ".") if value.keys() or not prefix else [key]
        else:
            out.append(key)
    return out


def no_setting(key: str, names: list[str], why: str = "") -> str:
    """'no setting neurons.per_layr; did you mean neurons.per_layer?' ``names`` are the settings
    there are; a key is matched against its siblings' last parts when it has siblings, so that a
    shared prefix does not make unrelated names look alike. ``why`` goes after the key."""
    head, _, leaf = key.rpartition(".")
    siblings = {n.rpartition(".")[2]: n for n in names if n.rpartition(".")[0] == head}
    if siblings:
        near = [siblings[n] for n in difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.6)]
    else:
        near = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    return f"no setting {key}{why}" + (f"; did you mean {near[0]}?" if near else
                                       "; `--help` lists the settings, `--cfg job` the whole config.")


HYDRA_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_", "defaults")
SIMPLE = (bool, int, float)   # a str parameter takes any scalar, as Hydra's own str fields do


def target_class(node: Any, prefix: str) -> Any:
    """The class (or function) a group's ``_target_`` names; None where it names none."""
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return None
    module, _, name = str(node._target_).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise UserError(f"{prefix}._target_ is {node._target_!r}, which cannot be imported ({e}); "
                        "check its spelling.") from None


def check_target(node: Any, prefix: str) -> None:
    """A group's settings (``simulator.batch_size``) against the class its ``_target_`` names:
    that class's constructor is the group's schema (a backend is a YAML file plus a class, with
    no third list of its settings). Every key must be one of its parameters, and a value whose
    parameter is annotated bool, int or float (or Optional of one) must have that type.
    Roles nested in a role (``explainer.inner``) are checked the same way."""
    cls = target_class(node, prefix)
    if cls is None:
        return
    init = cls.__init__ if inspect.isclass(cls) else cls
    params = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    try:
        hints = get_type_hints(init)
    except Exception:   # noqa: BLE001 - annotations that need optional packages: keys only
        hints = {}
    for key in node.keys():
        if key in HYDRA_KEYS:
            continue
        if key not in params:
            names = [f"{prefix}.{p}" for p in params if p not in ("self", "inner")]
            raise UserError(no_setting(f"{prefix}.{key}", names, f" ({cls.__name__} takes no {key})"))
        value = OmegaConf.select(node, key, default="<absent>", throw_on_missing=False)
        tp, _ = _inner(hints.get(key, Any))
        if isinstance(value, DictConfig) and "_target_" in value:
            check_target(value, f"{prefix}.{key}")
        elif tp in SIMPLE and value not in ("<absent>", "???") and not fits(value, hints[key], field()):
            raise UserError(f"{prefix}.{key} must be {need(key, hints[key], field())} (got {value!r}).")
