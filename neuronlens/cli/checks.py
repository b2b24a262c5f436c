"""A bad command line read as one line: Hydra's and OmegaConf's composition errors (an unknown
option of a group, a misspelt key, a value of the wrong type) turned into a sentence naming the
setting and what it takes, or the options there are."""

from __future__ import annotations

import re
from importlib import import_module

from omegaconf import DictConfig, OmegaConf

from neuronlens.conf import CONF_DIR
from neuronlens.errors import UserError
from neuronlens.settings import SCHEMAS, FREE_FORM, leaves, no_setting, wrong

# Each primary config's schema lives beside its command; importing that module registers it.
SCHEMA_MODULES = {"config": "neuronlens.settings", "probe": "neuronlens.probe.settings",
                  "serve": "neuronlens.serve.settings", "sae": "neuronlens.sae.settings"}


def schema_of(config_name: str) -> type:
    """The settings dataclass of primary config ``config_name``, registered with Hydra."""
    import_module(SCHEMA_MODULES[config_name])
    return SCHEMAS[config_name]


def with_deletions(argv: list[str], schema: type) -> list[str]:
    """``~judges`` (no second judge) as ``judges=null``: a key the schema declares cannot be deleted,
    only emptied."""
    return [f"{a[1:]}=null" if a.startswith("~") and "=" not in a and "@" not in a and a[1:] in FREE_FORM
            and any(f == a[1:] for f in schema.__dataclass_fields__) else a for a in argv]


def group_keys(config_name: str) -> list[str]:
    """Every key any option of the free-form groups sets (``explainer.model``, ...), for spelling hints."""
    out = set()
    for group in FREE_FORM:
        for path in (CONF_DIR / ("simulator" if group == "judges" else group)).glob("*.yaml"):
            body = OmegaConf.load(path)
            if isinstance(body, DictConfig):
                out |= {f"{group}.{k}" for k in body.keys() if k != "defaults"}
    return sorted(out)


def composition_error(e: BaseException, config_name: str) -> UserError | None:
    """The UserError a composition error of ``config_name`` means, or None when it is not one."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    from neuronlens.cli.main import user_error

    if (err := user_error(e)) is not None:
        return err
    if not isinstance(e, (ConfigCompositionException, MissingConfigException, OverrideParseException)):
        return None   # a bug, not a bad command line: its traceback stands
    schema, text = SCHEMAS[config_name], str(e)
    if isinstance(e, MissingConfigException):
        if (m := re.search(r"Could not find '(.+)/([^/']+)'", text)) and e.options:
            group = m.group(1).split("/")[-1]
            return UserError(f"no {group} '{m.group(2)}'; the options are {', '.join(sorted(e.options))}")
    if isinstance(e, OverrideParseException):
        return UserError(f"cannot read the command line: {text.splitlines()[0]}")
    if m := re.search(r"Could not (?:override|append to|delete(?: from config)?) '([^']+)'", text):
        key = m.group(1).lstrip("+~")
        return UserError(no_setting(key, [*leaves(schema), *group_keys(config_name)]))
    if (m := re.match(r"Error merging override \+*([\w.]+)=(.*)", text)) and m.group(1) in leaves(schema):
        return UserError(wrong(schema, m.group(1), m.group(2)))
    return UserError(" ".join(text.split()))


def compose(config_name: str = "config", overrides: list[str] = ()) -> DictConfig:
    """The config a command line would run (for notebooks and tests): composed with Hydra's compose
    API and checked, any mistake in it a UserError of one line."""
    from hydra import compose as hydra_compose, initialize_config_dir

    from neuronlens.settings import check

    schema = schema_of(config_name)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = hydra_compose(config_name=config_name, overrides=with_deletions(list(overrides), schema))
    except Exception as e:  # noqa: BLE001 - only a bad command line is translated
        err = composition_error(e, config_name)
        if err is None:
            raise
        raise err from e
    check(cfg, schema)
    return cfg
