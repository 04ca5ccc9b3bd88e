"""Soak test of ``kvcache serve``: many mixed requests and client aborts, then no leaked KV blocks.

Starts ``kvcache serve`` with an eviction policy, sends ``--requests`` completions of mixed prompt lengths
(a few tokens up to past one prefill chunk), output lengths, greedy and seeded sampling, ``n=2``, from
``--concurrency`` clients; ``--aborts`` of them are streamed and dropped by the client after a few chunks.
Then, from the server's Prometheus ``/metrics``: no request running or waiting, KV cache usage back to 0
(no block leaked), and the plugin's counters. The resident memory of the server and engine processes is
reported after a warm-up and at the end. Exits 1 when a request failed or memory leaked.

    python -m kvcache.eval.vllm_soak --requests 1000 --aborts 50 --output results/vllm/soak.json

Not part of the test suite (1,000 requests take tens of minutes on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

FILLER = "The archive keeps a note on the weather, the market and the roads of every town in the valley. "


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--kv-policy", default="snapkv")
    parser.add_argument("--kv-budget", default="0.25")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--aborts", type=int, default=50, help="streamed requests the client drops after a few chunks")
    parser.add_argument("--concurrency", type=int, default=12)
    parser.add_argument("--max-prompt-tokens", type=int, default=3000)
    parser.add_argument("--pool-blocks", type=int, default=64, help="KV pool in blocks of 128 tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="JSON report")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(port: int) -> dict[str, float]:
    """Sum of each sample name over its labels."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        try:
            totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        except ValueError:
            continue
    return totals


def rss_mib(pid: int) -> dict[str, float]:
    """Resident memory of ``pid`` and its descendants, MiB, by process name."""
    import psutil

    root = psutil.Process(pid)
    out = {}
    for proc in [root, *root.children(recursive=True)]:
        try:
            out[f"{proc.pid}:{proc.name()}"] = round(proc.memory_info().rss / 2**20, 1)
        except psutil.Error:
            continue
    return out


def post(port: int, body: dict[str, Any], timeout: float = 900) -> dict[str, Any]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def stream_and_drop(port: int, body: dict[str, Any], chunks: int = 5) -> int:
    """Stream a completion and close the connection after ``chunks`` server-sent events."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
    conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    seen = 0
    while seen < chunks:
        line = resp.fp.readline()
        if not line:
            break
        if line.startswith(b"data:"):
            seen += 1
    conn.close()
    return seen


def make_request(rng: random.Random, model: str, max_prompt_tokens: int) -> dict[str, Any]:
    tokens = rng.choice([5, 50, 200, 600, 1500, max_prompt_tokens])
    sentences = max(1, tokens // 22)  # FILLER is about 22 tokens
    prompt = f"[{rng.randrange(10**6)}] " + FILLER * sentences + "Question: which town had the best market? Answer:"
    body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": rng.choice([1, 4, 16, 64]), "temperature": 0}
    kind = rng.random()
    if kind < 0.2:
        body.update(temperature=0.8, seed=rng.randrange(1000))  # seeded sampling (long prompts: chunked prefill)
    elif kind < 0.3:
        body.update(temperature=0.7, n=2)
    return body


def run(args: argparse.Namespace) -> int:
    port = free_port()
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"kvcache-soak-{port}.log"
    cmd = [
        sys.executable, "-m", "kvcache.cli", "serve", args.model, "--kv-policy", args.kv_policy, "--kv-budget", args.kv_budget,
        "--max-model-len", str(max(4096, args.max_prompt_tokens + 256)), "--num-gpu-blocks-override", str(args.pool_blocks),
        "--max-num-seqs", str(max(32, args.concurrency * 2)), "--host", "127.0.0.1", "--port", str(port),
    ]
    rng = random.Random(args.seed)
    report: dict[str, Any] = {"command": cmd, "requests": args.requests, "aborts": args.aborts}
    with open(log_path, "w") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 900
        while True:
            if server.poll() is not None or time.time() > deadline:
                print(log_path.read_text()[-4000:], file=sys.stderr)
                return 1
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).status == 200:
                    break
            except OSError:
                time.sleep(2)
        for _ in range(8):  # warm-up before the memory baseline
            post(port, make_request(rng, args.model, args.max_prompt_tokens))
        report["rss_mib_after_warmup"] = rss_mib(server.pid)
        abort_ids = set(rng.sample(range(args.requests), min(args.aborts, args.requests)))
        bodies = [make_request(rng, args.model, args.max_prompt_tokens) for _ in range(args.requests)]
        for i in abort_ids:
            bodies[i]["max_tokens"] = 64

        def one(i: int) -> tuple[str, str | None]:
            try:
                if i in abort_ids:
                    stream_and_drop(port, bodies[i])
                    return "aborted", None
                reply = post(port, bodies[i])
                return ("ok" if reply["choices"] else "empty"), None
            except Exception as err:  # noqa: BLE001 - every failure is reported
                return "failed", f"{type(err).__name__}: {err}"

        start = time.time()
        with ThreadPoolExecutor(args.concurrency) as pool:
            results = list(pool.map(one, range(args.requests)))
        report["seconds"] = round(time.time() - start, 1)
        report["answered"] = sum(r == "ok" for r, _ in results)
        report["aborted"] = sum(r == "aborted" for r, _ in results)
        report["failed"] = [e for r, e in results if r in ("failed", "empty")][:20]
        settled = {}
        for _ in range(60):  # aborted requests are released asynchronously
            settled = metrics(port)
            if settled.get("vllm:num_requests_running", 1) == 0 and settled.get("vllm:num_requests_waiting", 1) == 0:
                break
            time.sleep(1)
        report["running_after"] = settled.get("vllm:num_requests_running")
        report["waiting_after"] = settled.get("vllm:num_requests_waiting")
        report["kv_cache_usage_after"] = settled.get("vllm:kv_cache_usage_perc")
        report["kvcache_counters"] = {k: v for k, v in settled.items() if k.startswith("kvcache:") and k.endswith("_total")}
        report["rss_mib_end"] = rss_mib(server.pid)
        report["rss_growth_mib"] = {
            k: round(report["rss_mib_end"].get(k, 0.0) - v, 1) for k, v in report["rss_mib_after_warmup"].items()
        }
        report["server_alive"] = server.poll() is None
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    ok = (
        report["server_alive"] and not report["failed"] and report["running_after"] == 0
        and report["waiting_after"] == 0 and report["kv_cache_usage_after"] == 0
    )
    report["passed"] = bool(ok)
    text = json.dumps(report, indent=1)
    print(text)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvcache.eval.vllm_soak", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
