"""Per-step eviction plan: the scheduler decides, the worker follows.

The scheduler is the single source of truth for every request's physical cache length. At each step it
records, per scheduled request, the shift (logical length minus physical length) the worker must apply
to ``seq_lens`` and ``slot_mapping`` (RoPE positions stay logical), how many of the step's queries the
attention backend must capture, and which requests are compacted at the barrier after the forward pass
(and to what length). The plan travels to the worker as an attribute of vLLM's ``SchedulerOutput``; the
scheduler frees the tail blocks in ``update_from_output``, after the worker compacted.

Nothing here imports vLLM, so the rules are unit-testable on their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvcache.engine_adapters.vllm.config import KVPluginConfig, RecentCache, recompact_tokens
from kvcache.plan import KVPlan, RequestBudget, blocks_for

# vLLM holds the captured queries of every request that is still prefilling: at most this many of a prompt's
# last queries are kept (a policy declaring more, H2O and Keyformer, is told so once in the log). Scoring every
# prompt query would cost a second attention pass over the prompt (H2O's column sums over 966 queries x 966
# keys x 30 layers: 275 ms vs 28 ms for 32 queries, against ~1 s for the prefill itself on 2 CPU cores) and
# 67 MB of held fp32 queries per prefilling 1K-token request; on the kvlong 1K prompts of `kvcache vllm-bench`
# (budget 0.25) the last 32 queries also answered more questions than the HF adapter's every-query scores
# (results/vllm/bench.json, accuracy vs accuracy_hf). So the cap stays.
MAX_OBSERVED = 32


@dataclass(frozen=True)
class Compaction:
    """Compact one request at the barrier after this step's forward pass."""

    target: int  # physical length after compaction (kept slots per layer and KV head)
    physical: int  # physical length before compaction (after this step's tokens were written)
    logical: int  # logical length (tokens the request has seen) after this step
    recent: int  # recent tokens protected
    sinks: int  # first tokens protected
    phase: str  # "prefill" (last prompt chunk), "chunk" (mid-prefill) or "decode"
    step: int  # generated tokens so far (0 at the prompt)
    max_new_tokens: int | None
    policy: str = ""  # the request's policy name (metrics, logs)
    overrides: tuple = ()  # the request's own kv settings (config.request_overrides; empty: the server's)
    # With prefix caching: the blocks the kept tokens are written into (the request's first blocks, with the ones
    # the prefix cache or another request also holds replaced by private ones); None: the request's own first blocks
    dest_blocks: tuple[int, ...] | None = None


@dataclass
class StepPlan:
    shift: dict[str, int] = field(default_factory=dict)  # logical - physical before this step
    capture: dict[str, int] = field(default_factory=dict)  # last n queries of the step to capture
    observe: dict[str, int] = field(default_factory=dict)  # prompt queries to hold for scoring (rolling window)
    decode_capture: set[str] = field(default_factory=set)  # captures that are decode queries
    compact: dict[str, Compaction] = field(default_factory=dict)
    reset: set[str] = field(default_factory=set)  # worker state to drop (preempted requests)


# kv_chunk_evict "auto": a prompt is evicted chunk by chunk only when at full length it would hold more than
# this share of the KV pool (where holding it whole would stall the other requests, or not fit at all).
AUTO_CHUNK_EVICT_SHARE = 0.5


@dataclass(frozen=True)
class RequestRule:
    """The settings one request follows: the server's, or the server's with the request's own ``kv_policy``,
    ``kv_budget``, ``kv_window`` (``SamplingParams.extra_args``, ``vllm_xargs`` in the OpenAI API)."""

    overrides: tuple  # config.request_overrides of the request (empty: the server's settings)
    cfg: KVPluginConfig
    plan: KVPlan

    @property
    def policy(self) -> Any:
        return self.plan.policy


@dataclass
class RequestState:
    budget: RequestBudget
    chunk_evict: bool  # compact after every prefill chunk (else once, at the end of the prompt)
    rule: RequestRule
    shift: int = 0
    compressed: bool = False  # the end-of-prefill compaction has been planned


class Planner:
    """Bookkeeping of the scheduler side: per-request shifts and when to compact. What a request keeps
    comes from the plan every engine shares (:class:`kvcache.plan.KVPlan`), with the request's own settings
    where it brought some (:meth:`assign`)."""

    def __init__(self, cfg: KVPluginConfig, pool_tokens: int | None = None, block_size: int | None = None) -> None:
        self.cfg = cfg
        self.pool_tokens = pool_tokens  # the KV pool's size, for kv_chunk_evict "auto"
        self.block_size = block_size  # the KV block size, for kv_recompact_every "auto"
        self.default = RequestRule((), cfg, cfg.create_plan())
        self.plan = self.default.plan
        self.policy = self.plan.policy
        self.states: dict[str, RequestState] = {}
        self.rules: dict[str, RequestRule] = {}  # requests with settings of their own
        self._rule_cache = RecentCache()  # the rules of recent distinct settings (a live request holds its own)
        self.observation_note = self.plan.observation_note(MAX_OBSERVED)

    def rule_for(self, overrides: tuple) -> RequestRule:
        """The rule of a request carrying ``overrides`` (raises ``KVPluginError`` when they are invalid)."""
        if not overrides:
            return self.default

        def make() -> RequestRule:
            cfg = self.cfg.for_request(overrides)
            return RequestRule(overrides, cfg, cfg.create_plan())

        return self._rule_cache.get(overrides, make)

    def assign(self, req_id: str, overrides: tuple) -> RequestRule:
        """Give a request its own settings (kept across preemptions, until :meth:`release`)."""
        rule = self.rule_for(overrides)
        if overrides:
            self.rules[req_id] = rule
        return rule

    def rule(self, req_id: str) -> RequestRule:
        return self.rules.get(req_id, self.default)

    def release(self, req_id: str) -> None:
        """The request is gone: drop its state and its settings."""
        self.states.pop(req_id, None)
        self.rules.pop(req_id, None)

    def shift(self, req_id: str) -> int:
        state = self.states.get(req_id)
        return state.shift if state is not None else 0

    def chunk_evicts(self, prefill_len: int, prompt_logprobs: bool = False) -> bool:
        """Whether a prefill of ``prefill_len`` tokens (a prompt, or a preempted request's prompt and generated
        tokens, recomputed) is compacted after every chunk. Scoring a chunk sees only that chunk's last queries,
        not the question at the prompt's end, so "auto" (the default) does it only for prefills longer than half
        the pool; the others are scored once, as in the HF adapter. A request asking for ``prompt_logprobs`` is
        never chunk-evicted: later chunks would attend to the kept tokens only, and its prompt logprobs would
        differ from the full cache's (the front end refuses such a prompt when the pool cannot hold it whole)."""
        if prompt_logprobs:
            return False
        if self.cfg.chunk_evict is not None:
            return self.cfg.chunk_evict
        return self.pool_tokens is not None and prefill_len > AUTO_CHUNK_EVICT_SHARE * self.pool_tokens

    def prompt_logprobs_refusal(self, prompt_len: int) -> str | None:
        """Why a request asking for ``prompt_logprobs`` cannot be served (None: it can). Such a request is never
        chunk-evicted (:meth:`chunk_evicts`), so its prompt must fit the pool whole."""
        if self.pool_tokens is None or prompt_len <= self.pool_tokens:
            return None
        return (
            f"kvcache: prompt_logprobs (or echo with logprobs) need the whole prompt in the KV cache, but this prompt "
            f"has {prompt_len} tokens and the pool holds {self.pool_tokens}: with eviction after each prefill chunk "
            "later chunks would attend only to the kept tokens and their logprobs would be wrong. Send a prompt of at "
            f"most {self.pool_tokens} tokens, drop prompt_logprobs/echo, or start the server with a larger KV pool"
        )

    def max_new_tokens(self, prompt_len: int, rule: RequestRule | None = None) -> int | None:
        """The most tokens a request may generate so that its planned footprint, alone, fits the KV pool
        (None: any number; the pool's size unknown, or a decode-time policy that re-compacts to C + k).

        A request kept whole holds its prompt and every generated token; a one-shot policy (SnapKV) holds C
        kept prompt tokens and every generated token. Past the pool's size neither can grow, so the scheduler
        caps ``max_tokens`` here instead of letting the request preempt itself and wait forever."""
        if self.pool_tokens is None:
            return None
        rule = rule or self.default
        budget = rule.plan.request(prompt_len)
        if budget.compressed and rule.policy.every_step:
            if budget.capacity + recompact_tokens(rule.cfg, budget.capacity, self.block_size) <= self.pool_tokens:
                return None
        kept = budget.capacity if budget.compressed else prompt_len
        return max(0, self.pool_tokens - kept)

    def prefix_hit_limit(self, req_id: str, prompt_len: int, num_tokens: int, chunk_evicts: bool = False) -> int:
        """The most tokens of a request that may come from vLLM's prefix cache: a compressed request recomputes
        at least the prompt queries its policy scores with (its last ``observed_queries``), so a prefix hit
        gives the same scores, and the same kept tokens, as a run without prefix caching. A request evicted
        chunk by chunk holds the hit and its first chunk before its first compaction: at most C tokens come from
        the cache, so it never holds more than the C + chunk its admission counted."""
        rule = self.rule(req_id)
        budget = rule.plan.request(prompt_len)
        if not budget.compressed:
            return num_tokens
        limit = max(0, prompt_len - rule.plan.observed_queries(prompt_len, MAX_OBSERVED))
        return min(limit, budget.capacity) if chunk_evicts else limit

    def postpone(self, req_id: str, compaction: Compaction) -> None:
        """Undo the planning of ``compaction`` (its blocks could not be made private this step): the request
        stays as it was and is planned again at its next step."""
        state = self.states.get(req_id)
        if state is None:
            return
        state.shift = compaction.logical - compaction.physical
        if compaction.phase == "prefill":
            state.compressed = False

    def forget(self, req_id: str) -> None:
        """Drop the request's eviction state (preempted: it recomputes and is evicted again); its settings stay."""
        self.states.pop(req_id, None)

    def planned_blocks(self, req_id: str, prompt_len: int, max_new_tokens: int | None) -> int | None:
        """KV blocks a compressed request will hold at its largest after its prompt compaction, until it
        finishes (None: kept whole, vLLM's own accounting applies).

        A one-shot policy (SnapKV) keeps C tokens of the prompt and appends every generated token:
        ``blocks_for(C + max_new_tokens)``. A decode-time policy appends k tokens and re-compacts back to C:
        ``blocks_for(C + min(k, max_new_tokens))``. Never more than the uncompressed request would hold."""
        if self.block_size is None:
            return None
        state = self.states.get(req_id)
        rule = self.rule(req_id)
        budget = state.budget if state is not None else rule.plan.request(prompt_len)
        if not budget.compressed:
            return None
        new = max_new_tokens if max_new_tokens is not None else 0
        grow = min(new, recompact_tokens(rule.cfg, budget.capacity, self.block_size)) if rule.policy.every_step else new
        return blocks_for(min(budget.capacity + grow, prompt_len + new), self.block_size)

    def plan_request(
        self,
        plan: StepPlan,
        req_id: str,
        num_scheduled: int,
        logical_after: int,
        num_tokens: int,
        prompt_len: int,
        max_new_tokens: int | None,
        finishes: bool = False,
        prompt_logprobs: bool = False,
    ) -> None:
        """Add one scheduled request to ``plan``; ``logical_after`` counts this step's tokens. ``finishes``: the
        token this step samples is the request's last (``max_tokens`` or the model's length reached), so its
        cache is freed right after: nothing is captured or compacted at that step."""
        state = self.states.get(req_id)
        if state is None:
            rule = self.rule(req_id)
            state = self.states[req_id] = RequestState(
                rule.plan.request(prompt_len), self.chunk_evicts(num_tokens, prompt_logprobs), rule
            )
        if state.shift:
            plan.shift[req_id] = state.shift
        budget = state.budget
        if not budget.compressed:  # kept whole: nothing to score or evict
            return
        rule = state.rule
        request_plan = rule.plan
        every_step = rule.policy.every_step
        physical_after = logical_after - state.shift
        samples = logical_after >= num_tokens  # the step ends the known tokens: a token is sampled
        capacity = budget.capacity
        generated = max(0, logical_after - prompt_len)
        compaction = None
        finishes = finishes and samples
        if not state.compressed:
            observed = request_plan.observed_queries(prompt_len, MAX_OBSERVED)
            if observed and not finishes:
                plan.capture[req_id] = min(num_scheduled, observed)
                plan.observe[req_id] = observed
            if samples:
                state.compressed = True
                extra = 0 if every_step else generated
                target = capacity + extra
                if physical_after > target and not finishes:
                    compaction = ("prefill", target, request_plan.recent(target, extra))
            elif state.chunk_evict and physical_after > capacity:
                compaction = ("chunk", capacity, request_plan.recent(capacity))
        elif every_step and not finishes:
            if request_plan.observed_queries(prompt_len):  # decode queries score too (not for position-only policies)
                plan.capture[req_id] = num_scheduled
                plan.decode_capture.add(req_id)
            if physical_after >= capacity + recompact_tokens(rule.cfg, capacity, self.block_size):
                compaction = ("decode", capacity, request_plan.recent(capacity))
        if compaction is not None:
            phase, target, recent = compaction
            plan.compact[req_id] = Compaction(
                target=target,
                physical=physical_after,
                logical=logical_after,
                recent=recent,
                sinks=min(rule.policy.sinks, target),
                phase=phase,
                step=generated,
                max_new_tokens=max_new_tokens,
                policy=rule.cfg.policy_name,
                overrides=rule.overrides,
            )
            state.shift = logical_after - target


def attach(scheduler_output: Any, plan: StepPlan) -> None:
    """Attach the plan to vLLM's ``SchedulerOutput`` (a plain dataclass, pickled to the workers)."""
    scheduler_output.kvcache_plan = plan


def plan_of(scheduler_output: Any) -> StepPlan | None:
    return getattr(scheduler_output, "kvcache_plan", None)
