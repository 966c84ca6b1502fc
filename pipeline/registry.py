"""The one place that maps a stage name (the config's top-level `stage:` key) to its Stage class.

Entries are import strings so that loading a config only imports the stage that is actually used, and so that
this module sits below everything: config parsing (pipeline.config) and the Trainer (pipeline.train) use it, the
stages it names sit above them and are imported only when asked for.
Besides a registered name, `stage:` may be an import path ``package.module:ClassName`` so that tests and
plugins can train stages that are not part of this package (the class must subclass
:class:`pipeline.train.stage.Stage` and declare ``model_config_cls``).
"""
from __future__ import annotations

import importlib

from pipeline.errors import ConfigError

STAGES: dict[str, str] = {
    "autoencoder": "pipeline.stages.autoencoder:AutoencoderStage",
    "clip": "pipeline.stages.clip:ClipStage",
    "prior": "pipeline.stages.prior:PriorStage",
    "unet": "pipeline.stages.unet:UNetStage",
}


def _import_path(path: str, source: str) -> type:
    """Import ``package.module:ClassName``; ConfigError naming the path when it does not resolve."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{source}: stage {path!r} is not of the form 'package.module:ClassName'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{source}: cannot import stage module {module_name!r} ({exc})") from None
    cls = getattr(module, attr, None)
    if not isinstance(cls, type):
        raise ConfigError(f"{source}: module {module_name!r} has no class {attr!r}")
    if not hasattr(cls, "model_config_cls"):
        raise ConfigError(f"{source}: stage class {path!r} does not declare model_config_cls")
    return cls


def stage_class(name: str, source: str = "<config>") -> type:
    """The Stage class registered under `name` (or imported from ``module:Class``); ConfigError otherwise."""
    if name in STAGES:
        module_name, _, attr = STAGES[name].partition(":")
        return getattr(importlib.import_module(module_name), attr)
    if ":" in name:
        return _import_path(name, source)
    valid = ", ".join(sorted(STAGES)) or "(none registered)"
    raise ConfigError(f"{source}: unknown stage {name!r}; valid stages: {valid} "
                      "(or an import path 'package.module:ClassName')")


def model_config_class(name: str, source: str = "<config>") -> type:
    """The dataclass that parses the `model:` section of a config for stage `name`."""
    return stage_class(name, source).model_config_cls
