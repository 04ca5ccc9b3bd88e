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

from kvcache.engine_adapters.vllm.config import KVPluginConfig

# Queries of the last prompt positions captured for scoring at the end of prefill, for policies whose
# own window is not an int token count (keyformer, h2o, streaming).
DEFAULT_OBSERVATION = 32


@dataclass(frozen=True)
class Compaction:
    """Compact one request at the barrier after this step's forward pass."""

    target: int  # physical length after compaction (kept slots per layer and KV head)
    physical: int  # physical length before compaction (after this step's tokens were written)
    logical: int  # logical length (tokens the request has seen) after this step
    prompt_len: int
    capacity: int  # the request's budget C
    recent: int  # recent tokens protected
    sinks: int  # first tokens protected
    phase: str  # "prefill" (last prompt chunk), "chunk" (mid-prefill) or "decode"
    step: int  # generated tokens so far (0 at the prompt)
    max_new_tokens: int | None


@dataclass
class StepPlan:
    shift: dict[str, int] = field(default_factory=dict)  # logical - physical before this step
    capture: dict[str, int] = field(default_factory=dict)  # last n queries of the step to capture
    decode_capture: set[str] = field(default_factory=set)  # captures that are decode queries
    compact: dict[str, Compaction] = field(default_factory=dict)
    reset: set[str] = field(default_factory=set)  # worker state to drop (preempted requests)


@dataclass
class RequestState:
    shift: int = 0
    compressed: bool = False  # the end-of-prefill compaction has been planned


class Planner:
    """Bookkeeping of the scheduler side: per-request shifts and the compaction rule."""

    def __init__(self, cfg: KVPluginConfig) -> None:
        self.cfg = cfg
        self.policy = cfg.create_policy()
        self.states: dict[str, RequestState] = {}
        window = self.policy.window if hasattr(self.policy, "window") else None
        self.observation = window if isinstance(window, int) and window > 0 else DEFAULT_OBSERVATION

    def shift(self, req_id: str) -> int:
        state = self.states.get(req_id)
        return state.shift if state is not None else 0

    def forget(self, req_id: str) -> None:
        self.states.pop(req_id, None)

    def _recent(self, capacity: int, target: int, extra: int) -> int:
        recent = self.policy.recent_tokens(capacity) + extra
        return max(0, min(recent, target - min(self.policy.sinks, target)))

    def plan_request(
        self,
        plan: StepPlan,
        req_id: str,
        num_scheduled: int,
        logical_after: int,
        num_tokens: int,
        prompt_len: int,
        max_new_tokens: int | None,
    ) -> None:
        """Add one scheduled request to ``plan``; ``logical_after`` counts this step's tokens."""
        state = self.states.setdefault(req_id, RequestState())
        if state.shift:
            plan.shift[req_id] = state.shift
        if not self.policy.compresses:
            return
        every_step = self.policy.every_step
        physical_after = logical_after - state.shift
        samples = logical_after >= num_tokens  # the step ends the known tokens: a token is sampled
        capacity = self.cfg.capacity(prompt_len)
        generated = max(0, logical_after - prompt_len)
        compaction = None
        if not state.compressed:
            plan.capture[req_id] = min(num_scheduled, self.observation)
            if samples:
                state.compressed = True
                target = capacity if every_step else capacity + generated
                if physical_after > target:
                    extra = 0 if every_step else generated
                    compaction = ("prefill", target, self._recent(capacity, target, extra))
            elif self.cfg.chunk_evict and physical_after > capacity:
                compaction = ("chunk", capacity, self._recent(capacity, capacity, 0))
        elif every_step:
            plan.capture[req_id] = num_scheduled
            plan.decode_capture.add(req_id)
            if physical_after >= capacity + self.cfg.recompact_every:
                compaction = ("decode", capacity, self._recent(capacity, capacity, 0))
        if compaction is not None:
            phase, target, recent = compaction
            plan.compact[req_id] = Compaction(
                target=target,
                physical=physical_after,
                logical=logical_after,
                prompt_len=prompt_len,
                capacity=capacity,
                recent=recent,
                sinks=min(self.policy.sinks, target),
                phase=phase,
                step=generated,
                max_new_tokens=max_new_tokens,
            )
            state.shift = logical_after - target


def attach(scheduler_output: Any, plan: StepPlan) -> None:
    """Attach the plan to vLLM's ``SchedulerOutput`` (a plain dataclass, pickled to the workers)."""
    scheduler_output.kvcache_plan = plan


def plan_of(scheduler_output: Any) -> StepPlan | None:
    return getattr(scheduler_output, "kvcache_plan", None)
