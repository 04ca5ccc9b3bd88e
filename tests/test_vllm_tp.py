"""Tensor parallelism: the plugin under ``tensor_parallel_size=2`` on vLLM's CPU backend (one worker process
per rank, each holding half of the KV heads) gives the same greedy tokens as one worker, and every rank
compacts and releases the same blocks.

SmolLM2-135M has 9 query and 3 KV heads, which 2 ranks cannot split, so the test model is SmolLM2-135M
cut to its first 2 KV heads and their 6 query heads (the weights of the embedded model, sliced; built in
a temporary folder, nothing downloaded). Each engine runs in a subprocess (the ranks are processes of
their own and must be torn down), with the engine core in that process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so the scheduler's block pool can be read; each rank's worker
counters come back through vLLM's ``collective_rpc``. Each rank is bound to one core
(``VLLM_CPU_OMP_THREADS_BIND=0|1``: vLLM's automatic binding wants one NUMA node per rank).
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
        model, tp, policies, max_tokens = json.loads(sys.argv[1])
        llm = LLM(model, tensor_parallel_size=tp, enforce_eager=True, max_model_len=2048, dtype="float32", seed=0,
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


def run_engine(model: str, tp: int) -> dict:
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": "|".join(str(i) for i in range(tp))}
    arg = json.dumps([model, tp, POLICIES, MAX_TOKENS])
    proc = subprocess.run([sys.executable, "-c", SCRIPT, arg], capture_output=True, text=True, env=env, timeout=1500)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert lines, proc.stderr[-4000:]
    return json.loads(lines[-1][6:])


@pytest.fixture(scope="module")
def runs(model):
    return {tp: run_engine(model, tp) for tp in (1, 2)}


def test_tensor_parallel_gives_the_same_greedy_tokens_as_one_worker(runs):
    one, two = runs[1]["runs"], runs[2]["runs"]
    assert [r["settings"] for r in one] == [r["settings"] for r in two] == [None, *POLICIES]
    for a, b in zip(one, two):
        assert all(len(t) == MAX_TOKENS for t in a["tokens"])
        assert a["tokens"] == b["tokens"], a["settings"]
    # eviction changed what the model saw: the policies' tokens are not stock's for every prompt
    assert any(r["tokens"] != one[0]["tokens"] for r in one[1:])


def test_every_rank_compacts_and_releases_the_blocks_the_scheduler_frees(runs):
    prompt_lens = runs[2]["prompt_lens"]
    for tp, result in runs.items():
        for run in result["runs"][1:]:
            sched, ranks = run["scheduler"], run["ranks"]
            assert len(ranks) == tp
            prompt_blocks = sum(-(-n // 128) for n in prompt_lens)
            kept_blocks = sum(-(-(-(-n // 4)) // 128) for n in prompt_lens)
            assert sched["compactions"] >= len(prompt_lens)
            assert sched["blocks_freed"] >= prompt_blocks - kept_blocks > 0
            for stats in ranks:  # each rank trimmed its block tables by exactly what the scheduler freed
                assert (stats["kv_heads"], stats["query_heads"]) == (2 // tp, 6 // tp)  # its shard of the heads
                assert stats["compactions"] == sched["compactions"]
                assert stats["blocks_released"] == sched["blocks_freed"]
                assert stats["tokens_evicted"] == sched["tokens_evicted"]
            assert run["free_after"] == run["free_before"]  # no leak
    # the same compactions with one worker and with two
    for a, b in zip(runs[1]["runs"][1:], runs[2]["runs"][1:]):
        assert a["scheduler"] == b["scheduler"]
