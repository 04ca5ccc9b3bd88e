"""The one place that knows how the installed ``transformers`` names its cache argument.

transformers 5.24 renamed ``past_key_values`` (in ``forward``/``generate`` and in model outputs) to
``cache``; the old name still works there with a FutureWarning, and 5.40/6.0 will remove it. Older 5.x
releases know only ``past_key_values``. kvcache accepts a cache under either name from its users and
passes its own under the name the running version expects, so none of our calls warns.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

NEW_NAME = "cache"
OLD_NAME = "past_key_values"


@functools.lru_cache(maxsize=None)
def _cache_arg_of(model_type: type) -> str:
    parameters = inspect.signature(model_type.forward).parameters
    return NEW_NAME if NEW_NAME in parameters else OLD_NAME


def cache_arg(model: torch.nn.Module) -> str:
    """The keyword ``model.forward`` / ``model.generate`` take the cache under (``cache`` from 5.24 on)."""
    return _cache_arg_of(type(model))


def take_cache(kwargs: dict[str, Any], model: torch.nn.Module) -> Any:
    """The cache a caller passed under either name, moved to the name ``model`` expects (in place)."""
    expected = cache_arg(model)
    other = OLD_NAME if expected == NEW_NAME else NEW_NAME
    if kwargs.get(other) is not None:
        if kwargs.get(expected) is not None:
            raise TypeError(f"pass the cache once: both {expected!r} and {other!r} were given")
        kwargs[expected] = kwargs.pop(other)
    else:
        kwargs.pop(other, None)
    return kwargs.get(expected)


def with_cache(model: torch.nn.Module, cache: Any, **kwargs: Any) -> dict[str, Any]:
    """``kwargs`` plus ``cache`` under the name ``model`` expects: ``model(**with_cache(model, cache, ...))``."""
    kwargs[cache_arg(model)] = cache
    return kwargs


def output_cache(output: Any) -> Any:
    """The cache a model output or ``generate`` result carries, whichever name the version uses."""
    for name in (NEW_NAME, OLD_NAME):
        if isinstance(output, dict) and output.get(name) is not None:
            return output[name]
    return None
