"""The one place that maps a stage name (the config's top-level `stage:` key) to its Stage class.

Entries are import strings so that loading a config only imports the stage that is actually used.
"""
from __future__ import annotations

import importlib

from pipeline.errors import ConfigError

STAGES: dict[str, str] = {}


def stage_class(name: str, source: str = "<config>") -> type:
    """The Stage class registered under `name`; ConfigError listing valid names otherwise."""
    if name not in STAGES:
        valid = ", ".join(sorted(STAGES)) or "(none registered)"
        raise ConfigError(f"{source}: unknown stage {name!r}; valid stages: {valid}")
    module_name, _, attr = STAGES[name].partition(":")
    return getattr(importlib.import_module(module_name), attr)


def model_config_class(name: str, source: str = "<config>") -> type:
    """The dataclass that parses the `model:` section of a config for stage `name`."""
    return stage_class(name, source).model_config_cls
