"""Memory of a long-running vLLM server: the launcher's CPU environment, the worker's memory log, the soak's RSS probes."""

from __future__ import annotations

import os

from kvcache.engine_adapters.vllm import launcher, memlog
from kvcache.eval import vllm_soak


def test_cpu_environment_bounds_onednn_cache_unless_set():
    environ: dict[str, str] = {}
    assert launcher.set_cpu_environment(environ, find=lambda: None) == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "128"}
    assert environ == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "128"}
    mine = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024"}
    assert launcher.set_cpu_environment(mine, find=lambda: None) == {}
    assert mine["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "1024"  # the user's setting wins


def test_cpu_environment_preloads_tcmalloc_when_found():
    found = lambda: "libtcmalloc_minimal.so.4"  # noqa: E731
    environ = {"LD_PRELOAD": "/x/libgomp.so.1"}
    launcher.set_cpu_environment(environ, find=found)
    assert environ["LD_PRELOAD"] == "libtcmalloc_minimal.so.4:/x/libgomp.so.1"
    assert launcher.set_cpu_environment(environ, find=found) == {}  # already there: unchanged
    off = {"KVCACHE_TCMALLOC": "0"}
    launcher.set_cpu_environment(off, find=found)
    assert "LD_PRELOAD" not in off
    fresh: dict[str, str] = {}
    launcher.set_cpu_environment(fresh, find=found)
    assert fresh["LD_PRELOAD"] == "libtcmalloc_minimal.so.4"


def test_a_server_without_tcmalloc_says_so_in_one_line():
    assert launcher.tcmalloc_warning({}).count("\n") == 0
    assert "apt-get install libtcmalloc-minimal4" in launcher.tcmalloc_warning({})
    assert launcher.tcmalloc_warning({"LD_PRELOAD": "libtcmalloc_minimal.so.4"}) is None
    assert launcher.tcmalloc_warning({"KVCACHE_TCMALLOC": "0"}) is None


def test_memlog_is_off_by_default():
    if os.environ.get("KVCACHE_WORKER_MEMLOG"):
        return
    assert memlog.EVERY == 0 and not memlog.TRACE and not memlog.TRIM
    memlog.step(None)
    assert memlog._steps == 0  # returned at its first test


def test_soak_memory_probes_read_this_process():
    parts = vllm_soak.smaps_mib(os.getpid())
    assert set(parts) == {"heap", "arenas", "anon", "file"}
    assert parts["file"] > 0 and sum(parts.values()) > 1
    assert vllm_soak.worker_rss({"1:python": 10.0, "2:VLLM::Worker": 99.5}) == 99.5
    assert vllm_soak.worker_rss({"1:python": 10.0}) is None
