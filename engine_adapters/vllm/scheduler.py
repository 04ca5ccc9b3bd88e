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
* Growth (``Scheduler.add_request``): vLLM's start-up check (the pool holds one request of ``max_model_len``)
  is loosened to "kept prompt + one chunk" (:mod:`~kvcache.engine_adapters.vllm.plugin`), so a request that
  keeps every generated token (kept whole, or a one-shot policy such as SnapKV) could outgrow the pool. Its
  ``max_tokens`` is capped at what the pool holds beside its kept prompt (:meth:`Planner.max_new_tokens`); it
  ends with finish reason ``length``. As a last guard, a request that cannot grow even after every other one
  was preempted (nothing left to free) ends with ``length`` instead of preempting itself, and a waiting request
  whose recomputation could never fit the empty pool is ended the same way: no request waits forever.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
from typing import Any

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs
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


# ``SingleTypeKVCacheManager.num_cached_block`` of a compacted request: vLLM hashes (offers to the prefix cache)
# only the blocks past this count, so none of its blocks is hashed again.
NEVER_CACHED = sys.maxsize


def private_destinations(blocks: list[Any], keep: int, pool: Any) -> list[Any] | None:
    """Make ``blocks[:keep]`` writable by their request alone (``BlockPool.is_block_writable``: held once and not
    in the prefix cache), replacing in place in ``blocks`` each one that is not. Returns the blocks replaced,
    whose reference the caller releases after the compaction, or None (nothing changed) when it cannot be done.

    A replacement comes from the free pool (the shared block stays cached, so later requests with the same prefix
    still hit it); with the pool empty, a block the request alone holds is taken out of the prefix cache and
    written: its own destination, or one of its tail blocks (past ``keep``, evicted anyway) swapped in for a
    block another request also holds."""
    needs = [i for i in range(keep) if not pool.is_block_writable(blocks[i])]
    if not needs:
        return []
    shared = [i for i in needs if blocks[i].ref_cnt > 1]
    spare_tail = [j for j in range(keep, len(blocks)) if blocks[j].ref_cnt == 1]
    free = pool.get_num_free_blocks()
    if len(shared) > free + len(spare_tail):
        return None
    fresh = pool.get_new_blocks(min(free, len(needs)))
    replaced = []
    for i in shared + [i for i in needs if blocks[i].ref_cnt == 1]:  # shared ones first take the fresh blocks
        if fresh:
            replaced.append(blocks[i])
            blocks[i] = fresh.pop(0)
        elif blocks[i].ref_cnt == 1:
            pool.evict_blocks({blocks[i].block_id})  # the request alone holds it: out of the prefix cache
        else:
            j = spare_tail.pop()
            pool.evict_blocks({blocks[j].block_id})
            blocks[i], blocks[j] = blocks[j], blocks[i]  # the shared block goes to the tail, freed after
    return replaced


class KVCacheScheduler(Scheduler):
    """vLLM's scheduler plus token eviction with freed blocks (inert without ``kv_policy``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kv_cfg = kvconfig.parse(self.vllm_config.additional_config)
        self.kv_planner: Planner | None = None
        self._kv_preempted: set[str] = set()
        self._kv_scheduling = False  # inside schedule(): a preemption there is the pool running out
        # requests the plugin ends itself, with vLLM's status and the reason logged: those that can never get
        # the blocks they need ("length"), and those whose own kv settings are invalid (error)
        self._kv_ending: dict[str, tuple[RequestStatus, str]] = {}
        self._kv_ended: list[tuple[Any, str]] = []
        self._kv_replaced: dict[str, list[Any]] = {}  # prefix caching: shared blocks a compaction copies out of
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
        if manager.enable_caching:
            lookup = manager.get_computed_blocks

            @functools.wraps(lookup)
            def get_computed_blocks(request: Any) -> Any:
                blocks, hit, *rest = lookup(request)
                if self.kv_planner is None:  # inert (settings swapped off in-process): vLLM's own rule
                    return (blocks, hit, *rest)
                limit = self.kv_planner.prefix_hit_limit(
                    request.request_id, request.num_prompt_tokens, request.num_tokens, self._kv_chunk_evicts(request)
                )
                if hit > limit:
                    hit = limit // self.kv_block_size * self.kv_block_size
                    blocks = manager.truncate_computed_blocks(blocks, hit)
                return (blocks, hit, *rest)

            manager.get_computed_blocks = get_computed_blocks
        logger.info("kvcache: eviction enabled in vLLM: %s", self.kv_cfg.as_dict())
        if self.kv_planner.observation_note:
            logger.warning("kvcache: %s", self.kv_planner.observation_note)

    def kv_pool_tokens(self) -> int:
        """Tokens the KV pool holds (vLLM's null block excluded)."""
        return (self.kv_cache_manager.block_pool.num_gpu_blocks - 1) * self.kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size

    @staticmethod
    def _kv_wants_prompt_logprobs(request: Any) -> bool:
        return request.sampling_params is not None and request.sampling_params.prompt_logprobs is not None

    def _kv_chunk_evicts(self, request: Any) -> bool:
        """Whether the request's prefill (its prompt, or after a preemption its prompt and generated tokens)
        is compacted chunk by chunk."""
        return self.kv_planner.chunk_evicts(request.num_tokens, self._kv_wants_prompt_logprobs(request))

    def _kv_admission_blocks(self, request: Any) -> int | None:
        """Blocks the request's prefill holds at its peak (None: the plugin does not change vLLM's count, the
        whole sequence). Evicted after every chunk it holds the kept prompt plus one chunk: C + chunk."""
        planner = self.kv_planner
        if planner is None:
            return None
        rule = planner.rule(request.request_id)
        if not rule.policy.compresses or not self._kv_chunk_evicts(request):
            return None
        capacity = rule.plan.request(request.num_prompt_tokens).capacity
        return blocks_for(min(request.num_tokens, capacity + self.max_num_scheduled_tokens), self.kv_block_size)

    def _kv_admission_fits(self, request: Any) -> bool | None:
        """Whether the request's peak physical length fits the free blocks (None: use vLLM's own check)."""
        peak = self._kv_admission_blocks(request)
        if peak is None:
            return None
        manager = self.kv_cache_manager.coordinator.single_type_managers[0]
        held = len(manager.req_to_blocks.get(request.request_id, ()))
        return peak - held <= self.kv_cache_manager.block_pool.get_num_free_blocks()

    def _kv_growth_reserved(self, request: Any) -> bool:
        """``kv_admission=reserve``: whether admitting ``request`` leaves the running compressed requests the
        blocks they will grow into. Each running request r reserves ``min(planned_r, prompt_blocks_r) - held_r``
        blocks (planned: :meth:`Planner.planned_blocks`; capped at its prompt's blocks, what vLLM's own
        admission counted for it, so this is never stricter than stock vLLM), and the newcomer needs its
        own planned footprint (a request kept whole: its tokens so far, as vLLM counts it). Its prompt may
        use reserved blocks during its prefill (vLLM checks that the prompt fits the free blocks): the
        running requests grow one token per step, and the prompt is compacted at the end of that step."""
        planner = self.kv_planner
        if planner is None or self.kv_cfg.admission != "reserve":
            return True
        manager = self.kv_cache_manager.coordinator.single_type_managers[0]
        reserved = 0
        for running in self.running:
            planned = planner.planned_blocks(running.request_id, running.num_prompt_tokens, running.max_tokens)
            if planned is not None:
                # blocks it alone holds: a prefix-cache block shared with others is not its own (its compaction
                # copies the kept tokens into private blocks and leaves the shared one to the others)
                held = sum(block.ref_cnt == 1 for block in manager.req_to_blocks.get(running.request_id, ()))
                reserved += max(0, min(planned, blocks_for(running.num_prompt_tokens, self.kv_block_size)) - held)
        if not reserved:
            return True
        planned = planner.planned_blocks(request.request_id, request.num_prompt_tokens, request.max_tokens)
        whole = blocks_for(request.num_tokens, self.kv_block_size)
        need = whole if planned is None else min(planned, whole)
        return need + reserved <= self.kv_cache_manager.block_pool.get_num_free_blocks()

    # ------------------------------------------------------------------------------------------
    def _kv_labels(self, req_id: str | None = None) -> dict[str, str]:
        """Metric labels: the model and the policy (the request's own, where it chose one)."""
        if self.kv_planner is not None:
            policy = self.kv_planner.rule(req_id).cfg.policy_name if req_id else self.kv_cfg.policy_name
        else:
            policy = self.kv_cfg.policy_name if self.kv_cfg is not None else "none"
        return metrics.labels_for(self.vllm_config, policy)

    def add_request(self, request: Any) -> None:
        new = self.kv_planner is not None and request.request_id not in self.requests
        if new:
            try:  # the front end checked these (400); a request reaching the engine otherwise must not kill it
                self.kv_planner.assign(request.request_id, kvconfig.request_overrides(request.sampling_params.extra_args
                                                                                      if request.sampling_params else None))
            except KVPluginError as err:
                self._kv_ending[request.request_id] = (RequestStatus.FINISHED_ERROR, str(err))
            else:
                self._kv_cap_max_tokens(request)
        super().add_request(request)

    def _kv_cap_max_tokens(self, request: Any) -> None:
        """Cap ``max_tokens`` at what the pool holds beside the request's kept prompt (:meth:`Planner.max_new_tokens`)."""
        rule = self.kv_planner.rule(request.request_id)
        limit = self.kv_planner.max_new_tokens(request.num_prompt_tokens, rule)
        if limit is None or request.max_tokens <= limit:
            return
        logger.warning(
            "kvcache: request %s: max_tokens %d capped to %d (finish reason 'length'): the KV pool holds %d tokens and "
            "%s keeps %s; use a decode-time policy (streaming, h2o, keyformer, tova), or a larger pool",
            request.request_id, request.max_tokens, max(1, limit), self.kv_pool_tokens(), rule.cfg.policy_name,
            "every token of this request" if not rule.plan.request(request.num_prompt_tokens).compressed
            else "the kept prompt and every generated token",
        )
        request.max_tokens = max(1, limit)

    def _preempt_request(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        self.kv_stats["preemptions"] += 1  # counted with the plugin inert too (benchmarks compare with stock)
        metrics.count("preemptions", 1, self._kv_labels(request.request_id))
        if self.kv_planner is not None:
            self.kv_planner.forget(request.request_id)
            self._kv_preempted.add(request.request_id)
        result = super()._preempt_request(request, *args, **kwargs)
        if self.kv_planner is not None and self._kv_scheduling and not self.running:
            # Every other request was preempted and this one still cannot grow: nothing is left to free, and
            # its recomputation would need at least the blocks it just held. It ends with "length".
            self._kv_ending[request.request_id] = (RequestStatus.FINISHED_LENGTH_CAPPED, "it cannot grow even alone")
        return result

    def _kv_find_unplaceable(self) -> None:
        """Waiting (preempted) requests whose recomputation needs more blocks than the whole pool: they would
        wait forever, so they end with "length" (a safety net; admission and the max_tokens cap avoid them)."""
        pool_blocks = self.kv_cache_manager.block_pool.num_gpu_blocks - 1
        for request in self.waiting:
            if request.status != RequestStatus.PREEMPTED:
                continue
            need = self._kv_admission_blocks(request)
            if need is None:
                need = blocks_for(request.num_tokens, self.kv_block_size)
            if need > pool_blocks:
                self._kv_ending[request.request_id] = (
                    RequestStatus.FINISHED_LENGTH_CAPPED, "its recomputation cannot fit even the empty pool",
                )

    def _kv_end_requests(self) -> None:
        """Finish the requests in ``_kv_ending`` (out of vLLM's queues, blocks freed); their outputs go out with
        the step's (:meth:`update_from_output`)."""
        for status in {status for status, _ in self._kv_ending.values()}:
            ids = [req_id for req_id, (s, _) in self._kv_ending.items() if s == status]
            for request in self.finish_requests(ids, status):
                self._kv_ended.append((request, self._kv_ending[request.request_id][1]))
        self._kv_ending = {}

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        if self.kv_planner is None:
            return super().schedule(*args, **kwargs)
        self._kv_find_unplaceable()
        self._kv_end_requests()  # out of the queues before vLLM tries to admit them
        self._kv_scheduling = True
        try:
            output = super().schedule(*args, **kwargs)
        finally:
            self._kv_scheduling = False
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
                finishes=(
                    request.num_output_tokens + 1 >= request.max_tokens or request.num_tokens + 1 >= self.max_model_len
                ),
                prompt_logprobs=self._kv_wants_prompt_logprobs(request),
            )
        if self.kv_cache_manager.enable_caching:
            self._kv_private_destinations(plan)
        attach(output, plan)
        return output

    def _kv_private_destinations(self, plan: StepPlan) -> None:
        """Prefix caching: a compaction writes the kept tokens into the request's first blocks, but a block that
        another request or the prefix cache also holds (a prefix hit, or a full block vLLM hashed) must keep the
        tokens its hash names. Each such destination gets a private block (from the free pool; when the pool is
        empty, one of the request's own tail blocks, or the block itself when the request alone holds it, taken
        out of the prefix cache); the shared one stays cached, readable by the others, and this request's
        reference to it is released after the compaction (:meth:`_free_evicted_blocks`). From its first
        compaction on, the request's blocks are never hashed again (their slots no longer hold the tokens their
        hashes would name). A compaction that cannot get private blocks (every other block shared and the pool
        full) waits for a later step."""
        manager = self.kv_cache_manager.coordinator.single_type_managers[0]
        pool = self.kv_cache_manager.block_pool
        for req_id, compaction in list(plan.compact.items()):
            blocks = manager.req_to_blocks.get(req_id)
            if not blocks:
                continue
            keep = blocks_for(compaction.target, self.kv_block_size)
            replaced = private_destinations(blocks, keep, pool)
            if replaced is None:
                del plan.compact[req_id]
                self.kv_planner.postpone(req_id, compaction)
                continue
            manager.num_cached_block[req_id] = NEVER_CACHED
            if replaced:
                self._kv_replaced.setdefault(req_id, []).extend(replaced)
                plan.compact[req_id] = dataclasses.replace(
                    compaction, dest_blocks=tuple(block.block_id for block in blocks[:keep])
                )

    def update_from_output(self, scheduler_output: Any, model_runner_output: Any) -> Any:
        plan = plan_of(scheduler_output)
        if plan is not None and plan.compact:
            self._free_evicted_blocks(plan)
        self._kv_end_requests()  # those found during schedule() (a request that could not grow alone)
        ended, self._kv_ended = self._kv_ended, []
        result = super().update_from_output(scheduler_output, model_runner_output)
        for request, reason in ended:
            logger.warning(
                "kvcache: request %s ended (finish reason %r) after %d generated tokens: %s (KV pool: %d tokens)",
                request.request_id, str(request.get_finished_reason()), request.num_output_tokens, reason,
                self.kv_pool_tokens(),
            )
            outputs = result.setdefault(request.client_index, EngineCoreOutputs())
            outputs.outputs.append(EngineCoreOutput(
                request_id=request.request_id, new_token_ids=[], finish_reason=request.get_finished_reason(),
                events=request.take_events(), trace_headers=request.trace_headers,
            ))
        if self.kv_planner is not None:
            for req_id in [*self.kv_planner.states, *self.kv_planner.rules]:
                if req_id not in self.requests:
                    self.kv_planner.release(req_id)
        return result

    def _free_evicted_blocks(self, plan: StepPlan) -> None:
        manager = self.kv_cache_manager.coordinator.single_type_managers[0]
        for req_id, compaction in plan.compact.items():
            # shared blocks the compaction copied out of (prefix caching): released whether or not the request
            # is still there (its own blocks went back with it); freed last, so the prefix cache keeps them longest
            replaced = self._kv_replaced.pop(req_id, [])
            blocks = manager.req_to_blocks.get(req_id)
            if not blocks:
                self.kv_cache_manager.block_pool.free_blocks(reversed(replaced))
                continue
            keep = blocks_for(compaction.target, self.kv_block_size)
            tail = blocks[keep:]
            if tail or replaced:
                del blocks[keep:]
                self.kv_cache_manager.block_pool.free_blocks([*reversed(tail), *reversed(replaced)])
            evicted = compaction.physical - compaction.target
            self.kv_stats["compactions"] += 1
            self.kv_stats["blocks_freed"] += len(tail)
            self.kv_stats["tokens_evicted"] += evicted
            labels = metrics.labels_for(self.vllm_config, compaction.policy or self.kv_cfg.policy_name)
            metrics.count("compactions", 1, labels)
            metrics.count("blocks_freed", len(tail), labels)
            metrics.count("tokens_evicted", evicted, labels)
            if compaction.phase == "prefill":
                rule = self.kv_planner.rule(req_id)
                logger.info(
                    "kvcache: request %s (%s, budget %s): kept %d of %d tokens per layer and KV head, freed %d blocks",
                    req_id, rule.cfg.policy_name, rule.cfg.budget, compaction.target, compaction.physical, len(tail),
                )
