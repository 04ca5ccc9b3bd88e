"""The plugin's counters on vLLM's Prometheus ``/metrics`` endpoint.

Eviction happens in the engine-core process (scheduler: blocks freed, tokens evicted; worker: compaction
time), while ``/metrics`` is served by the API server process. vLLM joins metrics of several processes
with ``prometheus_client``'s multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``: each process writes its
values to files there, the endpoint sums them); it turns that on itself only for several API servers.
``kvcache serve`` turns it on for one as well (:func:`enable_multiprocess_metrics`, before vLLM is
imported), and the counters below, created in the engine core, then appear beside vLLM's own:

    kvcache:compactions_total           requests compacted (prompt, prompt chunk or decode re-compaction)
    kvcache:tokens_evicted_total        tokens evicted per layer and KV head
    kvcache:blocks_freed_total          KV blocks given back to vLLM's pool
    kvcache:compaction_seconds_total    time spent scoring and moving the kept tokens (worker)
    kvcache:preemptions_total           requests preempted (they recompute and are evicted again)

labelled with ``model_name``, ``policy`` and ``engine`` (the data-parallel rank, as vLLM's own metrics). With ``vllm serve`` set ``PROMETHEUS_MULTIPROC_DIR`` to an
empty directory to get them. Without multiprocess mode the counters still count (the in-process
``inprocess`` helpers and the benchmark read the scheduler's ``kv_stats`` and the worker's ``stats``).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

_COUNTERS: dict[str, Any] = {}
_TEMP_DIR: tempfile.TemporaryDirectory | None = None

DESCRIPTIONS = {
    "compactions": "Requests compacted by the kvcache plugin (prompt, prompt chunk or decode re-compaction).",
    "tokens_evicted": "Tokens evicted by the kvcache plugin, per layer and KV head.",
    "blocks_freed": "KV cache blocks the kvcache plugin gave back to vLLM's block pool.",
    "compaction_seconds": "Seconds the kvcache plugin spent scoring and moving kept tokens.",
    "preemptions": "Requests preempted by vLLM's scheduler (recomputed, then evicted again).",
}


def enable_multiprocess_metrics() -> str | None:
    """Point ``PROMETHEUS_MULTIPROC_DIR`` at a fresh temporary directory unless the user set one; call
    before vLLM (and ``prometheus_client``) is imported. Returns the directory, or None when it was set."""
    global _TEMP_DIR
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None
    _TEMP_DIR = tempfile.TemporaryDirectory(prefix="kvcache-prometheus-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _TEMP_DIR.name
    return _TEMP_DIR.name


def _counter(name: str) -> Any:
    if name not in _COUNTERS:
        try:
            from prometheus_client import Counter
        except ImportError:  # pragma: no cover - vLLM depends on prometheus_client
            _COUNTERS[name] = None
            return None
        _COUNTERS[name] = Counter(f"kvcache:{name}", DESCRIPTIONS[name], labelnames=["model_name", "policy", "engine"])
    return _COUNTERS[name]


def count(name: str, amount: float, labels: dict[str, str]) -> None:
    """Add ``amount`` to counter ``kvcache:<name>_total`` (created on first use)."""
    if amount <= 0:
        return
    counter = _counter(name)
    if counter is not None:
        counter.labels(**labels).inc(amount)


def labels_for(vllm_config: Any, policy: str) -> dict[str, str]:
    """The labels vLLM's own metrics use (``model_name``, and ``engine``: the data-parallel rank, so each engine
    core's counters stay apart and a query sums them) plus the policy."""
    model_config = getattr(vllm_config, "model_config", None)
    served = getattr(model_config, "served_model_name", None) or getattr(model_config, "model", "")
    if isinstance(served, (list, tuple)):
        served = served[0] if served else ""
    parallel = getattr(vllm_config, "parallel_config", None)
    # data_parallel_index: the engine's DP rank (vLLM resets data_parallel_rank to 0 for independent dense ranks)
    rank = getattr(parallel, "data_parallel_index", None)
    if rank is None:
        rank = getattr(parallel, "data_parallel_rank", 0) or 0
    return {"model_name": str(served), "policy": policy, "engine": str(rank)}
