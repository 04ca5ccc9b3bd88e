"""Soak test of ``kvcache serve``: many mixed requests and client aborts, then no leaked KV blocks.

Starts ``kvcache serve`` with an eviction policy, sends ``--requests`` completions of mixed prompt lengths
(a few tokens up to past one prefill chunk), output lengths, greedy and seeded sampling, ``n=2``, from
``--concurrency`` clients; ``--aborts`` of them are streamed and dropped by the client after a few chunks.
Then, from the server's Prometheus ``/metrics``: no request running or waiting, KV cache usage back to 0
(no block leaked), and the plugin's counters. The resident memory of the server and engine processes is
reported after a warm-up, every ``--sample-every`` answered requests (``rss_timeline``: RSS per process, and
for the model worker a breakdown of its mappings from ``/proc/PID/smaps``: glibc's main heap, anonymous
mappings, malloc arenas of other threads, files), and at the end, with the growth over the run and over its
second half (``worker_growth_last_half_mib``: a curve that plateaus after warm-up is not a leak, a line is).
Exits 1 when a request failed, KV blocks leaked, or the worker grew more than ``--max-worker-growth`` MiB over
the second half.

    python -m kvcache.eval.vllm_soak --requests 1000 --aborts 50 --output results/vllm/soak.json
    python -m kvcache.eval.vllm_soak --stock ...                # the same load on vLLM without a policy
    python -m kvcache.eval.vllm_soak --env MALLOC_ARENA_MAX=2 ...  # the server's environment

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
import threading
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
    parser.add_argument("--stock", action="store_true", help="no --kv-policy: vLLM as it is (the plugin inert)")
    parser.add_argument("--sample-every", type=int, default=25, help="RSS sample every N finished requests")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="set in the server's environment")
    parser.add_argument("--serve-arg", action="append", default=[], metavar="ARG", help="extra argument for kvcache serve")
    parser.add_argument(
        "--max-worker-growth", type=float, default=50.0,
        help="MiB the model worker's RSS may grow over the second half of the requests (the run fails above it)",
    )
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


def smaps_mib(pid: int) -> dict[str, float]:
    """Resident memory of one process by kind of mapping, MiB: ``heap`` (glibc's main arena, brk), ``arenas``
    (glibc's per-thread arenas: anonymous mappings inside a 64 MiB-aligned reservation), ``anon`` (other
    anonymous mappings: large mallocs served by mmap, thread stacks, torch's big tensors), ``file``."""
    out = {"heap": 0.0, "arenas": 0.0, "anon": 0.0, "file": 0.0}
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return out
    kind = "anon"
    for line in text.splitlines():
        first = line.split(None, 1)[0]
        if "-" in first and not first.endswith(":"):
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            name = fields[5] if len(fields) > 5 else ""
            if name == "[heap]":
                kind = "heap"
            elif name.startswith("/"):
                kind = "file"
            elif not name and start % (64 << 20) == 0 and end - start <= (64 << 20):
                kind = "arenas"  # a glibc thread arena starts at a 64 MiB boundary (HEAP_MAX_SIZE)
            else:
                kind = "anon"
        elif first == "Rss:":
            out[kind] += int(line.split()[1]) / 1024
    return {k: round(v, 1) for k, v in out.items()}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def sample(pid: int, done: int, start: float) -> dict[str, Any]:
    rss = rss_mib(pid)
    entry: dict[str, Any] = {"done": done, "seconds": round(time.time() - start, 1), "load": load_average(), "rss_mib": rss}
    for key in rss:
        if "Worker" in key:
            entry["worker_smaps_mib"] = smaps_mib(int(key.split(":", 1)[0]))
    return entry


def worker_rss(rss: dict[str, float]) -> float | None:
    return next((v for k, v in rss.items() if "Worker" in k), None)


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
    policy = [] if args.stock else ["--kv-policy", args.kv_policy, "--kv-budget", args.kv_budget]
    # eager in both modes: the plugin turns it on, and a stock run in torch.compile mode would not compare
    cmd = [
        sys.executable, "-m", "kvcache.cli", "serve", args.model, *policy, "--enforce-eager",
        "--max-model-len", str(max(4096, args.max_prompt_tokens + 256)), "--num-gpu-blocks-override", str(args.pool_blocks),
        "--max-num-seqs", str(max(32, args.concurrency * 2)), "--host", "127.0.0.1", "--port", str(port), *args.serve_arg,
    ]
    env = dict(os.environ)
    env.update(item.split("=", 1) for item in args.env)
    rng = random.Random(args.seed)
    report: dict[str, Any] = {
        "command": cmd, "env": args.env, "requests": args.requests, "aborts": args.aborts, "stock": args.stock,
        "cpus": os.cpu_count(), "load_start": load_average(), "uptime_start": uptime(),
    }
    with open(log_path, "w") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
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
        timeline = [sample(server.pid, 0, time.time())]
        report["rss_timeline"] = timeline
        finished = [0]
        lock = threading.Lock()
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
            finally:
                with lock:
                    finished[0] += 1
                    if args.sample_every > 0 and finished[0] % args.sample_every == 0 and finished[0] < args.requests:
                        timeline.append(sample(server.pid, finished[0], start))

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
        timeline.append(sample(server.pid, args.requests, start))
        report["rss_mib_end"] = timeline[-1]["rss_mib"]
        report["rss_growth_mib"] = {
            k: round(report["rss_mib_end"].get(k, 0.0) - v, 1) for k, v in report["rss_mib_after_warmup"].items()
        }
        half = next(e for e in timeline if e["done"] >= args.requests // 2)
        first, middle, last = (worker_rss(e["rss_mib"]) for e in (timeline[0], half, timeline[-1]))
        if None not in (first, middle, last):
            report["worker_growth_first_half_mib"] = round(middle - first, 1)
            report["worker_growth_last_half_mib"] = round(last - middle, 1)
        report["load_end"] = load_average()
        report["uptime"] = uptime()
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
        and report.get("worker_growth_last_half_mib", 0.0) <= args.max_worker_growth
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
