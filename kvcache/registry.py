"""One registry for every policy kind.

A member is a dataclass registered under ``(kind, name)``. It is created from a plain config (keyword
arguments, a dict, or a ``"name"`` / ``"name:key=value,key=value"`` string), so the same spelling works
on every surface: ``--kv-policy keyformer``, ``kv_policy=keyformer`` in lm-eval ``model_args`` and
``policy="keyformer"`` in Python. Each member validates its own values in ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

KINDS: tuple[str, ...] = ("evict", "budget", "quant", "feature")
KIND_DESCRIPTIONS: dict[str, str] = {
    "evict": "which tokens of a layer's cache to keep",
    "budget": "how many tokens each layer may keep",
    "quant": "how kept tokens are stored",
    "feature": "which DiT block computations to reuse across denoising steps",
}
# Modules whose import registers the built-in members of each kind.
_BUILTIN_MODULES: dict[str, str] = {
    "evict": "kvcache.evict",
    "budget": "kvcache.budget",
    "quant": "kvcache.quant",
    "feature": "kvcache.feature",
}

T = TypeVar("T")


class UsageError(ValueError):
    """A user's mistake (a bad name, value, file or model): the message names the problem and the fix.
    Command-line tools print it as one line and exit with code 2."""


class PolicyConfigError(UsageError):
    """A policy name or parameter is invalid; the message names the valid choices."""


@dataclass(frozen=True)
class Parameter:
    name: str
    type: str
    default: Any
    help: str


@dataclass(frozen=True)
class RegistryEntry:
    kind: str
    name: str
    cls: type
    summary: str

    def parameters(self) -> list[Parameter]:
        hints = typing.get_type_hints(self.cls)
        params = []
        for f in dataclasses.fields(self.cls):
            if not f.init or f.name.startswith("_"):
                continue
            default = f.default if f.default is not dataclasses.MISSING else None
            if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = f.default_factory()  # type: ignore[misc]
            params.append(Parameter(f.name, _type_name(hints.get(f.name, Any)), default, f.metadata.get("help", "")))
        return params

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "summary": self.summary,
            "parameters": [dataclasses.asdict(p) for p in self.parameters()],
        }


_REGISTRY: dict[str, dict[str, RegistryEntry]] = {kind: {} for kind in KINDS}
_loaded: set[str] = set()


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise PolicyConfigError(f"unknown policy kind {kind!r}; valid kinds: {', '.join(KINDS)}")


def _ensure_loaded(kind: str) -> None:
    if kind not in _loaded:
        importlib.import_module(_BUILTIN_MODULES[kind])
        _loaded.add(kind)


def register(kind: str, name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: register a dataclass as member ``name`` of ``kind``.

    The class's first docstring line becomes its summary in listings.
    """
    _check_kind(kind)

    def decorator(cls: type[T]) -> type[T]:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls.__name__} must be a dataclass to be registered")
        if name in _REGISTRY[kind] and _REGISTRY[kind][name].cls is not cls:
            raise ValueError(f"{kind} policy {name!r} is already registered by {_REGISTRY[kind][name].cls.__name__}")
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        _REGISTRY[kind][name] = RegistryEntry(kind, name, cls, summary)
        cls.registry_name = name  # type: ignore[attr-defined]
        return cls

    return decorator


def names(kind: str) -> list[str]:
    """Names registered under ``kind``."""
    _check_kind(kind)
    _ensure_loaded(kind)
    return sorted(_REGISTRY[kind])


def get_entry(kind: str, name: str) -> RegistryEntry:
    _check_kind(kind)
    _ensure_loaded(kind)
    try:
        return _REGISTRY[kind][name]
    except KeyError:
        raise PolicyConfigError(
            f"unknown {kind} policy {name!r}; valid {kind} policies: {', '.join(names(kind))}"
        ) from None


def coerce(value: Any, hint: Any, where: str) -> Any:
    """Turn strings from a CLI or lm-eval ``model_args`` into the parameter's declared type."""
    if not isinstance(value, str):
        return value
    options = typing.get_args(hint) or (hint,)
    text = value.strip()
    if text.lower() in ("none", "null") and type(None) in options:
        return None
    for option in options:
        try:
            if option is bool:
                if text.lower() in ("true", "1", "yes"):
                    return True
                if text.lower() in ("false", "0", "no"):
                    return False
            elif option is int and text.lstrip("-").isdigit():
                return int(text)
            elif option is float:
                return float(text)
            elif option is str:
                return text
        except ValueError:
            continue
    raise PolicyConfigError(f"{where}: cannot read {value!r} as {_type_name(hint)}")


def parse_spec(spec: str | dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Split ``"name"``, ``"name:key=value,key=value"`` or ``{"name": ..., **params}`` into name and params.

    ``:`` separates parameters too (``"kivi:bits=4:group_size=16"``), for places where ``,`` is taken
    (lm-eval ``model_args``)."""
    if isinstance(spec, dict):
        params = dict(spec)
        if "name" not in params:
            raise PolicyConfigError(f"policy config {spec!r} has no 'name' key")
        return str(params.pop("name")), params
    name, _, rest = spec.partition(":")
    params: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.replace(":", ",").split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise PolicyConfigError(f"policy spec {spec!r}: expected key=value, got {item!r}")
        params[key.strip()] = value
    return name.strip(), params


def create(kind: str, spec: str | dict[str, Any], **params: Any) -> Any:
    """Create member ``spec`` of ``kind`` with ``params``; unknown names or parameters raise with the valid choices."""
    name, spec_params = parse_spec(spec)
    entry = get_entry(kind, name)
    merged = {**spec_params, **params}
    valid = {p.name for p in entry.parameters()}
    unknown = sorted(set(merged) - valid)
    if unknown:
        raise PolicyConfigError(
            f"{kind} policy {name!r} has no parameter(s) {', '.join(unknown)}; "
            f"valid parameters: {', '.join(sorted(valid)) or '(none)'}"
        )
    hints = typing.get_type_hints(entry.cls)
    kwargs = {k: coerce(v, hints.get(k, Any), f"{kind} policy {name!r} parameter {k!r}") for k, v in merged.items()}
    try:
        return entry.cls(**kwargs)
    except PolicyConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise PolicyConfigError(f"{kind} policy {name!r}: {err}") from err


def list_policies(kind: str | None = None) -> list[dict[str, Any]]:
    """Every registered member (of one kind, or all) with its parameters and defaults."""
    kinds = [kind] if kind is not None else list(KINDS)
    return [get_entry(k, n).as_dict() for k in kinds for n in names(k)]


# ------------------------------------------------------------------------------ parameter checks
# The one way every member checks its values in ``__post_init__``: a failed check names the parameter, the
# valid range and the value given.
def check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    """Raise :class:`PolicyConfigError` unless ``value`` is an int with ``low <= value (<= high)``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        rng = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise PolicyConfigError(f"{name} must be an integer {rng}, got {value!r}")


def check_float(name: str, value: Any, low: float, high: float | None = None, *, above: bool = False) -> None:
    """Raise :class:`PolicyConfigError` unless ``value`` is a finite number with ``low <= value (<= high)``
    (``low < value`` with ``above``)."""
    import math

    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (above and value == low) or (high is not None and value > high):
        lower = f"> {low}" if above else f">= {low}"
        rng = lower if high is None else f"in {'(' if above else '['}{low}, {high}]"
        raise PolicyConfigError(f"{name} must be a number {rng}, got {value!r}")


def check_choice(name: str, value: Any, choices: Any) -> None:
    """Raise :class:`PolicyConfigError` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise PolicyConfigError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def param(default: Any, help: str) -> Any:
    """A dataclass field with a help text shown in listings."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})
