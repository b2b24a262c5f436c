"""Checks of a composed config, run before anything loads: a wrong type or range is one clear line
naming the setting, not a traceback after the model has loaded."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from neuronlens.errors import UserError

# setting -> (smallest allowed value, whether null is allowed); integers unless said otherwise
INTEGERS = {
    "seed": (None, False),
    "concurrency": (1, False),
    "neurons.per_layer": (1, False),
    "neurons.n_shards": (1, False),
    "neurons.shard": (0, True),
    "recording.window": (1, False),
    "recording.max_windows": (1, True),
    "recording.top_k": (1, False),
    "recording.n_random": (0, False),
    "recording.batch_size": (1, False),
    "explain.n": (1, False),
    "explain.max_records": (1, False),
    "explain.max_tokens": (1, False),
    "explain.seed": (None, False),
    "scoring.split_seed": (None, False),
    "remote.max_retries": (0, False),
    "remote.concurrency": (1, False),
    "judge_power.window": (2, False),
    "judge_power.top_k": (1, False),
    "judge_power.n_random": (0, False),
    "judge_power.max_windows": (1, False),
}
NUMBERS = {"remote.retry_budget": 0.0, "explain.temperature": 0.0}   # floats, null allowed
BOOLEANS = ("recording.cache", "scoring.calibrate", "remote.cache", "progress", "simulation.fewshot",
            "judge_power.enabled")
CHOICES = {"neurons.which": ("first", "random", "list"), "scoring.splits": ("auto", "hash", "openai"),
           "simulation.prompt": ("neuronlens", "openai")}


def check_config(cfg: DictConfig) -> None:
    """Every setting above has the right type and range; ``neurons.layers`` and
    ``neurons.indices`` are lists of integers (or null)."""
    def get(key: str) -> Any:
        return OmegaConf.select(cfg, key, default=None, throw_on_missing=False)

    def present(key: str) -> bool:
        return OmegaConf.select(cfg, key, default="<absent>", throw_on_missing=False) != "<absent>"

    for key, (low, nullable) in INTEGERS.items():
        if not present(key):
            continue
        value = get(key)
        if value is None and nullable:
            continue
        if not is_int(value) or (low is not None and value < low):
            need = "a whole number" + ("" if low is None else f" of at least {low}")
            raise UserError(f"{key} must be {need}{' or null' if nullable else ''} (got {value!r}).")
    for key, low in NUMBERS.items():
        value = get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or value < low):
            raise UserError(f"{key} must be a number of at least {low:g} or null (got {value!r}).")
    for key in BOOLEANS:
        if present(key) and not isinstance(get(key), bool):
            raise UserError(f"{key} must be true or false (got {get(key)!r}).")
    for key, options in CHOICES.items():
        if present(key) and get(key) not in options:
            raise UserError(f"{key} must be one of {', '.join(options)} (got {get(key)!r}).")
    for key in ("neurons.layers", "neurons.indices"):
        value = get(key)
        if value is None:
            continue
        items = list(value) if OmegaConf.is_list(value) else None
        if items is None or not all(is_int(v) and v >= 0 for v in items):
            raise UserError(f"{key} must be a list of whole numbers of 0 or more, e.g. {key}=[3,5] "
                            f"(got {value!r}).")
    if present("neurons.shard") and get("neurons.shard") is not None and \
            get("neurons.shard") >= get("neurons.n_shards"):
        raise UserError(f"neurons.shard must be below neurons.n_shards (got shard="
                        f"{get('neurons.shard')}, n_shards={get('neurons.n_shards')}).")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
