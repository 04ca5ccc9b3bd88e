"""``--scheduler-cls`` subclass: plans eviction per step and frees the evicted tail blocks.

Seams in vLLM 0.32 (``vllm/v1/core/sched/scheduler.py``, ``vllm/v1/core/kv_cache_manager.py``):

* ``Scheduler.schedule`` — after vLLM schedules a step, :class:`~kvcache.engine_adapters.vllm.plan.Planner`
  adds the eviction plan to the ``SchedulerOutput`` the workers receive.
* ``KVCacheManager.allocate_slots`` reads ``request.num_computed_tokens`` (logical) to count the blocks a
  request needs; it is wrapped so that it sees the physical length while it runs.
* ``Scheduler.update_from_output`` — the barrier after the forward pass: the worker has compacted, so
  the request's block list (``SingleTypeKVCacheManager.req_to_blocks``) is trimmed to the blocks the
  kept tokens occupy and the tail goes back to ``BlockPool.free_blocks``.
* Admission (``allocate_slots`` for a waiting or preempted request): a prompt evicted chunk by chunk is
  checked at its peak physical length (budget + chunk), not its whole prompt; and with
  ``kv_admission=reserve`` (the default) a request is admitted only while the free blocks, less the
  blocks the running compressed requests will still grow into (:meth:`Planner.planned_blocks`), hold its
  own planned footprint. Without that reservation the blocks freed at a prompt compaction admit requests
  whose decode growth later overflows the pool, and vLLM preempts, which recomputes a whole prompt.
* ``Scheduler._preempt_request`` — a preempted request loses its blocks and recomputes from scratch;
  its eviction state is dropped so the recomputed prompt is evicted again.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.request import RequestStatus

from kvcache.engine_adapters.vllm import config as kvconfig
from kvcache.engine_adapters.vllm import metrics
from kvcache.engine_adapters.vllm.config import KVPluginError
from kvcache.engine_adapters.vllm.plan import Planner, StepPlan, attach, plan_of
from kvcache.plan import blocks_for

try:  # vLLM's handler and format ("vllm.*" loggers)
    from vllm.logger import init_logger

    logger = init_logger("vllm.kvcache")
except ImportError:  # pragma: no cover - vLLM is always there when these run
    logger = logging.getLogger("vllm.kvcache")


class KVCacheScheduler(Scheduler):
    """vLLM's scheduler plus token eviction with freed blocks (inert without ``kv_policy``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kv_cfg = kvconfig.parse(self.vllm_config.additional_config)
        self.kv_planner: Planner | None = None
        self._kv_preempted: set[str] = set()
        self.kv_stats = {"compactions": 0, "blocks_freed": 0, "tokens_evicted": 0, "preemptions": 0}
        if self.kv_cfg is None:
            return
        groups = self.kv_cache_config.kv_cache_groups
        if len(groups) != 1 or type(groups[0].kv_cache_spec) is not FullAttentionSpec:
            kinds = ", ".join(type(g.kv_cache_spec).__name__ for g in groups)
            raise KVPluginError(
                "kvcache --kv-policy needs one full-attention KV cache group; this model has "
                f"[{kinds}] (hybrid, sliding-window or cross-attention models are not supported yet)"
            )
        self.kv_block_size = groups[0].kv_cache_spec.block_size
        self.kv_planner = Planner(self.kv_cfg, self.kv_pool_tokens(), self.kv_block_size)
        manager = self.kv_cache_manager
        original = manager.allocate_slots

        @functools.wraps(original)
        def allocate_slots(request: Any, *a: Any, **kw: Any) -> Any:
            if request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
                if not self._kv_growth_reserved(request):
                    return None
                if kw.get("full_sequence_must_fit") and self._kv_admission_fits(request) is not None:
                    # Admission: with eviction after each prefill chunk the request never holds its whole
                    # prompt, only about budget + chunk; check that instead of the full prompt.
                    if not self._kv_admission_fits(request):
                        return None
                    kw["full_sequence_must_fit"] = False
            shift = self.kv_planner.shift(request.request_id) if self.kv_planner is not None else 0
            if not shift:
                return original(request, *a, **kw)
            request.num_computed_tokens -= shift  # the manager counts blocks from the physical length
            try:
                return original(request, *a, **kw)
            finally:
                request.num_computed_tokens += shift

        manager.allocate_slots = allocate_slots
        logger.info("kvcache: eviction enabled in vLLM: %s", self.kv_cfg.as_dict())
        if self.kv_planner.observation_note:
            logger.warning("kvcache: %s", self.kv_planner.observation_note)

    def kv_pool_tokens(self) -> int:
        """Tokens the KV pool holds (vLLM's null block excluded)."""
        return (self.kv_cache_manager.block_pool.num_gpu_blocks - 1) * self.kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size

    def _kv_admission_fits(self, request: Any) -> bool | None:
        """Whether the request's peak physical length fits the free blocks (None: use vLLM's own check)."""
        planner = self.kv_planner
        if planner is None or not planner.policy.compresses or not planner.chunk_evicts(request.num_prompt_tokens):
            return None
        capacity = planner.plan.request(request.num_prompt_tokens).capacity
        generated = max(0, request.num_tokens - request.num_prompt_tokens)
        peak = min(request.num_tokens, capacity + generated + self.max_num_scheduled_tokens)
        manager = self.kv_cache_manager.coordinator.single_type_managers[0]
        held = len(manager.req_to_blocks.get(request.request_id, ()))
        need = blocks_for(peak, self.kv_block_size) - held
        return need <= self.kv_cache_manager.block_pool.get_num_free_blocks()

    def _kv_growth_reserved(self, request: Any) -> bool:
        """``kv_admission=reserve``: whether admitting ``request`` leaves the running compressed requests the
        blocks they will grow into. Each running request r reserves ``min(planned_r, prompt_blocks_r) - held_r``
        blocks (planned: :meth:`Planner.planned_blocks`; capped at its prompt's blocks, what vLLM's own
        admission counted for it, so this is never stricter than stock vLLM), and the newcomer needs its
        own planned footprint (a request kept whole: its tokens so far, as vLLM counts it). Its prompt may
        use reserved blocks during its prefill (vLLM checks that the prompt fits the free blocks): the
        running requests grow one token per step, and the prompt is compacted at the end of that step."""
        planner = self.kv_planner
        if planner is None or self.kv_cfg.admission != "reserve" or not planner.policy.compresses:
            return True
        manager = self.kv_cache_manager.coordinator.single_type_managers[0]
        reserved = 0
        for running in self.running:
            planned = planner.planned_blocks(running.request_id, running.num_prompt_tokens, running.max_tokens)
            if planned is not None:
                held = len(manager.req_to_blocks.get(running.request_id, ()))
                reserved += max(0, min(planned, blocks_for(running.num_prompt_tokens, self.kv_block_size)) - held)
        if not reserved:
            return True
        planned = planner.planned_blocks(request.request_id, request.num_prompt_tokens, request.max_tokens)
        whole = blocks_for(request.num_tokens, self.kv_block_size)
        need = whole if planned is None else min(planned, whole)
        return need + reserved <= self.kv_cache_manager.block_pool.get_num_free_blocks()

    # ------------------------------------------------------------------------------------------
    def _kv_labels(self) -> dict[str, str]:
        policy = self.kv_cfg.policy_name if self.kv_cfg is not None else "none"
        return metrics.labels_for(self.vllm_config, policy)

    def _preempt_request(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        self.kv_stats["preemptions"] += 1  # counted with the plugin inert too (benchmarks compare with stock)
        metrics.count("preemptions", 1, self._kv_labels())
        if self.kv_planner is not None:
            self.kv_planner.forget(request.request_id)
            self._kv_preempted.add(request.request_id)
        return super()._preempt_request(request, *args, **kwargs)

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        output = super().schedule(*args, **kwargs)
        if self.kv_planner is None:
            return output
        plan = StepPlan(reset=set(self._kv_preempted))
        self._kv_preempted.clear()
        for req_id, num_scheduled in output.num_scheduled_tokens.items():
            request = self.requests[req_id]
            self.kv_planner.plan_request(
                plan,
                req_id,
                num_scheduled,
                logical_after=request.num_computed_tokens,
                num_tokens=request.num_tokens,
                prompt_len=request.num_prompt_tokens,
                max_new_tokens=request.max_tokens,
            )
        attach(output, plan)
        return output

    def update_from_output(self, scheduler_output: Any, model_runner_output: Any) -> Any:
        plan = plan_of(scheduler_output)
        if plan is not None and plan.compact:
            self._free_evicted_blocks(plan)
        result = super().update_from_output(scheduler_output, model_runner_output)
        if self.kv_planner is not None:
            for req_id in list(self.kv_planner.states):
                if req_id not in self.requests:
                    self.kv_planner.forget(req_id)
        return result

    def _free_evicted_blocks(self, plan: StepPlan) -> None:
        manager = self.kv_cache_manager.coordinator.single_type_managers[0]
        for req_id, compaction in plan.compact.items():
            blocks = manager.req_to_blocks.get(req_id)
            if not blocks:
                continue
            keep = blocks_for(compaction.target, self.kv_block_size)
            tail = blocks[keep:]
            if tail:
                del blocks[keep:]
                self.kv_cache_manager.block_pool.free_blocks(reversed(tail))
            evicted = compaction.physical - compaction.target
            self.kv_stats["compactions"] += 1
            self.kv_stats["blocks_freed"] += len(tail)
            self.kv_stats["tokens_evicted"] += evicted
            labels = self._kv_labels()
            metrics.count("compactions", 1, labels)
            metrics.count("blocks_freed", len(tail), labels)
            metrics.count("tokens_evicted", evicted, labels)
            if compaction.phase == "prefill":
                logger.info(
                    "kvcache: request %s: kept %d of %d tokens per layer and KV head, freed %d blocks",
                    req_id, compaction.target, compaction.physical, len(tail),
                )
