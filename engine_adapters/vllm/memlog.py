"""Memory diagnostics of the model worker, off by default (for soak tests: what grows in the worker).

Read once from the environment of the worker process (``kvcache serve`` passes its own on):

* ``KVCACHE_WORKER_MEMLOG=N``: every N model steps the worker logs its resident memory, its threads, the
  requests the plugin holds buffers for and their bytes (``WorkerKV.requests``).
* ``KVCACHE_TRACEMALLOC=1`` (with ``KVCACHE_WORKER_MEMLOG``): also the Python allocations that grew most since
  the first log (``tracemalloc``; slows the worker, for diagnosis only).
* ``KVCACHE_MALLOC_TRIM=1`` (with ``KVCACHE_WORKER_MEMLOG``): calls glibc's ``malloc_trim(0)`` at each log and
  logs the resident memory before and after: what it returns was freed memory glibc kept, not live objects.

Without ``KVCACHE_WORKER_MEMLOG`` :func:`step` returns at its first test.
"""

from __future__ import annotations

import ctypes
import logging
import os
from typing import Any

try:
    from vllm.logger import init_logger

    logger = init_logger("vllm.kvcache")
except ImportError:  # pragma: no cover
    logger = logging.getLogger("vllm.kvcache")

def _every(value: str) -> int:
    """``KVCACHE_WORKER_MEMLOG``: a whole number of steps (0 or unset: off)."""
    try:
        every = int(value or 0)
    except ValueError:
        every = -1
    if every < 0:
        raise ValueError(f"KVCACHE_WORKER_MEMLOG={value!r}: set a whole number of model steps (e.g. 100), or unset it")
    return every


EVERY = _every(os.environ.get("KVCACHE_WORKER_MEMLOG", "0"))
TRACE = EVERY > 0 and os.environ.get("KVCACHE_TRACEMALLOC", "") not in ("", "0")
TRIM = EVERY > 0 and os.environ.get("KVCACHE_MALLOC_TRIM", "") not in ("", "0")

_steps = 0
_baseline: Any = None


def _status() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "Threads"):
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def _tensor_bytes(obj: Any) -> int:
    import torch

    total = 0
    for value in vars(obj).values():
        if isinstance(value, torch.Tensor):
            total += value.untyped_storage().nbytes()
    return total


def step(state: Any) -> None:
    """Count a model step; every ``KVCACHE_WORKER_MEMLOG`` steps log the worker's memory."""
    global _steps, _baseline
    if not EVERY:
        return
    _steps += 1
    if _steps % EVERY:
        return
    if TRACE:
        import tracemalloc

        if not tracemalloc.is_tracing():
            tracemalloc.start(8)
    status = _status()
    held = list(getattr(state, "requests", {}).values()) if state is not None else []
    logger.info(
        "kvcache memlog: step %d rss %.1f MiB (anon %.1f, file %.1f) threads %d; plugin buffers of %d requests, %.2f MiB",
        _steps, status.get("VmRSS", 0) / 1024, status.get("RssAnon", 0) / 1024, status.get("RssFile", 0) / 1024,
        status.get("Threads", 0), len(held), sum(_tensor_bytes(b) for b in held) / 2**20,
    )
    if TRIM:
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            after = _status()
            logger.info(
                "kvcache memlog: malloc_trim(0) rss %.1f -> %.1f MiB", status.get("VmRSS", 0) / 1024, after.get("VmRSS", 0) / 1024
            )
        except (OSError, AttributeError) as err:
            logger.info("kvcache memlog: malloc_trim unavailable (%s)", err)
    if TRACE:
        import tracemalloc

        snap = tracemalloc.take_snapshot()
        if _baseline is None:
            _baseline = snap
        else:
            stats = snap.compare_to(_baseline, "traceback")[:8]
            traced, _ = tracemalloc.get_traced_memory()
            logger.info("kvcache memlog: python heap traced %.1f MiB; grew most since the first log:", traced / 2**20)
            for stat in stats:
                logger.info("  %+.1f KiB in %d blocks at %s", stat.size_diff / 1024, stat.count_diff, " <- ".join(
                    f"{frame.filename.rsplit('/', 2)[-1]}:{frame.lineno}" for frame in list(stat.traceback)[-4:]
                ))
