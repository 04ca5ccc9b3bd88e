"""Worker side: physical lengths in the model inputs, query capture, and compaction at the step barrier.

Seams in vLLM 0.32 (V1 model runner, ``vllm/v1/worker/gpu_model_runner.py``; the CPU runner subclasses it):

* ``GPUModelRunner._prepare_inputs`` computes ``positions`` (logical: RoPE), ``seq_lens`` and the slot
  mapping from ``num_computed_tokens``. After it runs, ``seq_lens`` / ``optimistic_seq_lens_cpu`` are
  lowered by each request's shift and the slot mapping is recomputed from the physical positions
  (``BlockTable.compute_slot_mapping``), so new keys land right after the kept ones while RoPE still
  sees the logical position.
* ``CPUAttentionBackendImpl.forward`` (``vllm/v1/attention/backends/cpu_attn.py``) receives the post-RoPE
  queries; the rows the plan asks for are copied out per layer.
* ``GPUModelRunner.execute_model`` — after the forward pass (the barrier), each planned request is
  scored per layer with the configured policy (``policy.score`` on an :class:`~kvcache.evict.base.Observation`),
  the shared selector picks the kept slots per KV head (``kvcache.selector.select_keep``), the kept
  keys/values are gathered into the first C slots of the request's own blocks and the worker's block
  table row is trimmed (the scheduler frees the same tail blocks).
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kvcache.engine_adapters.vllm import config as kvconfig
from kvcache.engine_adapters.vllm.layout import TileLayout, gather_tokens, probe_tile_layout, write_tokens
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
    """Wrap the backend's ``forward`` to copy the planned post-RoPE query rows of each layer."""
    if getattr(impl_cls, "_kvcache_patched", False):
        return
    original = impl_cls.forward

    @functools.wraps(original)
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        capture = _CAPTURE
        if capture is not None and attn_metadata is not None:
            q = query.reshape(query.shape[0], self.num_heads, self.head_size)
            capture["store"][layer.layer_name] = q.index_select(0, capture["rows"]).to(torch.float32)
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
        state = worker_state(self)
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
    runner_cls._kvcache_patched = True


def worker_state(runner: Any) -> "WorkerKV | None":
    state = getattr(runner, "_kvcache_state", False)
    if state is False:
        cfg = kvconfig.parse(runner.vllm_config.additional_config)
        state = WorkerKV(cfg) if cfg is not None else None
        runner._kvcache_state = state
    return state


@dataclass
class RequestBuffers:
    """What the worker keeps per request between compactions."""

    queries: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> [H_q, n, D] captured queries
    query_pos: torch.Tensor | None = None  # [n] logical positions of the captured queries
    decode: bool = False  # the buffered queries are decode queries (else a rolling prompt window)
    slot_pos: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> [H_kv, P] logical pos of kept slots
    scores: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> [H_kv, P] accumulated scores


class WorkerKV:
    def __init__(self, cfg: kvconfig.KVPluginConfig) -> None:
        self.cfg = cfg
        self.policy = cfg.create_policy()
        self.requests: dict[str, RequestBuffers] = {}
        self.layouts: dict[tuple, TileLayout] = {}
        self.layers: list[tuple[str, Any]] | None = None
        self.stats = {"compactions": 0, "tokens_evicted": 0, "capture_s": 0.0, "compact_s": 0.0}

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
        _CAPTURE = {"rows": torch.cat(rows), "owners": owners, "store": {}}

    # ------------------------------------------------------------------------------------------
    def _layers(self, runner: Any) -> list[tuple[str, Any]]:
        if self.layers is None:
            names = runner.kv_cache_config.kv_cache_groups[0].layer_names
            context = runner.compilation_config.static_forward_context
            self.layers = [(name, context[name]) for name in names]
        return self.layers

    def _layout(self, layer: Any, kv_cache: torch.Tensor) -> TileLayout:
        block_size = kv_cache.shape[2]
        head_size = kv_cache.shape[3] // 2
        isa = getattr(layer, "isa", None)
        key = (isa, kv_cache.dtype, block_size, head_size)
        if key not in self.layouts:
            from vllm import _custom_ops as ops

            def write(k, v, kc, vc, slots):
                ops.cpu_attn_reshape_and_cache(k, v, kc, vc, slots, isa)

            self.layouts[key] = probe_tile_layout(write, kv_cache.dtype, block_size, head_size)
            logger.info(
                "kvcache: learned KV tile layout for isa=%s dtype=%s block=%d: keys %s", isa, kv_cache.dtype,
                block_size, "transposed/permuted" if self.layouts[key].transposed_keys else "row-major",
            )
        return self.layouts[key]

    def _store_captures(self, captured: dict[str, Any] | None, plan: StepPlan) -> None:
        if not captured:
            return
        store = captured["store"]
        for req_id, offset, count, first_pos in captured["owners"]:
            buffers = self.requests.setdefault(req_id, RequestBuffers())
            if req_id in plan.decode_capture and not buffers.decode:
                buffers.queries, buffers.query_pos, buffers.decode = {}, None, True
            positions = torch.arange(first_pos, first_pos + count)
            for name, rows in store.items():
                q = rows[offset : offset + count].transpose(0, 1)  # [H_q, n, D]
                old = buffers.queries.get(name)
                buffers.queries[name] = q if old is None else torch.cat([old, q], dim=1)
            buffers.query_pos = positions if buffers.query_pos is None else torch.cat([buffers.query_pos, positions])
            keep = plan.observe.get(req_id)
            if not buffers.decode and keep is not None and buffers.query_pos.numel() > keep:
                buffers.query_pos = buffers.query_pos[-keep:]
                buffers.queries = {n: q[:, -keep:] for n, q in buffers.queries.items()}

    # ------------------------------------------------------------------------------------------
    def after_forward(self, runner: Any, plan: StepPlan, captured: dict[str, Any] | None) -> None:
        start = time.perf_counter()
        self._store_captures(captured, plan)
        middle = time.perf_counter()
        for req_id, compaction in plan.compact.items():
            with torch.no_grad():
                self._compact(runner, req_id, compaction)
        self.stats["capture_s"] += middle - start
        self.stats["compact_s"] += time.perf_counter() - middle

    @torch.no_grad()
    def _compact(self, runner: Any, req_id: str, c: Compaction) -> None:
        req_state = runner.requests[req_id]
        block_ids = req_state.block_ids[0]
        buffers = self.requests.setdefault(req_id, RequestBuffers())
        observes = self.policy.observed_prompt_queries(c.logical) > 0
        if buffers.query_pos is None and observes:
            raise RuntimeError(f"kvcache: no captured queries for request {req_id} at its {c.phase} compaction")
        every_step = self.policy.every_step
        T = c.physical
        block_size = 0
        for name, layer in self._layers(runner):
            kv_cache = layer.kv_cache
            if isinstance(kv_cache, (list, tuple)):
                kv_cache = kv_cache[0]
            layout = self._layout(layer, kv_cache)
            block_size = layout.block_size
            keys, values = gather_tokens(kv_cache, layout, block_ids, T)  # [H, T, D]
            h_kv = keys.shape[0]
            kept = buffers.slot_pos.get(name)
            prefix = 0 if kept is None else kept.shape[1]
            fresh = torch.arange(c.logical - (T - prefix), c.logical).expand(h_kv, -1)
            key_index = fresh if kept is None else torch.cat([kept, fresh], dim=1)
            if observes:
                queries, query_pos = buffers.queries[name], buffers.query_pos
            else:  # scored from positions (or keys) alone: no queries were captured
                queries = keys.new_zeros(layer.impl.num_heads, 0, keys.shape[-1])
                query_pos = torch.zeros(0, dtype=torch.long)
            obs = Observation(
                queries=queries[None],
                keys=keys[None],
                key_index=key_index[None],
                key_valid=torch.ones(1, h_kv, T, dtype=torch.bool),
                query_index=query_pos[None],
                scaling=float(layer.impl.scale),
                step=c.step,
                max_new_tokens=c.max_new_tokens,
            )
            previous = buffers.scores.get(name) if every_step else None
            scores = self.policy.score(obs, None if previous is None else previous[None])
            protected = protected_slots(
                key_index[None], torch.zeros(1, dtype=torch.long), torch.tensor([c.logical]), c.sinks, c.recent
            )
            keep, _ = select_keep(scores, obs.key_valid, protected, torch.tensor([c.target]), c.target, key_index[None])
            keep = keep[0]  # [H, C]
            gather = keep[..., None].expand(-1, -1, keys.shape[-1])
            write_tokens(kv_cache, layout, block_ids, keys.gather(1, gather), values.gather(1, gather))
            buffers.slot_pos[name] = key_index.gather(1, keep)
            if every_step:
                buffers.scores[name] = scores[0].gather(1, keep)
        # Trim the worker's block table to the blocks the kept tokens occupy (the scheduler frees the rest).
        n_keep = blocks_for(c.target, block_size)
        del block_ids[n_keep:]
        row = runner.input_batch.req_id_to_index.get(req_id)
        if row is not None:
            runner.input_batch.block_table[0].num_blocks_per_row[row] = n_keep
        if c.phase != "chunk":
            buffers.queries, buffers.query_pos = {}, None
        self.stats["compactions"] += 1
        self.stats["tokens_evicted"] += T - c.target
