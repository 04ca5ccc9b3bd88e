"""Prefix caching beside eviction (vLLM's default, kept on by the plugin).

A compaction writes the kept tokens into its request's first blocks; blocks that the prefix cache or another
request also holds are replaced by private ones first (``scheduler.private_destinations``), so a cached prefix
keeps the tokens its hash names and later requests reuse it. References: vLLM's own block pool (unit tests) and
the same plugin with prefix caching off, in a subprocess (greedy tokens must be equal).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter

import pytest

pytest.importorskip("vllm")

BLOCK = 128


# ------------------------------------------------------------------------------------------------
# private_destinations on vLLM's own BlockPool (no model)


def make_pool(num_blocks: int = 12):
    from vllm.v1.core.block_pool import BlockPool

    return BlockPool(num_blocks, enable_caching=True, hash_block_size=BLOCK)


def hashed(pool, block, name: bytes):
    """Put ``block`` into the prefix cache under ``name`` (as vLLM's cache_full_blocks does)."""
    from vllm.v1.core.kv_cache_utils import BlockHash, make_block_hash_with_group_id

    pool._insert_block_hash(make_block_hash_with_group_id(BlockHash(name), 0), block, None)
    return block


def test_private_destinations_keeps_writable_blocks():
    from kvcache.engine_adapters.vllm.scheduler import private_destinations

    pool = make_pool()
    blocks = pool.get_new_blocks(4)
    ids = [b.block_id for b in blocks]
    assert private_destinations(blocks, 2, pool) == []
    assert [b.block_id for b in blocks] == ids


def test_shared_and_cached_destinations_get_fresh_blocks_and_stay_cached():
    from kvcache.engine_adapters.vllm.scheduler import private_destinations

    pool = make_pool()
    blocks = pool.get_new_blocks(4)
    shared, cached = hashed(pool, blocks[0], b"a"), hashed(pool, blocks[1], b"b")
    pool.touch([shared])  # another request holds it too
    free_before = pool.get_num_free_blocks()
    replaced = private_destinations(blocks, 3, pool)
    assert replaced == [shared, cached]  # the shared one first
    assert all(pool.is_block_writable(b) for b in blocks[:3])
    assert shared not in blocks and cached not in blocks
    assert shared.block_hash is not None and cached.block_hash is not None  # still in the prefix cache
    assert pool.get_num_free_blocks() == free_before - 2
    pool.free_blocks(reversed(replaced))  # what the scheduler does after the compaction
    assert shared.ref_cnt == 1 and cached.ref_cnt == 0


def test_empty_pool_takes_own_blocks_out_of_the_cache_and_swaps_a_tail_block_for_a_shared_one():
    from kvcache.engine_adapters.vllm.scheduler import private_destinations

    pool = make_pool(6)  # null block + 5
    blocks = pool.get_new_blocks(5)
    shared, own = hashed(pool, blocks[0], b"a"), hashed(pool, blocks[1], b"b")
    tail = hashed(pool, blocks[4], b"c")
    pool.touch([shared])
    assert pool.get_num_free_blocks() == 0
    replaced = private_destinations(blocks, 2, pool)
    assert replaced == []  # nothing to release: the shared block moved to the tail, freed with it
    assert blocks[0] is tail and blocks[4] is shared and blocks[1] is own
    assert tail.block_hash is None and own.block_hash is None  # written now: out of the prefix cache
    assert shared.block_hash is not None
    assert all(pool.is_block_writable(b) for b in blocks[:2])


def test_impossible_destinations_change_nothing():
    from kvcache.engine_adapters.vllm.scheduler import private_destinations

    pool = make_pool(4)  # null block + 3
    blocks = pool.get_new_blocks(3)
    for i, b in enumerate(blocks):
        hashed(pool, b, bytes([i]))
    pool.touch(blocks)  # every block held by another request too, and no free block
    before = [(b.block_id, b.ref_cnt, b.block_hash) for b in blocks]
    assert private_destinations(blocks, 2, pool) is None
    assert [(b.block_id, b.ref_cnt, b.block_hash) for b in blocks] == before


def test_prefix_hit_limit_leaves_the_scored_queries_to_recompute():
    from kvcache.engine_adapters.vllm import config as kvconfig
    from kvcache.engine_adapters.vllm.plan import MAX_OBSERVED, Planner

    planner = Planner(kvconfig.parse({"kv_policy": "snapkv", "kv_budget": 0.25}), 20 * BLOCK, BLOCK)
    observed = planner.default.plan.observed_queries(1200, MAX_OBSERVED)
    assert observed > 0
    assert planner.prefix_hit_limit("r", 1200, 1200) == 1200 - observed
    capacity = planner.default.plan.request(1200).capacity
    assert planner.prefix_hit_limit("r", 1200, 1200, chunk_evicts=True) == capacity  # peak stays C + chunk
    kept_whole = Planner(kvconfig.parse({"kv_policy": "snapkv", "kv_budget": 1.0}), 20 * BLOCK, BLOCK)
    assert kept_whole.prefix_hit_limit("r", 1200, 1250) == 1250  # not compressed: vLLM's own rule


# ------------------------------------------------------------------------------------------------
# In a real engine: SmolLM2-135M, fp32, CPU

BLOCKS = 48
ENGINE_KW = dict(
    enforce_eager=True, max_model_len=4096, dtype="float32", seed=0, num_gpu_blocks_override=BLOCKS,
    max_num_seqs=8, max_num_batched_tokens=2048, gpu_memory_utilization=0.5,
)
SETTINGS = {"kv_policy": "snapkv", "kv_budget": 0.25}

REFERENCE_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    def main():
        from vllm import LLM, SamplingParams
        model, kw, settings, batches, max_tokens = json.loads(sys.argv[1])
        llm = LLM(model, additional_config=settings, enable_prefix_caching=False, **kw)
        sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        tokens = []
        for batch in batches:
            outs = llm.generate([{"prompt_token_ids": p} for p in batch], sp, use_tqdm=False)
            tokens.append([list(o.outputs[0].token_ids) for o in outs])
        print("RESULT" + json.dumps(tokens))
    if __name__ == "__main__":
        main()
    """
)


def model_path() -> str:
    from kvcache.engine_adapters.hf.models import resolve_model

    return str(resolve_model("smollm2-135m"))


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path())


@pytest.fixture(scope="module")
def system_prompt(tokenizer):
    """About 1,250 tokens shared by every request (a system prompt), then distinct questions."""
    facts = " ".join(f"The code of box {i} is {(i * 7919) % 9973}." for i in range(90))
    ids = tokenizer("You answer questions about boxes. " + facts)["input_ids"]
    assert len(ids) > 8 * BLOCK
    return ids


@pytest.fixture(scope="module")
def questions(tokenizer, system_prompt):
    return [system_prompt + tokenizer(f" Question: what is the code of box {n}? Answer: The code of box {n} is",
                                      add_special_tokens=False)["input_ids"] for n in (3, 17, 42, 66)]


@pytest.fixture(scope="module")
def llm():
    import gc

    gc.collect()  # an engine of an earlier module must be gone before this one starts
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    engine = LLM(model_path(), additional_config=dict(SETTINGS), disable_log_stats=False, **ENGINE_KW)
    assert engine.llm_engine.vllm_config.cache_config.enable_prefix_caching  # vLLM's default stays on
    yield engine
    del engine


def counter(llm, name: str) -> float:
    return sum(m.value for m in llm.get_metrics() if m.name == name and hasattr(m, "value"))


def generate(llm, prompts, max_tokens=8):
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def check_blocks(llm):
    """Every block's reference count equals the requests holding it (plus the shared blocks a compaction in
    flight still holds); free blocks have none, and no block is in the free queue twice."""
    from kvcache.engine_adapters.vllm import inprocess

    sched = inprocess.scheduler(llm)
    pool = sched.kv_cache_manager.block_pool
    manager = sched.kv_cache_manager.coordinator.single_type_managers[0]
    held = Counter(b.block_id for blocks in manager.req_to_blocks.values() for b in blocks)
    held.update(b.block_id for blocks in sched._kv_replaced.values() for b in blocks)
    for block in pool.blocks[1:]:
        assert block.ref_cnt == held.get(block.block_id, 0), (block.block_id, block.ref_cnt, held.get(block.block_id))
    free = []
    node = pool.free_block_queue.fake_free_list_head.next_free_block
    while node is not pool.free_block_queue.fake_free_list_tail:
        free.append(node.block_id)
        node = node.next_free_block
    assert len(free) == len(set(free)) == pool.get_num_free_blocks()
    assert all(pool.blocks[i].ref_cnt == 0 for i in free)


def cached_blocks(llm) -> dict[int, object]:
    """Block id -> hash of every block in vLLM's prefix cache."""
    from kvcache.engine_adapters.vllm import inprocess

    pool = inprocess.scheduler(llm).kv_cache_manager.block_pool
    return {b.block_id: b.block_hash for b in pool.blocks if b.block_hash is not None}


def block_contents(llm, ids: list[int]) -> list:
    """Each layer's KV cache restricted to the blocks ``ids`` (the block axis found by its size)."""
    import torch

    from kvcache.engine_adapters.vllm import inprocess

    index = torch.tensor(ids)
    out = []
    for cache in inprocess.model_runner(llm).kv_caches:
        axis = list(cache.shape).index(BLOCKS)
        out.append(cache.index_select(axis, index).clone())
    return out


@pytest.mark.e2e
def test_shared_prefix_hits_the_cache_and_keeps_the_greedy_tokens(llm, questions):
    """One 1.1K-token system prompt and four questions: the first request fills the prefix cache; the other
    three hit it (vLLM's own counter) and give the tokens of the same plugin with prefix caching off."""
    from kvcache.engine_adapters.vllm import inprocess

    llm.reset_prefix_cache()
    hits_before = counter(llm, "vllm:prefix_cache_hits")
    first = generate(llm, questions[:1])
    rest = generate(llm, questions[1:])
    hits = counter(llm, "vllm:prefix_cache_hits") - hits_before
    assert hits >= 3 * 8 * BLOCK  # each later request reused the system prompt's 8 full blocks
    assert inprocess.scheduler(llm).kv_stats["compactions"] >= 4  # and still compacted
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    arg = json.dumps([model_path(), ENGINE_KW, SETTINGS, [questions[:1], questions[1:]], 8])
    proc = subprocess.run([sys.executable, "-c", REFERENCE_SCRIPT, arg], capture_output=True, text=True, env=env,
                          timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert lines, proc.stderr[-3000:]
    reference = json.loads(lines[-1][6:])
    assert [first, rest] == reference
    check_blocks(llm)
    assert inprocess.free_blocks(llm) == BLOCKS - 1


@pytest.mark.e2e
def test_compaction_never_rewrites_cached_blocks(llm, questions):
    """The blocks in the prefix cache after the first request (its prompt's full blocks, the system prompt among
    them) hold the same keys and values, under the same hashes, after three requests that hit them were
    compacted (their kept tokens went into private blocks)."""
    from kvcache.engine_adapters.vllm import inprocess

    llm.reset_prefix_cache()
    generate(llm, questions[:1])
    cached = cached_blocks(llm)
    assert len(cached) >= 8
    ids = sorted(cached)
    before = block_contents(llm, ids)
    compactions = inprocess.scheduler(llm).kv_stats["compactions"]
    generate(llm, questions[1:])
    assert inprocess.scheduler(llm).kv_stats["compactions"] >= compactions + 3
    now = cached_blocks(llm)
    assert all(now.get(i) == cached[i] for i in ids)  # still cached under the same hashes
    assert all(a.equal(b) for a, b in zip(before, block_contents(llm, ids)))


@pytest.mark.e2e
def test_whole_prompt_cached_still_recomputes_the_scored_queries(llm, questions):
    """The same prompt twice: the second hits the cache but recomputes the queries SnapKV scores with, so it
    keeps the same tokens and gives the same output."""
    from kvcache.engine_adapters.vllm import inprocess

    llm.reset_prefix_cache()
    first = generate(llm, questions[:1])
    hits_before = counter(llm, "vllm:prefix_cache_hits")
    again = generate(llm, questions[:1])
    hits = counter(llm, "vllm:prefix_cache_hits") - hits_before
    planner = inprocess.scheduler(llm).kv_planner
    limit = planner.prefix_hit_limit("any", len(questions[0]), len(questions[0]))
    assert 0 < hits <= limit < len(questions[0])
    assert again == first


@pytest.mark.e2e
def test_aborts_in_the_middle_leak_nothing(llm, questions, tokenizer):
    """Requests sharing the prefix, stepped by hand; some aborted mid-prefill or mid-decode: reference counts
    stay exact after every step and the pool comes back whole."""
    from vllm import SamplingParams

    from kvcache.engine_adapters.vllm import inprocess

    llm.reset_prefix_cache()
    engine = llm.llm_engine
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    for i, prompt in enumerate(questions * 2):
        engine.add_request(f"soak-{i}", {"prompt_token_ids": prompt}, sp)
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
        check_blocks(llm)
        if steps == 2:
            engine.abort_request(["soak-1", "soak-6"])
        if steps == 6:
            engine.abort_request(["soak-3"])
        assert steps < 500
    check_blocks(llm)
    assert inprocess.free_blocks(llm) == BLOCKS - 1
    assert not inprocess.scheduler(llm)._kv_replaced


@pytest.mark.e2e
def test_chunk_evicted_prompt_with_a_cached_prefix_fits_its_admission(llm, questions, tokenizer, system_prompt):
    """A prompt longer than half the pool is evicted chunk by chunk; with the system prompt cached it takes at
    most C tokens from the cache, so before its first compaction it holds no more than the C + chunk its
    admission counted (taking the whole cached prefix could exceed the pool and wait forever)."""
    from kvcache.engine_adapters.vllm import inprocess

    llm.reset_prefix_cache()
    generate(llm, questions[:1])
    more = " ".join(f"The colour of crate {i} is number {(i * 131) % 977}." for i in range(150))
    long_prompt = system_prompt + tokenizer(" " + more + " Question: what is the code of box 3? Answer:",
                                            add_special_tokens=False)["input_ids"]
    sched = inprocess.scheduler(llm)
    assert sched.kv_planner.chunk_evicts(len(long_prompt))
    hits_before = counter(llm, "vllm:prefix_cache_hits")
    out = generate(llm, [long_prompt], max_tokens=4)
    hits = counter(llm, "vllm:prefix_cache_hits") - hits_before
    assert len(out[0]) == 4
    assert 0 < hits <= sched.kv_planner.default.plan.request(len(long_prompt)).capacity
    check_blocks(llm)
    assert inprocess.free_blocks(llm) == BLOCKS - 1
