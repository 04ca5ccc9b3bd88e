"""vLLM's own parallelism with the plugin on the CPU backend: tensor parallel (one worker process per rank,
each holding half of the KV heads), pipeline parallel (one per stage, each holding half of the layers), both
at once, and data parallel (independent engine cores behind one server).

TP and PP give the same greedy tokens as one worker, and every rank or stage compacts and releases the same
blocks the one scheduler frees. SmolLM2-135M has 9 query and 3 KV heads, which 2 ranks cannot split, so the
model here is SmolLM2-135M cut to its first 2 KV heads and their 6 query heads (the weights of the embedded
model, sliced; built in a temporary folder, nothing downloaded); its 30 layers split 15/15 over 2 stages.
Each engine runs in a subprocess (the ranks are processes of their own and must be torn down), with the
engine core in that process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so the scheduler's block pool can be
read; each worker's counters come back through vLLM's ``collective_rpc``. Each worker is bound to one core
(``VLLM_CPU_OMP_THREADS_BIND``: vLLM's automatic binding wants one NUMA node per rank); with 4 workers on
this 2-core machine two share each core. DP runs through ``kvcache serve --data-parallel-size 2``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.e2e

POLICIES = [
    {"kv_policy": "snapkv", "kv_budget": 0.25, "kv_chunk_evict": False},
    {"kv_policy": "streaming", "kv_budget": 0.25, "kv_chunk_evict": False},
]
MAX_TOKENS = 16


def build_two_head_model(source: str, target: str, kv_heads: int = 2) -> None:
    """SmolLM2 cut to its first ``kv_heads`` KV heads and their query heads (q/k/v rows, o_proj columns)."""
    import torch  # noqa: F401  (safetensors.torch needs it)
    from safetensors.torch import load_file, save_file

    config = json.load(open(os.path.join(source, "config.json")))
    group = config["num_attention_heads"] // config["num_key_value_heads"]
    head_dim = config["head_dim"]
    weights = {}
    for name, tensor in load_file(os.path.join(source, "model.safetensors")).items():
        if name.endswith("q_proj.weight"):
            tensor = tensor[: kv_heads * group * head_dim]
        elif name.endswith(("k_proj.weight", "v_proj.weight")):
            tensor = tensor[: kv_heads * head_dim]
        elif name.endswith("o_proj.weight"):
            tensor = tensor[:, : kv_heads * group * head_dim]
        weights[name] = tensor.contiguous()
    os.makedirs(target, exist_ok=True)
    save_file(weights, os.path.join(target, "model.safetensors"), metadata={"format": "pt"})
    config.update(num_attention_heads=kv_heads * group, num_key_value_heads=kv_heads)
    json.dump(config, open(os.path.join(target, "config.json"), "w"))
    for name in os.listdir(source):
        if name not in ("config.json", "model.safetensors"):
            shutil.copy(os.path.join(source, name), target)


SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    def main():
        from vllm import LLM, SamplingParams
        from kvcache.engine_adapters.vllm import inprocess
        model, tp, pp, policies, max_tokens = json.loads(sys.argv[1])
        llm = LLM(model, tensor_parallel_size=tp, pipeline_parallel_size=pp, enforce_eager=True, max_model_len=2048, dtype="float32", seed=0,
                  num_gpu_blocks_override=24, max_num_seqs=4, max_num_batched_tokens=1024,
                  kv_cache_memory_bytes=256 << 20, additional_config=policies[0])
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(model)
        def document(n):
            facts = " ".join(f"The code of box {i} is {(i * 7919) % 9973}." for i in range(n))
            return facts + " Question: what is the code of box 3? Answer: The code of box 3 is"
        prompts = [tok(document(n))["input_ids"] for n in (45, 30)]
        sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        sched = inprocess.scheduler(llm)
        results = []
        for settings in [None, *policies]:
            inprocess.reconfigure(llm, settings)
            before = dict(sched.kv_stats)
            free = inprocess.free_blocks(llm)
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
            results.append({
                "settings": settings,
                "tokens": [list(o.outputs[0].token_ids) for o in outs],
                "scheduler": {k: sched.kv_stats[k] - before.get(k, 0) for k in sched.kv_stats},
                "ranks": inprocess.worker_stats(llm),
                "free_before": free,
                "free_after": inprocess.free_blocks(llm),
            })
        print("RESULT" + json.dumps({"prompt_lens": [len(p) for p in prompts], "runs": results}))
    if __name__ == "__main__":
        main()
    """
)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from kvcache.engine_adapters.hf.models import resolve_model

    target = str(tmp_path_factory.mktemp("smollm2-2kv"))
    build_two_head_model(str(resolve_model("smollm2-135m")), target)
    return target


def run_engine(model: str, tp: int, pp: int = 1) -> dict:
    workers = tp * pp
    bind = "|".join(str(i % 2) for i in range(workers))  # one core per worker; two share a core beyond 2
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": bind}
    arg = json.dumps([model, tp, pp, POLICIES, MAX_TOKENS])
    proc = subprocess.run([sys.executable, "-c", SCRIPT, arg], capture_output=True, text=True, env=env, timeout=1500)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert lines, proc.stderr[-4000:]
    return json.loads(lines[-1][6:])


LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]  # (tensor parallel, pipeline parallel)


@pytest.fixture(scope="module")
def runs(model):
    return {layout: run_engine(model, *layout) for layout in LAYOUTS}


@pytest.mark.parametrize("layout", LAYOUTS[1:], ids=lambda layout: f"tp{layout[0]}-pp{layout[1]}")
def test_parallel_workers_give_the_same_greedy_tokens_as_one(runs, layout):
    one, many = runs[(1, 1)]["runs"], runs[layout]["runs"]
    assert [r["settings"] for r in one] == [r["settings"] for r in many] == [None, *POLICIES]
    for a, b in zip(one, many):
        assert all(len(t) == MAX_TOKENS for t in a["tokens"])
        assert a["tokens"] == b["tokens"], a["settings"]
    # eviction changed what the model saw: the policies' tokens are not stock's for every prompt
    assert any(r["tokens"] != one[0]["tokens"] for r in one[1:])


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: f"tp{layout[0]}-pp{layout[1]}")
def test_every_worker_compacts_and_releases_the_blocks_the_scheduler_frees(runs, layout):
    """Every TP rank holds its shard of the heads, every PP stage its layers; each compacts and drops from its
    block tables exactly what the one scheduler frees, and the pool refills."""
    tp, pp = layout
    result = runs[layout]
    prompt_lens = result["prompt_lens"]
    for run in result["runs"][1:]:
        sched, workers = run["scheduler"], run["ranks"]
        assert len(workers) == tp * pp
        prompt_blocks = sum(-(-n // 128) for n in prompt_lens)
        kept_blocks = sum(-(-(-(-n // 4)) // 128) for n in prompt_lens)
        assert sched["compactions"] >= len(prompt_lens)
        assert sched["blocks_freed"] >= prompt_blocks - kept_blocks > 0
        for stats in workers:
            assert (stats["kv_heads"], stats["query_heads"]) == (2 // tp, 6 // tp)  # its shard of the heads
            assert stats["layers"] == 30 // pp  # its stage's layers
            assert stats["compactions"] == sched["compactions"]
            assert stats["blocks_released"] == sched["blocks_freed"]
            assert stats["tokens_evicted"] == sched["tokens_evicted"]
        assert run["free_after"] == run["free_before"]  # no leak
    # the same compactions with one worker and with several
    for a, b in zip(runs[(1, 1)]["runs"][1:], result["runs"][1:]):
        assert a["scheduler"] == b["scheduler"]


# ------------------------------------------------------------------------------------------------
# Data parallel: independent engine cores, each with its own scheduler, plugin state and KV pool


def metric_values(text: str, name: str) -> dict[str, float]:
    """{engine label: value} of one metric in Prometheus text (summed over its other labels)."""
    import re

    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            engine = re.search(r'engine="([^"]*)"', line)
            key = engine.group(1) if engine else ""
            found[key] = found.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return found


def test_data_parallel_engines_each_compact_and_lose_no_request(tmp_path):
    """``kvcache serve --data-parallel-size 2``: 32 concurrent requests are spread over two engine cores, each
    compacts (its counters on /metrics carry its ``engine`` label), every request is answered, and both
    engines' KV usage is back to 0."""
    import time
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    from test_vllm_serve import post, retrieval_prompt, serving

    args = [
        "smollm2-135m", "--kv-policy", "snapkv", "--kv-budget", "0.25", "--dtype", "float32", "--max-model-len", "2048",
        "--num-gpu-blocks-override", "24", "--max-num-seqs", "16", "--data-parallel-size", "2",
    ]
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    with serving(args, tmp_path / "server.log") as port:
        def one(i: int) -> dict:
            body = {"model": "smollm2-135m", "prompt": f"[{i}] " + retrieval_prompt(30), "max_tokens": 6, "temperature": 0}
            return post(port, "/v1/completions", body)

        with ThreadPoolExecutor(32) as pool:
            replies = list(pool.map(one, range(32)))
        assert len(replies) == 32 and all(r["usage"]["completion_tokens"] == 6 for r in replies)
        deadline = time.time() + 60
        while True:  # vLLM's gauges are refreshed with each engine's next stats record
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
            usage = metric_values(text, "vllm:kv_cache_usage_perc")
            if (set(usage) == {"0", "1"} and not any(usage.values())) or time.time() > deadline:
                break
            time.sleep(2)
        compactions = metric_values(text, "kvcache:compactions_total")
        assert set(compactions) == {"0", "1"} and all(v > 0 for v in compactions.values()), compactions
        assert sum(compactions.values()) >= 32  # every prompt compacted once, on the engine that served it
        assert set(usage) == {"0", "1"} and not any(usage.values()), usage
        running = metric_values(text, "vllm:num_requests_running")
        assert not any(running.values()), running
