"""In-process access to a vLLM engine's scheduler and model runner (tests and benchmarks).

With ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` vLLM runs the engine core and the (single) worker in the
calling process, so the scheduler's block pool and the worker's state can be read directly, and the
eviction settings can be swapped between runs without restarting the engine (one startup, the same KV
pool for every configuration compared). With tensor parallelism the workers are processes of their own
(one per rank); their state is reached through vLLM's ``collective_rpc`` (:func:`worker_stats`,
:func:`reconfigure`).
"""

from __future__ import annotations

from typing import Any

from kvcache.engine_adapters.vllm import config as kvconfig
from kvcache.engine_adapters.vllm.plan import Planner
from kvcache.engine_adapters.vllm.worker import WorkerKV


def engine_core(llm: Any) -> Any:
    client = llm.llm_engine.engine_core
    core = getattr(client, "engine_core", None)
    if core is None:
        raise RuntimeError(
            "the engine core runs in another process; set VLLM_ENABLE_V1_MULTIPROCESSING=0 before creating LLM(...)"
        )
    return core


def scheduler(llm: Any) -> Any:
    return engine_core(llm).scheduler


def model_runner(llm: Any) -> Any:
    """The model runner of a single in-process worker (no tensor parallelism)."""
    executor = engine_core(llm).model_executor
    driver = getattr(executor, "driver_worker", None)
    if driver is None:
        raise RuntimeError("the workers run in their own processes (tensor parallelism): use worker_stats(llm)")
    return driver.worker.model_runner


def _runner_of(worker: Any) -> Any:
    return getattr(worker, "worker", worker).model_runner


def _worker_kv_stats(worker: Any) -> dict[str, Any] | None:
    state = getattr(_runner_of(worker), "_kvcache_state", None)
    if not state:
        return None
    stats = dict(state.stats)
    if state.group is not None:  # this rank's shard of the heads
        stats["query_heads"], stats["kv_heads"] = state.group.num_heads, state.group.cache.num_heads
        stats["layers"] = len(state.group.names)  # this pipeline stage's layers
    return stats


def _worker_reconfigure(worker: Any, settings: dict[str, Any] | None) -> None:
    cfg = kvconfig.parse(settings or {})
    _runner_of(worker)._kvcache_state = WorkerKV(cfg) if cfg is not None else None


def worker_stats(llm: Any) -> list[dict[str, Any] | None]:
    """Each rank's worker counters (compactions, tokens evicted, blocks released from its block table, ...),
    rank order; None for a rank whose plugin is inert."""
    return llm.collective_rpc(_worker_kv_stats)


def free_blocks(llm: Any) -> int:
    return scheduler(llm).kv_cache_manager.block_pool.get_num_free_blocks()


def request_blocks(llm: Any) -> dict[str, int]:
    """Blocks each live request holds (the scheduler's view)."""
    manager = scheduler(llm).kv_cache_manager.coordinator.single_type_managers[0]
    return {req_id: len(blocks) for req_id, blocks in manager.req_to_blocks.items()}


def reconfigure(llm: Any, additional_config: dict[str, Any] | None) -> None:
    """Swap the eviction settings of an idle engine (None or no ``kv_policy``: the plugin goes inert).

    The engine must have been created with a ``kv_policy`` so that its scheduler is the plugin's.
    """
    sched = scheduler(llm)
    if not hasattr(sched, "kv_planner"):
        raise RuntimeError("the engine was created without kv_policy; its scheduler is not the kvcache scheduler")
    if sched.get_num_unfinished_requests():
        raise RuntimeError("reconfigure an idle engine only (requests are in flight)")
    cfg = kvconfig.parse(additional_config or {})
    sched.kv_cfg = cfg
    block_size = sched.kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size
    sched.kv_planner = Planner(cfg, sched.kv_pool_tokens(), block_size) if cfg is not None else None
    llm.collective_rpc(_worker_reconfigure, args=(dict(additional_config) if cfg is not None else None,))
    sched.vllm_config.additional_config.update(cfg.as_dict() if cfg is not None else {"kv_policy": None})
