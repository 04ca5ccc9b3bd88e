"""Chunked-prefill eviction in the Hugging Face adapter (``kv_policy(..., prefill_chunk=N)``).

References: the one-shot run of the same policy (a chunk at least the prompt), the unmodified model (budget
1.0), the same prompt run alone without padding (a padded batch), and the tensors the cache really holds
(peak bytes)."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import padded_batch
from kvcache.engine_adapters.hf import kv_policy
from kvcache.engine_adapters.hf.cache import PolicyCache, PolicyLayer
from kvcache.plan import KVPlan
from kvcache.registry import PolicyConfigError
import kvcache

POLICY_PARAMS = {"snapkv": {"window": 4}, "keyformer": {"seed": 7}, "h2o": {}, "streaming": {}}


def generate(model, ids, mask, **kwargs):
    return model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, output_logits=True,
        return_dict_in_generate=True, **kwargs,
    )


def kept_positions(cache: PolicyCache) -> list[list[list[list[int]]]]:
    """Per layer, sequence and KV head: the sorted logical positions of the real tokens held."""
    out = []
    for layer in cache.layers:
        index, valid = layer.index, layer.valid
        out.append([[sorted(index[b, h][valid[b, h]].tolist()) for h in range(index.shape[1])] for b in range(index.shape[0])])
    return out


@pytest.mark.parametrize("policy", ["snapkv", "h2o", "keyformer", "streaming"])
def test_a_chunk_at_least_the_prompt_is_the_one_shot_run(policy, make_model):
    model = make_model("llama")
    ids, mask = padded_batch([40, 29], seed=1)
    params = POLICY_PARAMS[policy]
    with kv_policy(model, policy, budget=0.4, **params) as session:
        one_shot = generate(model, ids, mask)
        one_shot_kept = kept_positions(session.last_cache)
        one_shot_passes = [layer.passes for layer in session.last_cache.layers]
    for chunk in (40, 64):
        with kv_policy(model, policy, budget=0.4, prefill_chunk=chunk, **params) as session:
            chunked = generate(model, ids, mask)
        assert torch.equal(chunked.sequences, one_shot.sequences), (policy, chunk)
        for got, want in zip(chunked.logits, one_shot.logits):
            assert torch.equal(got, want)
        assert kept_positions(session.last_cache) == one_shot_kept
        assert [layer.passes for layer in session.last_cache.layers] == one_shot_passes


@pytest.mark.parametrize("family", ["llama", "gpt2", "gptj", "mpt"])
def test_budget_one_with_chunks_is_the_full_cache_run(family, make_model):
    model = make_model(family)
    ids, mask = padded_batch([60, 41])
    reference = generate(model, ids, mask)
    for policy, params in POLICY_PARAMS.items():
        with kv_policy(model, policy, budget=1.0, prefill_chunk=16, **params) as session:
            out = generate(model, ids, mask)
        assert torch.equal(out.sequences, reference.sequences), (family, policy)
        for got, want in zip(out.logits, reference.logits):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert session.last_cache.get_seq_length() == 60 + 5  # logical: prompt + generated tokens fed back
    assert "forward" not in vars(model.base_model)  # the chunking wrapper is gone after the context


def test_plain_forward_returns_every_chunks_logits(make_model):
    """A forward call (lm-eval's loglikelihood context) gets logits for every prompt position, as one pass."""
    model = make_model("qwen2")
    ids, mask = padded_batch([50, 33], seed=2)
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    reference = model(input_ids=ids, attention_mask=mask, position_ids=position).logits
    with kv_policy(model, "h2o", budget=1.0, prefill_chunk=16):
        out = model(input_ids=ids, attention_mask=mask, position_ids=position, output_hidden_states=True)
    assert out.logits.shape == reference.shape
    real = mask.bool()
    torch.testing.assert_close(out.logits[real], reference[real], atol=1e-5, rtol=1e-5)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert all(h.shape[1] == ids.shape[1] for h in out.hidden_states)


@pytest.mark.parametrize("policy", ["snapkv", "h2o", "keyformer", "streaming"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_padded_row_is_its_prompt_run_alone(policy, family, make_model):
    """Left padding of exactly one chunk: the padded row's real tokens fall into the same chunks as when the
    prompt runs alone without padding, so its tokens, logits and kept positions must be that run's (the first
    chunk is all padding for it; budgets come from each row's own real tokens)."""
    model = make_model(family)
    ids, mask = padded_batch([64, 48, 37], seed=4)
    params = POLICY_PARAMS[policy]
    with kv_policy(model, policy, budget=0.3, prefill_chunk=16, **params) as session:
        batch = generate(model, ids, mask)
        batch_kept = kept_positions(session.last_cache)
        batch_tokens = [layer.kept_tokens() for layer in session.last_cache.layers]
    with kv_policy(model, policy, budget=0.3, prefill_chunk=16, **params) as session:
        alone = generate(model, ids[1:2, 16:], mask[1:2, 16:])
        alone_kept = kept_positions(session.last_cache)
    assert torch.equal(batch.sequences[1, -6:], alone.sequences[0, -6:])
    for got, want in zip(batch.logits, alone.logits):
        torch.testing.assert_close(got[1], want[0], atol=1e-5, rtol=1e-5)
    for layer_batch, layer_alone in zip(batch_kept, alone_kept):
        assert [[p - 16 for p in head] for head in layer_batch[1]] == layer_alone[0]
    # each row's budget is a share of its own whole prompt, not of a chunk
    budgets = [math.ceil(0.3 * n) for n in (64, 48, 37)]
    every_step = kvcache.create("evict", policy).every_step
    for per_row in batch_tokens:
        assert per_row == [float(c if every_step else c + 5) for c in budgets]


def layer_slot_bytes(model) -> int:
    """K + V bytes of one token in one layer (all KV heads, fp32)."""
    config = model.config
    return 2 * config.num_key_value_heads * config.head_dim * 4


@pytest.mark.parametrize("policy", ["snapkv", "h2o"])
def test_peak_kv_stays_within_budget_plus_one_chunk(policy, make_model, monkeypatch):
    model = make_model("llama")
    layers, prompt, chunk, budget = model.config.num_hidden_layers, 128, 16, 0.25
    capacity = math.ceil(budget * prompt)
    ids, mask = padded_batch([prompt], seed=3)
    held: list[int] = []  # tensor sizes summed over the cache's layers after every append, measured independently
    original_update = PolicyLayer.update

    def measuring_update(self, *args, **kwargs):
        out = original_update(self, *args, **kwargs)
        held.append(sum(t.numel() * t.element_size() for layer in cache_ref[0].layers if layer.is_initialized for t in (layer._k, layer._v)))
        return out

    cache_ref: list[PolicyCache] = []
    monkeypatch.setattr(PolicyLayer, "update", measuring_update)
    peaks = {}
    for chunk_size in (None, chunk):
        held.clear()
        with kv_policy(model, policy, budget=budget, prefill_chunk=chunk_size, **POLICY_PARAMS[policy]) as session:
            cache = session.new_cache(1)
            cache_ref[:] = [cache]
            model(input_ids=ids, attention_mask=mask, past_key_values=cache)
        assert cache.peak_nbytes >= max(held)  # the counter sees every append (and every eviction)
        peaks[chunk_size] = cache.peak_nbytes
        assert cache.nbytes() <= layers * (capacity + 1) * layer_slot_bytes(model)
    per_slot = layer_slot_bytes(model)
    # chunked: every layer's budget, plus one chunk in the layer being fed (every-step policies: plus the one
    # slot kept free for the next decode token in the layers already past the prompt's last chunk)
    spare = 1 if kvcache.create("evict", policy).every_step else 0
    assert peaks[chunk] <= (layers * (capacity + spare) + chunk) * per_slot
    # one pass: the layer being fed holds the whole prompt before its eviction
    assert peaks[None] >= ((layers - 1) * capacity + prompt) * per_slot
    assert peaks[chunk] < peaks[None]


def test_prompt_chunk_scores_follow_the_plan():
    """H2O and Keyformer add each chunk's (pooled) votes to the kept slots' totals; SnapKV re-scores from
    the chunk alone; StreamingLLM from positions."""
    torch.manual_seed(0)
    b, h_kv, g, q, t, d = 1, 2, 2, 6, 10, 8
    from kvcache.evict.base import Observation

    obs = Observation(
        queries=torch.randn(b, h_kv * g, q, d), keys=torch.randn(b, h_kv, t, d),
        key_index=torch.arange(t).expand(b, h_kv, t), key_valid=torch.ones(b, h_kv, t, dtype=torch.bool),
        query_index=torch.arange(t - q, t).expand(b, q), scaling=d**-0.5, step=0,
    )
    previous = torch.rand(b, h_kv, t - q)
    for name, accumulates in (("h2o", True), ("snapkv", False), ("streaming", False), ("tova", False)):
        policy = kvcache.create("evict", name, **({"window": 4} if name == "snapkv" else {}))
        plan = KVPlan(policy, 0.5)
        assert plan.accumulates_prompt_chunks is accumulates
        fresh = policy.score(obs, None)
        expected = fresh + torch.cat([previous, torch.zeros(b, h_kv, q)], -1) if accumulates else fresh
        torch.testing.assert_close(plan.prompt_chunk_scores(obs, previous), expected)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"prefill_chunk": 0}, ["prefill_chunk", ">= 1"]),
        ({"prefill_chunk": -8}, ["prefill_chunk", ">= 1"]),
        ({"prefill_chunk": 2.5}, ["prefill_chunk", "int"]),
        ({"prefill_chunk": 16, "policy": "snapkv"}, ["observation window of 32", "prefill_chunk >= 32"]),
        ({"prefill_chunk": 32, "policy": "h2o", "window": 64}, ["recent window of 64", "prefill_chunk >= 64"]),
        ({"prefill_chunk": 64, "quant": "zipcache"}, ["quant 'zipcache'", "quant=None"]),
        ({"prefill_chunk": 64, "head_budget": "adaptive"}, ["head_budget", "uniform"]),
        ({"prefill_chunk": 64, "layer_budget": "cake"}, ["'cake'", "uniform or pyramid"]),
    ],
)
def test_bad_chunks_are_refused_with_the_fix(kwargs, words, make_model):
    model = make_model("llama")
    kwargs = {"policy": "snapkv", "budget": 0.5, **kwargs}
    with pytest.raises(PolicyConfigError) as err:
        with kv_policy(model, **kwargs):
            pass
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message
    assert "_kvcache_session_root" not in vars(model)  # nothing was installed


def test_pyramid_and_full_accept_chunks(make_model):
    model = make_model("llama")
    ids, mask = padded_batch([48, 48], seed=6)
    reference = generate(model, ids, mask)
    with kv_policy(model, "full", prefill_chunk=8) as session:  # no eviction: chunked prefill alone
        out = generate(model, ids, mask)
    assert torch.equal(out.sequences, reference.sequences)
    with kv_policy(model, "snapkv", budget=0.5, layer_budget="pyramid", prefill_chunk=16, window=4) as session:
        generate(model, ids, mask)
        kept = session.stats()["kept_tokens_per_layer"]
    assert kept[0] > kept[-1]  # PyramidKV: more tokens in lower layers, fixed from the whole prompt


def test_lm_eval_model_args_carry_the_chunk():
    from kvcache.eval.lm_eval_model import KVModelArgsError, split_kv_args

    kv, rest = split_kv_args({"kv_policy": "snapkv", "kv_budget": "0.25", "kv_prefill_chunk": "256", "batch_size": 2})
    assert kv["settings"]["prefill_chunk"] == 256 and rest == {"batch_size": 2}
    assert "prefill_chunk" not in split_kv_args({"kv_policy": "snapkv"})[0]["settings"]
    for value, message in (("0", "kv_prefill_chunk must be an int >= 1"), ("many", "kv_prefill_chunk must be an int >= 1"),
                           ("16", "prefill_chunk >= 32")):
        with pytest.raises(KVModelArgsError) as err:
            split_kv_args({"kv_policy": "snapkv", "kv_prefill_chunk": value})
        assert message in str(err.value)


def test_cli_refuses_a_bad_chunk_before_loading_the_model():
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "kvcache.cli", "generate", "--kv-policy", "snapkv", "--kv-prefill-chunk", "8", "hello"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "prefill_chunk >= 32" in lines[0], proc.stderr
