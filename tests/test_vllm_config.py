"""The vLLM plugin's settings and per-step eviction rule (no vLLM needed)."""

from __future__ import annotations

import argparse

import pytest

from kvcache.engine_adapters.vllm import config as kvconfig
from kvcache.engine_adapters.vllm.config import KVPluginError
from kvcache.engine_adapters.vllm.plan import Planner, StepPlan


def test_inert_without_policy():
    assert kvconfig.parse(None) is None
    assert kvconfig.parse({}) is None
    assert kvconfig.parse({"kv_policy": None, "something_else": 1}) is None


def test_settings_without_policy_are_an_error():
    with pytest.raises(KVPluginError, match="without kv_policy"):
        kvconfig.parse({"kv_budget": 0.25})


def test_parse_policy_budget_window():
    cfg = kvconfig.parse({"kv_policy": "snapkv:kernel=5", "kv_budget": "0.25", "kv_window": "16"})
    assert cfg.budget == 0.25 and cfg.window == 16
    policy = cfg.create_policy()
    assert type(policy).__name__ == "SnapKV" and policy.kernel == 5 and policy.window == 16
    assert cfg.create_plan().request(1000).capacity == 250
    assert kvconfig.parse({"kv_policy": "keyformer", "kv_budget": "512"}).create_plan().request(300).capacity == 300
    spec = {"name": "h2o", "window": 0.25}
    assert kvconfig.parse({"kv_policy": '{"name": "h2o", "window": 0.25}'}).policy_spec == spec


def test_unknown_policy_names_valid_ones():
    with pytest.raises(KVPluginError, match="valid evict policies: .*snapkv"):
        kvconfig.parse({"kv_policy": "nope"})


def test_bad_budget():
    with pytest.raises(Exception, match="budget"):
        kvconfig.parse({"kv_policy": "snapkv", "kv_budget": "1.5"})


@pytest.mark.parametrize("layer_budget", ["pyramid", "cake", "pyramid:beta=10"])
def test_layer_budgets_refused_naming_hf_adapter(layer_budget):
    with pytest.raises(KVPluginError) as err:
        kvconfig.parse({"kv_policy": "snapkv", "kv_layer_budget": layer_budget})
    assert "not supported in vLLM" in str(err.value) and "kvcache.engine_adapters.hf" in str(err.value)


def test_uniform_layer_budget_and_unknown_layer_budget():
    assert kvconfig.parse({"kv_policy": "snapkv", "kv_layer_budget": "uniform"}) is not None  # uniform is what vLLM does
    with pytest.raises(KVPluginError, match="valid budget policies"):
        kvconfig.parse({"kv_policy": "snapkv", "kv_layer_budget": "zigzag"})


def test_quant_refused():
    with pytest.raises(KVPluginError, match="kv-quant"):
        kvconfig.parse({"kv_policy": "snapkv", "kv_quant": "kivi"})


def test_token_budget_smaller_than_protected_window():
    with pytest.raises(KVPluginError, match="raise the budget"):
        kvconfig.parse({"kv_policy": "snapkv", "kv_budget": "8"})  # snapkv keeps its 32-token window


@pytest.mark.parametrize("version,ok", [("0.32.0", True), ("0.32.3", True), ("0.31.1", False), ("0.33.0", False), ("1.0.0", False)])
def test_version_pin(version, ok):
    if ok:
        kvconfig.check_vllm_version(version)
    else:
        with pytest.raises(KVPluginError, match=r"supports vLLM >=0.32,<0.33"):
            kvconfig.check_vllm_version(version)


def test_fold_cli_args_flags_win():
    merged = kvconfig.fold_cli_args('{"kv_policy": "h2o", "other": 1}', {"kv_policy": "snapkv", "kv_budget": None})
    assert merged == {"kv_policy": "snapkv", "other": 1}


def test_add_kv_arguments_to_a_parser():
    from kvcache.engine_adapters.vllm.plugin import add_kv_arguments, fold_namespace

    parser = add_kv_arguments(argparse.ArgumentParser())
    add_kv_arguments(parser)  # idempotent
    args = parser.parse_args(["--kv-policy", "keyformer", "--kv-budget", "0.5", "--kv-recompact-every", "8"])
    folded = fold_namespace({}, args)
    assert folded == {"kv_policy": "keyformer", "kv_budget": "0.5", "kv_recompact_every": 8}
    cfg = kvconfig.parse(folded)
    assert cfg.recompact_every == 8 and cfg.budget == 0.5
    args = parser.parse_args(["--kv-policy", "h2o", "--kv-chunk-evict", "false", "--kv-admission", "optimistic"])
    cfg = kvconfig.parse(fold_namespace({"kv_admission": "reserve"}, args))  # flags win over the JSON
    assert cfg.chunk_evict is False and cfg.admission == "optimistic"


# ------------------------------------------------------------------------------------------------
# The per-step plan: the scheduler's rule, which the worker follows


def run_prefill(planner, req, prompt_len, chunk, max_new=8):
    """Schedule the prompt in chunks; returns the plans."""
    plans, done = [], 0
    while done < prompt_len:
        n = min(chunk, prompt_len - done)
        done += n
        plan = StepPlan()
        planner.plan_request(plan, req, n, done, prompt_len, prompt_len, max_new)
        plans.append(plan)
    return plans


def test_snapkv_compacts_once_at_end_of_prefill():
    planner = Planner(kvconfig.parse({"kv_policy": "snapkv", "kv_budget": 0.25, "kv_chunk_evict": False}))
    plans = run_prefill(planner, "r", 400, chunk=128)
    assert [bool(p.compact) for p in plans] == [False, False, False, True]
    c = plans[-1].compact["r"]
    assert (c.target, c.physical, c.logical, c.phase, c.recent) == (100, 400, 400, "prefill", 32)
    # every prefill chunk captures at most the observation window of queries
    assert [p.capture["r"] for p in plans] == [32, 32, 32, 16]
    # decode: the shift makes physical = logical - 300; snapkv appends without recompaction or capture
    for t in range(1, 40):
        plan = StepPlan()
        planner.plan_request(plan, "r", 1, 400 + t, 400 + t, 400, 8)
        assert plan.shift == {"r": 300} and not plan.compact and not plan.capture


def test_prompt_within_budget_never_compacts():
    planner = Planner(kvconfig.parse({"kv_policy": "snapkv", "kv_budget": 1.0}))
    plans = run_prefill(planner, "r", 300, chunk=512)
    assert not plans[-1].compact and not plans[-1].shift
    planner = Planner(kvconfig.parse({"kv_policy": "h2o", "kv_budget": "512"}))
    plans = run_prefill(planner, "r", 300, chunk=512)
    assert not plans[-1].compact


def test_decode_time_policy_recompacts_every_k():
    planner = Planner(kvconfig.parse({"kv_policy": "h2o", "kv_budget": 0.5, "kv_recompact_every": 4}))
    plans = run_prefill(planner, "r", 200, chunk=256)
    assert plans[-1].compact["r"].target == 100
    compactions = []
    for t in range(1, 13):
        plan = StepPlan()
        planner.plan_request(plan, "r", 1, 200 + t, 200 + t, 200, 64)
        assert plan.capture == {"r": 1} and "r" in plan.decode_capture
        if plan.compact:
            c = plan.compact["r"]
            compactions.append((t, c.physical, c.target, c.phase, c.step))
    # physical length runs 100 -> 104, back to 100, every 4 generated tokens
    assert compactions == [(4, 104, 100, "decode", 4), (8, 104, 100, "decode", 8), (12, 104, 100, "decode", 12)]


def test_chunked_prefill_compresses_after_each_chunk():
    planner = Planner(kvconfig.parse({"kv_policy": "snapkv", "kv_budget": 0.25, "kv_chunk_evict": True}))
    plans = run_prefill(planner, "r", 1000, chunk=256)
    phases = [(p.compact["r"].phase, p.compact["r"].physical, p.compact["r"].target) for p in plans if p.compact]
    # budget 250: after every chunk the cache is squeezed back to 250 (peak = budget + chunk)
    assert phases == [("chunk", 256, 250), ("chunk", 506, 250), ("chunk", 506, 250), ("prefill", 482, 250)]
    assert max(c[1] for c in phases) <= 250 + 256


def test_auto_chunk_eviction_only_for_prompts_longer_than_half_the_pool():
    """Scoring a prompt chunk sees that chunk's last queries, not the question at the prompt's end: by
    default only a prompt that would hold more than half the KV pool is evicted chunk by chunk."""
    cfg = kvconfig.parse({"kv_policy": "snapkv", "kv_budget": 0.25})
    assert cfg.chunk_evict is None and cfg.as_dict()["kv_chunk_evict"] == "auto"
    planner = Planner(cfg, pool_tokens=1800)
    assert not planner.chunk_evicts(900) and planner.chunk_evicts(901)
    short = run_prefill(planner, "short", 900, chunk=256)
    assert [p.compact["short"].phase for p in short if p.compact] == ["prefill"]
    long = run_prefill(planner, "long", 1000, chunk=256)
    assert [p.compact["long"].phase for p in long if p.compact] == ["chunk", "chunk", "chunk", "prefill"]
    assert not Planner(cfg).chunk_evicts(10**6)  # pool unknown: never mid-prompt
    assert Planner(kvconfig.parse({"kv_policy": "snapkv", "kv_chunk_evict": "true"}), 1800).chunk_evicts(10)
    with pytest.raises(kvconfig.KVPluginError, match="kv_chunk_evict"):
        kvconfig.parse({"kv_policy": "snapkv", "kv_chunk_evict": "sometimes"})


def test_preempted_request_starts_over():
    planner = Planner(kvconfig.parse({"kv_policy": "snapkv", "kv_budget": 0.25, "kv_chunk_evict": False}))
    run_prefill(planner, "r", 400, chunk=512)
    assert planner.shift("r") == 300
    planner.forget("r")
    assert planner.shift("r") == 0
    # recompute of prompt + 10 generated tokens: snapkv keeps the budget plus the generated tokens
    plan = StepPlan()
    planner.plan_request(plan, "r", 410, 410, 410, 400, 32)
    c = plan.compact["r"]
    assert (c.target, c.recent, c.step) == (110, 42, 10)


def test_observation_follows_the_policys_declaration():
    """SnapKV observes its window; StreamingLLM no query at all; H2O every prompt query, of which vLLM holds
    the last MAX_OBSERVED and says so."""
    from kvcache.engine_adapters.vllm.plan import MAX_OBSERVED

    snap = run_prefill(Planner(kvconfig.parse({"kv_policy": "snapkv:window=16", "kv_budget": 0.25})), "r", 400, chunk=512)
    assert snap[-1].capture["r"] == 16 and snap[-1].observe["r"] == 16
    streaming = Planner(kvconfig.parse({"kv_policy": "streaming", "kv_budget": 0.25}))
    plans = run_prefill(streaming, "r", 400, chunk=512)
    assert not plans[-1].capture and plans[-1].compact["r"].target == 100
    plan = StepPlan()
    streaming.plan_request(plan, "r", 1, 401, 401, 400, 8)
    assert not plan.capture  # position-only: no decode queries either
    assert streaming.observation_note is None
    h2o = Planner(kvconfig.parse({"kv_policy": "h2o", "kv_budget": 0.25}))
    assert run_prefill(h2o, "r", 400, chunk=512)[-1].capture["r"] == MAX_OBSERVED
    assert "every prompt query" in h2o.observation_note and str(MAX_OBSERVED) in h2o.observation_note


def test_a_prompt_too_short_for_the_policy_is_left_whole_as_in_hf():
    planner = Planner(kvconfig.parse({"kv_policy": "snapkv", "kv_budget": 0.5}))
    plans = run_prefill(planner, "r", 40, chunk=512)  # 20 tokens cannot hold the 32-token window
    assert not plans[-1].compact and not plans[-1].capture and planner.shift("r") == 0


def test_full_policy_never_plans():
    planner = Planner(kvconfig.parse({"kv_policy": "full"}))
    plans = run_prefill(planner, "r", 400, chunk=128)
    assert not any(p.compact or p.capture for p in plans)


def test_auto_recompaction_fills_the_last_block_of_the_kept_tokens():
    """Compacting before the request's last block is full frees nothing, and compacting after it took a
    block holds one more: "auto" re-compacts when the block the C kept tokens end in is full (when it has
    at least 4 free slots; else it takes one more block and re-compacts when that one is full)."""
    cfg = kvconfig.parse({"kv_policy": "h2o", "kv_budget": 0.5})
    assert cfg.recompact_every is None and cfg.as_dict()["kv_recompact_every"] == "auto"
    assert kvconfig.recompact_tokens(cfg, 230, 128) == 26  # C + 26 = 256: stays in two blocks
    assert kvconfig.recompact_tokens(cfg, 242, 128) == 14  # sooner than 16, which would take a third block
    assert kvconfig.recompact_tokens(cfg, 250, 128) == 6  # 250 + 6 = 256: two blocks, not three
    assert kvconfig.recompact_tokens(cfg, 253, 128) == 3 + 128  # 3 free slots: fill a third block
    assert kvconfig.recompact_tokens(cfg, 130, 128) == 126
    assert kvconfig.recompact_tokens(cfg, 230, None) == 16
    explicit = kvconfig.parse({"kv_policy": "h2o", "kv_budget": 0.5, "kv_recompact_every": "8"})
    assert kvconfig.recompact_tokens(explicit, 230, 128) == 8
    planner = Planner(cfg, pool_tokens=4096, block_size=128)
    run_prefill(planner, "r", 460, chunk=512)  # C = 230
    steps = []
    for t in range(1, 60):
        plan = StepPlan()
        planner.plan_request(plan, "r", 1, 460 + t, 460 + t, 460, 64)
        if plan.compact:
            steps.append((t, plan.compact["r"].physical))
    assert steps == [(26, 256), (52, 256)]


def test_planned_blocks_is_the_largest_footprint_after_the_prompt_compaction():
    """What ``kv_admission=reserve`` reserves: SnapKV keeps C = 250 of a 1000-token prompt and appends
    every generated token (250 + 256 = 506 tokens: 4 blocks of 128); H2O re-compacts back to C after k
    tokens (auto: k = 6 fills the second block; C = 253 leaves 3 free slots, so k = 131 fills a third);
    never more than the whole request; None when the prompt is kept whole or the block size is unknown."""
    snap = Planner(kvconfig.parse({"kv_policy": "snapkv", "kv_budget": 0.25}), 8192, 128)
    assert snap.planned_blocks("a", 1000, 256) == 4
    assert snap.planned_blocks("a", 1000, 2000) == 18  # ceil(2250 / 128)
    h2o = Planner(kvconfig.parse({"kv_policy": "h2o", "kv_budget": 0.25}), 8192, 128)
    assert h2o.planned_blocks("a", 1000, 256) == 2
    assert h2o.planned_blocks("b", 1012, 256) == 3
    assert h2o.planned_blocks("b", 1012, 2) == 2  # 255 tokens
    every8 = Planner(kvconfig.parse({"kv_policy": "h2o", "kv_budget": 0.25, "kv_recompact_every": 8}), 8192, 128)
    assert every8.planned_blocks("a", 1000, 256) == 3  # 258 tokens
    whole = Planner(kvconfig.parse({"kv_policy": "snapkv", "kv_budget": 1.0}), 8192, 128)
    assert whole.planned_blocks("a", 1000, 256) is None
    assert Planner(kvconfig.parse({"kv_policy": "snapkv", "kv_budget": 0.25})).planned_blocks("a", 1000, 256) is None


def test_admission_setting():
    assert kvconfig.parse({"kv_policy": "snapkv"}).admission == "reserve"
    cfg = kvconfig.parse({"kv_policy": "snapkv", "kv_admission": "Optimistic"})
    assert cfg.admission == "optimistic" and cfg.as_dict()["kv_admission"] == "optimistic"
    with pytest.raises(KVPluginError, match="kv_admission must be reserve or optimistic"):
        kvconfig.parse({"kv_policy": "snapkv", "kv_admission": "greedy"})
    with pytest.raises(KVPluginError, match="without kv_policy"):
        kvconfig.parse({"kv_admission": "reserve"})


# ------------------------------------------------------------------------------------------------
# Growth, prompt logprobs and requests that end at their prompt (the fault cases of issue 27)


def test_max_new_tokens_keeps_a_request_inside_the_pool():
    """A request kept whole holds prompt + generated tokens, a one-shot policy C + generated tokens; a
    decode-time policy re-compacts to C + k and is not capped."""
    snapkv = Planner(kvconfig.parse({"kv_policy": "snapkv", "kv_budget": 0.25}), pool_tokens=1152, block_size=128)
    assert snapkv.max_new_tokens(4) == 1152 - 4  # "Once upon a time": too short to compress, kept whole
    assert snapkv.max_new_tokens(1000) == 1152 - 250  # C = 250 kept prompt tokens
    assert snapkv.max_new_tokens(2000) == 1152 - 500
    h2o = Planner(kvconfig.parse({"kv_policy": "h2o", "kv_budget": 0.25}), pool_tokens=1152, block_size=128)
    assert h2o.max_new_tokens(1000) is None
    streaming = Planner(kvconfig.parse({"kv_policy": "streaming", "kv_budget": 0.25}), pool_tokens=1152, block_size=128)
    assert streaming.max_new_tokens(1000) is None
    assert streaming.max_new_tokens(4) == 1152 - 4  # shorter than its sinks: kept whole, grows like any request
    assert Planner(kvconfig.parse({"kv_policy": "snapkv"})).max_new_tokens(1000) is None  # pool unknown


def test_prompt_logprobs_requests_are_never_chunk_evicted_and_refused_past_the_pool():
    planner = Planner(kvconfig.parse({"kv_policy": "snapkv", "kv_budget": 0.25, "kv_chunk_evict": True}), 1152, 128)
    assert planner.chunk_evicts(1000) and not planner.chunk_evicts(1000, prompt_logprobs=True)
    plans = []
    for done in (256, 512, 768, 1000):
        plan = StepPlan()
        planner.plan_request(plan, "r", 256, done, 1000, 1000, 8, prompt_logprobs=True)
        plans.append(plan)
    assert [p.compact["r"].phase for p in plans if p.compact] == ["prefill"]  # once, after the whole prompt
    assert planner.prompt_logprobs_refusal(1152) is None
    message = planner.prompt_logprobs_refusal(1153)
    assert "1153 tokens" in message and "pool holds 1152" in message and "drop prompt_logprobs" in message


def test_a_request_finishing_at_its_prompt_is_neither_captured_nor_compacted():
    planner = Planner(kvconfig.parse({"kv_policy": "snapkv", "kv_budget": 0.25, "kv_chunk_evict": False}))
    plan = StepPlan()
    planner.plan_request(plan, "r", 400, 400, 400, 400, 1, finishes=True)
    assert not plan.compact and not plan.capture
    h2o = Planner(kvconfig.parse({"kv_policy": "h2o", "kv_budget": 0.5, "kv_recompact_every": 4}))
    run_prefill(h2o, "r", 200, chunk=256)
    for t in range(1, 4):
        h2o.plan_request(StepPlan(), "r", 1, 200 + t, 200 + t, 200, 4)
    last = StepPlan()  # the 4th generated token is the last: the re-compaction due at it is skipped
    h2o.plan_request(last, "r", 1, 204, 204, 200, 4, finishes=True)
    assert not last.compact and not last.capture
    # a mid-prompt chunk is still compacted (the prompt must fit), whatever follows
    chunked = Planner(kvconfig.parse({"kv_policy": "snapkv", "kv_budget": 0.25, "kv_chunk_evict": True}))
    first = StepPlan()
    chunked.plan_request(first, "r", 512, 512, 1000, 1000, 1, finishes=True)
    assert first.compact["r"].phase == "chunk"


def test_captured_query_rows_are_copied_out_of_the_steps_buffer():
    """A request's captured rows must not be a view into the step's capture store, which holds every
    request's rows of every layer."""
    import torch

    from kvcache.engine_adapters.vllm.worker import WorkerKV

    state = WorkerKV(kvconfig.parse({"kv_policy": "snapkv", "kv_budget": 0.25}))
    store = torch.randn(3, 5, 9, 4)  # [L, rows, H_q, D]: request a has rows 0-1, b rows 2-4
    captured = {"store": store, "owners": [("a", 0, 2, 10), ("b", 2, 3, 20)]}
    state._store_captures(captured, StepPlan(observe={"a": 32, "b": 32}))
    for req_id, rows in (("a", slice(0, 2)), ("b", slice(2, 5))):
        queries = state.requests[req_id].queries
        assert torch.equal(queries, store[:, rows].transpose(1, 2))
        assert queries.untyped_storage().data_ptr() != store.untyped_storage().data_ptr()
        assert queries.untyped_storage().nbytes() == queries.numel() * queries.element_size()
    assert state.requests["b"].query_pos.tolist() == [20, 21, 22]


# ------------------------------------------------------------------------------------------------
# Per-request settings (SamplingParams.extra_args; vllm_xargs in the OpenAI API)


def test_request_overrides_pick_the_kv_keys_and_refuse_unknown_ones():
    assert kvconfig.request_overrides(None) == () and kvconfig.request_overrides({"other": 1}) == ()
    assert kvconfig.request_overrides({"kv_budget": 0.5, "kv_policy": "h2o", "top": 2}) == (
        ("kv_budget", 0.5), ("kv_policy", "h2o"),
    )
    with pytest.raises(KVPluginError, match="unknown per-request kv setting kv_bugdet; a request may set kv_policy, kv_budget, kv_window"):
        kvconfig.request_overrides({"kv_bugdet": 0.5})
    with pytest.raises(KVPluginError, match="kv_budget must be a number or a string"):
        kvconfig.request_overrides({"kv_budget": [0.5]})


def test_a_request_config_is_the_servers_with_its_own_settings():
    server = kvconfig.parse({"kv_policy": "snapkv:window=16", "kv_budget": 0.25, "kv_window": 8, "kv_recompact_every": 4})
    assert server.for_request(()) is server
    half = server.for_request((("kv_budget", 0.5),))
    assert (half.policy_spec, half.budget, half.window, half.recompact_every) == ("snapkv:window=16", 0.5, 8, 4)
    other = server.for_request((("kv_policy", "h2o"),))  # another policy: its own defaults, not the server's window
    assert (other.policy_name, other.budget, other.window) == ("h2o", 0.25, None)
    assert server.for_request((("kv_budget", "1.0"),)).create_plan().keeps_everything  # opting out
    for overrides, message in [
        ((("kv_budget", 7.5),), "invalid per-request setting"),
        ((("kv_policy", "nope"),), "per-request kv_policy.*snapkv"),
        ((("kv_budget", 7),), "per-request kv_budget 7"),  # 7 tokens cannot hold snapkv's window
        ((("kv_policy", "none"),), "must name a policy"),
    ]:
        with pytest.raises(KVPluginError, match=message):
            server.for_request(overrides)


def test_server_limits_on_what_requests_may_ask():
    any_policy = kvconfig.parse({"kv_policy": "snapkv", "kv_budget": 0.25})
    any_policy.check_request(any_policy.for_request((("kv_policy", "h2o"), ("kv_budget", 0.05))), 1000)
    limited = kvconfig.parse({
        "kv_policy": "snapkv", "kv_budget": 0.25, "kv_request_policies": "streaming,full", "kv_request_min_budget": 0.2,
    })
    assert limited.request_policies == ("streaming", "full") and limited.as_dict()["kv_request_min_budget"] == 0.2
    limited.check_request(limited.for_request((("kv_policy", "streaming"),)), 1000)
    limited.check_request(limited.for_request((("kv_budget", 1.0),)), 1000)  # the full cache is always allowed
    limited.check_request(limited.for_request((("kv_budget", 200),)), 1000)  # 200 tokens = 0.2 of this prompt
    with pytest.raises(KVPluginError, match="kv_policy 'h2o' is not allowed on this server; allowed: full, snapkv, streaming"):
        limited.check_request(limited.for_request((("kv_policy", "h2o"),)), 1000)
    with pytest.raises(KVPluginError, match=r"kv_budget 0.1 keeps 100 of this prompt's 1000 tokens, below .* 0.2 \(200 tokens"):
        limited.check_request(limited.for_request((("kv_budget", 0.1),)), 1000)
    closed = kvconfig.parse({"kv_policy": "snapkv", "kv_request_policies": "none"})
    closed.check_request(closed.for_request(()), 1000)
    with pytest.raises(KVPluginError, match="takes no per-request kv settings"):
        closed.check_request(closed.for_request((("kv_budget", 0.5),)), 1000)
    with pytest.raises(KVPluginError, match="kv_request_policies.*snapkv"):
        kvconfig.parse({"kv_policy": "snapkv", "kv_request_policies": "snapkv,bogus"})
    with pytest.raises(KVPluginError, match="kv_request_min_budget|budget"):
        kvconfig.parse({"kv_policy": "snapkv", "kv_request_min_budget": "lots"})


def test_each_request_follows_its_own_rule():
    """Two requests of one prompt with budgets 0.25 and 0.5, and one naming StreamingLLM: each is planned with
    its own capacity, policy and re-compaction; the settings survive a preemption and go with the request."""
    planner = Planner(kvconfig.parse({"kv_policy": "snapkv", "kv_budget": 0.25, "kv_chunk_evict": False}), 4096, 128)
    planner.assign("half", (("kv_budget", 0.5),))
    planner.assign("stream", kvconfig.request_overrides({"kv_policy": "streaming", "kv_budget": 0.25}))
    assert planner.assign("plain", ()) is planner.default and "plain" not in planner.rules
    targets = {}
    for req in ("plain", "half", "stream"):
        plans = run_prefill(planner, req, 400, chunk=512)
        c = plans[-1].compact[req]
        targets[req] = (c.target, c.policy, c.overrides)
    assert targets == {
        "plain": (100, "snapkv", ()),
        "half": (200, "snapkv", (("kv_budget", 0.5),)),
        "stream": (100, "streaming", (("kv_budget", 0.25), ("kv_policy", "streaming"))),
    }
    assert planner.max_new_tokens(400, planner.rule("half")) == 4096 - 200
    assert planner.max_new_tokens(400, planner.rule("stream")) is None  # re-compacts: bounded
    planner.forget("half")  # preempted: eviction state gone, settings kept
    assert planner.rule("half").cfg.budget == 0.5
    planner.release("half")
    assert planner.rule("half") is planner.default and "half" not in planner.states


def test_settings_of_ever_new_requests_do_not_grow_the_caches():
    """A client sending a new budget with every request must not grow the scheduler's or the worker's memory:
    the objects made for per-request settings are kept for the last few distinct ones only, while a live
    request holds its own rule."""
    from kvcache.engine_adapters.vllm.worker import WorkerKV

    planner = Planner(kvconfig.parse({"kv_policy": "snapkv", "kv_budget": 0.25}), 4096, 128)
    worker = WorkerKV(planner.cfg)
    for i in range(500):
        overrides = (("kv_budget", 0.2 + i / 10000),)
        planner.assign(f"r{i}", overrides)
        worker.policy_for(overrides)
        if i % 2:
            planner.release(f"r{i}")
    assert len(planner._rule_cache) <= 64 and len(worker.policies) <= 64
    assert len(planner.rules) == 250 and planner.rule("r0").cfg.budget == 0.2  # live requests keep theirs
    assert worker.policy_for(()) is worker.policy
