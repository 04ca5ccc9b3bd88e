"""Fault suite of the vLLM plugin: no request hangs the engine, none gets silently wrong numbers, and every
request leaves the pool and the plugin's per-request state as it found them.

The setting of the adversarial review (issue 27): an in-process engine on the embedded model, SnapKV at
budget 0.25, a 10-block pool of 128 tokens (1,152 usable: block 0 is vLLM's null block), ``max_model_len``
2048 and 256 tokens per step. ``max_model_len`` exceeds the pool: the plugin's start-up check allows it
because prompts are evicted after each chunk, so it is the plugin's job that no request outgrows the pool.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.e2e

BLOCKS = 10
BLOCK = 128
POOL = (BLOCKS - 1) * BLOCK  # 1,152 tokens
BATCHED = 256
MAX_LEN = 2048
ENGINE_KW = dict(
    enforce_eager=True, max_model_len=MAX_LEN, dtype="float32", seed=0, num_gpu_blocks_override=BLOCKS,
    max_num_seqs=32, max_num_batched_tokens=BATCHED, gpu_memory_utilization=0.5,
)
SNAPKV = {"kv_policy": "snapkv", "kv_budget": 0.25}


def model_path() -> str:
    from kvcache.engine_adapters.hf.models import resolve_model

    return str(resolve_model("smollm2-135m"))


def document(n_items: int) -> str:
    facts = " ".join(f"The code of box {i} is {(i * 7919) % 9973}." for i in range(n_items))
    return facts + " Question: what is the code of box 3? Answer: The code of box 3 is"


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path())


@pytest.fixture(scope="module")
def llm():
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import gc

    from vllm import LLM

    gc.collect()  # another module's in-process engine, if still unreclaimed, must not tear down this one's state
    engine = LLM(model_path(), additional_config=dict(SNAPKV), **ENGINE_KW)
    yield engine
    del engine


@pytest.fixture
def engine(llm):
    """The module's engine with SnapKV 0.25, checked clean after the test."""
    from kvcache.engine_adapters.vllm import inprocess

    inprocess.reconfigure(llm, dict(SNAPKV))
    yield llm
    assert_clean(llm)


def configure(llm, **settings):
    from kvcache.engine_adapters.vllm import inprocess

    inprocess.reconfigure(llm, settings)
    return inprocess.scheduler(llm)


def params(**kw):
    from vllm import SamplingParams

    return SamplingParams(**{"temperature": 0, "ignore_eos": True, **kw})


def run(llm, requests, max_steps=4000, each_step=None):
    """Add ``{id: (prompt_ids, params)}`` and step the engine until they finish; {id: [completion outputs]}."""
    engine = llm.llm_engine
    for req_id, (prompt, sp) in requests.items():
        engine.add_request(req_id, {"prompt_token_ids": prompt}, sp)
    finished = {}
    for _ in range(max_steps):
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        if each_step is not None:
            each_step()
        if not engine.has_unfinished_requests():
            return finished
    raise AssertionError(f"requests still unfinished after {max_steps} steps: {sorted(set(requests) - set(finished))}")


def assert_clean(llm):
    """Every block back in the pool and no per-request state left in the plugin (scheduler and worker). The
    worker hears of finished requests at the next step, so one short request (kept whole: no state) runs first."""
    from kvcache.engine_adapters.vllm import inprocess

    run(llm, {"flush": ([1, 2, 3], params(max_tokens=1))})
    sched = inprocess.scheduler(llm)
    assert inprocess.free_blocks(llm) == BLOCKS - 1
    assert not sched.requests and not sched.running and not len(sched.waiting)
    if sched.kv_planner is not None:
        assert not sched.kv_planner.states and not sched.kv_planner.rules
    assert not sched._kv_preempted and not sched._kv_ending and not sched._kv_ended
    state = inprocess.model_runner(llm)._kvcache_state
    assert state is None or not state.requests


def test_request_outgrowing_the_pool_ends_with_length(engine, tok):
    """"Once upon a time" with 1,500 tokens: kept whole (too short to compress), it would hold 1,504 tokens in a
    1,152-token pool. It used to preempt itself and wait forever; its max_tokens is now capped at what the pool
    holds and it ends with "length". The next request is answered."""
    prompt = tok("Once upon a time")["input_ids"]
    out = run(engine, {"long": (prompt, params(max_tokens=1500))})["long"].outputs[0]
    assert out.finish_reason == "length"
    assert len(out.token_ids) == POOL - len(prompt)
    assert run(engine, {"next": (tok("The capital of France is")["input_ids"], params(max_tokens=4))})["next"].outputs[0].token_ids


def test_snapkv_request_is_capped_at_kept_prompt_plus_pool(engine, tok):
    """SnapKV keeps every generated token: a compressed prompt's cap is the pool less its C kept tokens."""
    from kvcache.engine_adapters.vllm import inprocess

    prompt = tok(document(40))["input_ids"]
    capacity = inprocess.scheduler(engine).kv_planner.plan.request(len(prompt)).capacity
    assert capacity < len(prompt)
    out = run(engine, {"capped": (prompt, params(max_tokens=MAX_LEN - len(prompt)))})["capped"].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == POOL - capacity


def test_a_request_that_cannot_grow_alone_ends_with_length_instead_of_waiting(engine, tok):
    """The last guard, with the max_tokens cap switched off: a request kept whole (budget 1.0) grows until the
    pool is full, preempts itself with nothing else to free, and ends with "length" instead of waiting for
    blocks that never come. Its cache then holds the whole pool (the last sampled token needs no slot)."""
    sched = configure(engine, kv_policy="snapkv", kv_budget=1.0)
    sched.kv_planner.max_new_tokens = lambda *args: None
    prompt = tok(document(70))["input_ids"]
    out = run(engine, {"stuck": (prompt, params(max_tokens=400))})["stuck"].outputs[0]
    assert out.finish_reason == "length"
    assert len(out.token_ids) == POOL - len(prompt) + 1
    assert sched.kv_stats["preemptions"] >= 1


def prompt_logprobs(llm, prompt):
    from vllm import SamplingParams

    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0),
                       use_tqdm=False)[0]
    return [next(iter(lp.values())).logprob for lp in out.prompt_logprobs[1:]]


def test_prompt_logprobs_equal_the_full_cache(engine, tok):
    """A prompt longer than half the pool is evicted chunk by chunk, and later chunks attend only to the kept
    tokens (2.25 nats off before). A request asking for prompt logprobs is prefilled whole instead (compacted
    once, at its end), so its logprobs are the full cache's."""
    prompt = tok(document(75))["input_ids"]
    assert POOL // 2 < len(prompt) <= POOL and len(prompt) > 2 * BATCHED
    sched = configure(engine, kv_policy="snapkv", kv_budget=1.0)
    full = prompt_logprobs(engine, prompt)
    sched = configure(engine, **SNAPKV)
    assert sched.kv_planner.chunk_evicts(len(prompt))  # without prompt logprobs this prompt is chunk-evicted
    evicted = prompt_logprobs(engine, prompt)
    assert len(evicted) == len(full) == len(prompt) - 1
    assert max(abs(a - b) for a, b in zip(evicted, full)) <= 0.05


def test_prompt_logprobs_of_a_prompt_the_pool_cannot_hold_are_refused(engine, tok):
    from vllm.exceptions import VLLMValidationError

    prompt = tok(document(120))["input_ids"]
    assert POOL < len(prompt) < MAX_LEN
    with pytest.raises(VLLMValidationError, match="prompt_logprobs.*pool holds 1152"):
        prompt_logprobs(engine, prompt)
    # the same prompt without prompt logprobs is served (evicted after each chunk)
    assert len(engine.generate([{"prompt_token_ids": prompt}], params(max_tokens=3), use_tqdm=False)[0].outputs[0].token_ids) == 3


def test_a_request_ending_at_its_prompt_is_not_compacted(engine, tok):
    """max_tokens=1: the token sampled at the end of the prompt is the last one, so the prompt is neither
    captured for scoring nor compacted (was: scored, compacted and counted)."""
    from kvcache.engine_adapters.vllm import inprocess

    sched = configure(engine, **SNAPKV, kv_chunk_evict=False)
    prompt = tok(document(40))["input_ids"]
    before = dict(sched.kv_stats)
    out = run(engine, {"one": (prompt, params(max_tokens=1))})["one"].outputs[0]
    assert len(out.token_ids) == 1
    assert sched.kv_stats["compactions"] == before["compactions"]
    assert sched.kv_stats["tokens_evicted"] == before["tokens_evicted"]
    assert inprocess.model_runner(engine)._kvcache_state.stats["compactions"] == 0
    # the same request with two tokens is compacted once, at its prompt
    run(engine, {"two": (prompt, params(max_tokens=2))})
    assert sched.kv_stats["compactions"] == before["compactions"] + 1


@pytest.mark.parametrize("policy", ["snapkv", "h2o"])
@pytest.mark.parametrize("stage", ["prefill", "compacted", "decode"])
def test_abort_at_each_stage_returns_everything(engine, tok, policy, stage):
    """Aborted mid-prefill (between chunks), right after the prompt compaction, or mid-decode (after decode
    re-compactions for H2O): the blocks come back and no plugin state is left (checked by the fixture)."""
    from kvcache.engine_adapters.vllm import inprocess

    sched = configure(engine, kv_policy=policy, kv_budget=0.25, kv_recompact_every=4)
    prompt = tok(document(75))["input_ids"]
    engine.llm_engine.add_request("victim", {"prompt_token_ids": prompt}, params(max_tokens=64))
    engine.llm_engine.add_request("bystander", {"prompt_token_ids": tok(document(10))["input_ids"]}, params(max_tokens=8))

    def reached() -> bool:
        request = next((r for rid, r in sched.requests.items() if rid.startswith("victim")), None)
        if request is None:
            return False
        if stage == "prefill":
            return 0 < request.num_computed_tokens < len(prompt)
        if stage == "compacted":
            return request.num_output_tokens >= 1
        return request.num_output_tokens >= 20

    for _ in range(200):
        engine.llm_engine.step()
        if reached():
            break
    else:
        raise AssertionError(f"the request never reached the {stage} stage")
    if stage != "prefill":
        assert sched.kv_stats["compactions"] >= 1
    engine.llm_engine.abort_request(["victim"])
    while engine.llm_engine.has_unfinished_requests():
        engine.llm_engine.step()
    assert not [rid for rid in inprocess.request_blocks(engine) if rid.startswith("victim")]


def test_preemption_and_resume_leave_nothing_behind(engine, tok):
    """vLLM's own (optimistic) admission on a tiny pool: requests grow into each other, are preempted and
    recomputed; all finish with their full length."""
    sched = configure(engine, **SNAPKV, kv_admission="optimistic", kv_chunk_evict=False)
    before = sched.kv_stats["preemptions"]
    prompt = tok(document(30))["input_ids"]
    done = run(engine, {f"p{i}": (prompt, params(max_tokens=200)) for i in range(5)})
    assert sched.kv_stats["preemptions"] > before
    assert all(len(o.outputs[0].token_ids) == 200 for o in done.values())


def test_full_pool_with_32_waiting_requests(engine, tok):
    """32 requests at once on a pool that holds a few: they wait their turn, none is lost."""
    prompts = [tok(f"[{i}] " + document(20))["input_ids"] for i in range(32)]
    assert sum(len(p) for p in prompts) > 4 * POOL
    done = run(engine, {f"w{i}": (p, params(max_tokens=6)) for i, p in enumerate(prompts)})
    assert len(done) == 32 and all(len(o.outputs[0].token_ids) == 6 for o in done.values())


def test_parallel_sampling_n_greater_than_one(engine, tok):
    prompt = tok(document(40))["input_ids"]
    out = engine.generate([{"prompt_token_ids": prompt}], params(n=3, temperature=0.8, seed=3, max_tokens=10),
                          use_tqdm=False)[0]
    assert len(out.outputs) == 3 and all(len(c.token_ids) == 10 for c in out.outputs)


def test_stop_strings_end_compressed_requests(engine, tok):
    from vllm import SamplingParams

    prompt = tok(document(40))["input_ids"]
    sp = SamplingParams(temperature=0, max_tokens=64, stop=["."], include_stop_str_in_output=True)
    out = run(engine, {"stop": (prompt, sp)})["stop"].outputs[0]
    assert out.finish_reason == "stop" and out.text.endswith(".")
    assert len(out.token_ids) < 64


# ------------------------------------------------------------------------------------------------
# The same cases through `kvcache serve` (OpenAI API) on the review's small pool


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    from test_vllm_serve import serving

    log = tmp_path_factory.mktemp("faults") / "server.log"
    args = [
        "smollm2-135m", "--kv-policy", "snapkv", "--kv-budget", "0.25", "--dtype", "float32",
        "--num-gpu-blocks-override", str(BLOCKS), "--max-model-len", str(MAX_LEN), "--max-num-batched-tokens", str(BATCHED),
    ]
    with serving(args, log) as port:
        yield port, log


def complete(port: int, timeout: float = 600, **body) -> tuple[int, dict]:
    """POST /v1/completions; (HTTP status, JSON body) for errors too. The timeout is the guard against a hang."""
    from test_vllm_serve import post_status

    return post_status(port, "/v1/completions", {"model": "smollm2-135m", "temperature": 0, **body}, timeout=timeout)


def test_serve_a_request_outgrowing_the_pool_returns_with_length(small_server):
    port, log = small_server
    status, reply = complete(port, prompt="Once upon a time", max_tokens=1500, ignore_eos=True)
    assert status == 200 and reply["choices"][0]["finish_reason"] == "length"
    assert reply["usage"]["completion_tokens"] < 1500
    assert "max_tokens 1500 capped" in log.read_text()
    status, reply = complete(port, prompt="The capital of France is", max_tokens=4)
    assert status == 200 and reply["choices"][0]["text"]


def test_serve_prompt_logprobs_past_the_pool_get_a_400_and_the_server_goes_on(small_server):
    port, _ = small_server
    status, reply = complete(port, prompt=document(120), max_tokens=1, prompt_logprobs=0)
    assert status == 400, reply
    assert "prompt_logprobs" in json_text(reply) and "pool holds 1152" in json_text(reply)
    # a prompt that fits the pool whole (but would be chunk-evicted without prompt logprobs): the full cache's
    # logprobs, compared with the same request opting out of eviction (kv_budget 1.0 through vllm_xargs)
    status, reply = complete(port, prompt=document(75), max_tokens=1, prompt_logprobs=0)
    status_full, full = complete(port, prompt=document(75), max_tokens=1, prompt_logprobs=0, vllm_xargs={"kv_budget": 1.0})
    assert status == status_full == 200

    def values(r):
        return [next(iter(lp.values()))["logprob"] for lp in r["choices"][0]["prompt_logprobs"][1:]]

    assert len(values(reply)) == len(values(full)) > POOL // 2
    assert max(abs(a - b) for a, b in zip(values(reply), values(full))) <= 0.05
    status, reply = complete(port, prompt=document(120), max_tokens=2)  # the same long prompt without them
    assert status == 200 and reply["usage"]["completion_tokens"] == 2


def json_text(reply: dict) -> str:
    import json

    return json.dumps(reply)
