"""TOVA, KNorm and Expected Attention: scores against the papers' formulas, then the policies end to end."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import kvcache
from conftest import padded_batch
from kvcache.engine_adapters.hf import kv_policy
from kvcache.evict.base import Observation
from kvcache.evict.expected_attention import real_queries
from kvcache.registry import PolicyConfigError
from test_scores import causal_probs, group_mean, observation

NEW_POLICIES = ["tova", "knorm", "expected-attention"]


def single_head(queries: list[list[float]], keys: list[list[float]], values=None, scaling: float = 1.0) -> Observation:
    """One sequence, one query head over one KV head, the queries at the last positions (at 0 when there
    are more queries than slots)."""
    t, q = len(keys), len(queries)
    return Observation(
        queries=torch.tensor(queries)[None, None],
        keys=torch.tensor(keys)[None, None],
        key_index=torch.arange(t)[None, None],
        key_valid=torch.ones(1, 1, t, dtype=torch.bool),
        query_index=torch.arange(t - q, t).clamp(min=0)[None],
        scaling=scaling,
        step=0,
        values=None if values is None else torch.tensor(values)[None, None],
    )


# -- TOVA --------------------------------------------------------------------------------------------
def test_tova_scores_are_the_last_querys_attention_hand_checked():
    # logits q.k = [0, ln 3, 0] for the last query: softmax = [1/5, 3/5, 1/5]; the first query does not count
    obs = single_head([[5.0], [1.0]], [[0.0], [math.log(3.0)], [0.0]])
    scores = kvcache.create("evict", "tova").score(obs, None)
    torch.testing.assert_close(scores, torch.tensor([[[0.2, 0.6, 0.2]]]))


def test_tova_per_kv_head_averages_the_group_and_does_not_accumulate():
    tova = kvcache.create("evict", "tova:heads=kv")
    prompt = observation(q_len=6, t=6)
    expected = group_mean(causal_probs(prompt)[:, :, -1], 2)  # the current (last) query only
    torch.testing.assert_close(tova.score(prompt, None), expected)
    decode = observation(q_len=1, t=7, seed=1, step=1)
    fresh = tova.score(decode, None)
    torch.testing.assert_close(fresh, group_mean(causal_probs(decode)[:, :, -1], 2))
    torch.testing.assert_close(tova.score(decode, torch.rand(1, 2, 6) * 100), fresh)  # past scores ignored
    # an engine passing the probabilities (attention over a quantised cache) gets the same scores
    from_probs = dataclasses.replace(decode, keys=None, probabilities=causal_probs(decode))
    torch.testing.assert_close(tova.score(from_probs, None), fresh)
    assert tova.every_step and tova.observed_prompt_queries(50) == 1


def test_tova_per_kv_head_mode_shares_nothing_across_heads():
    assert not kvcache.create("evict", "tova:heads=kv").shares_layer_selection
    with pytest.raises(PolicyConfigError, match="tova heads must be one of 'layer', 'kv'"):
        kvcache.create("evict", "tova:heads=all")


def test_tova_default_averages_every_head_of_the_layer():
    """The paper (Sec. 3.3) and kvpress: one selection per layer, s_j = mean over all query heads of the
    current query's attention; every KV head gets the same scores."""
    tova = kvcache.create("evict", "tova")
    assert tova.heads == "layer" and tova.shares_layer_selection
    decode = observation(q_len=1, t=7, seed=3, step=1)
    layer_mean = causal_probs(decode)[:, :, -1].mean(dim=1, keepdim=True).expand(1, 2, 7)
    torch.testing.assert_close(tova.score(decode, None), layer_mean)


def test_tova_layer_mean_lines_up_heads_holding_their_tokens_in_different_slots():
    # head 1 holds the same positions as head 0, in another slot order: its scores follow its own slots
    tova = kvcache.create("evict", "tova")
    decode = observation(q_len=1, t=7, seed=4, step=1)
    perm = torch.tensor([3, 0, 6, 1, 5, 2, 4])
    keys = decode.keys.clone()
    keys[:, 1] = decode.keys[:, 1, perm]
    index = torch.stack([torch.arange(7), perm])[None]
    shuffled = dataclasses.replace(decode, keys=keys, key_index=index)
    expected = tova.score(decode, None)
    got = tova.score(shuffled, None)
    torch.testing.assert_close(got[:, 0], expected[:, 0])
    torch.testing.assert_close(got[:, 1], expected[:, 1, perm])
    # an engine that keeps every head's slots in the same order says so and skips the lining up
    torch.testing.assert_close(tova.score(dataclasses.replace(decode, heads_share_slots=True), None), expected)


def test_tova_default_keeps_the_same_tokens_in_every_kv_head(make_model):
    model = make_model("llama")
    ids, mask = padded_batch([30, 22], seed=3)
    with torch.no_grad(), kv_policy(model, "tova", budget=0.5) as session:
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        cache = session.last_cache
    assert cache is not None
    for layer in cache.layers:
        positions = layer.index.masked_fill(~layer.valid, -1)  # [B, H_kv, T]: the same token in every head's slot
        assert (positions == positions[:, :1]).all(), "KV heads of a layer hold different tokens (or slots)"


def test_tova_layer_selection_refuses_adaptive_head_budgets(make_model):
    model = make_model("llama")
    with pytest.raises(PolicyConfigError, match="tova:heads=kv"):
        with kv_policy(model, "tova", budget=0.5, head_budget="adaptive"):
            pass
    with kv_policy(model, "tova", budget=0.5, heads="kv", head_budget="adaptive"):
        pass


# -- KNorm -------------------------------------------------------------------------------------------
def test_knorm_scores_are_minus_the_key_norm_hand_checked():
    obs = single_head([[1.0, 1.0]], [[3.0, 4.0], [1.0, 0.0], [0.0, -2.0]])
    scores = kvcache.create("evict", "knorm").score(obs, None)
    torch.testing.assert_close(scores, torch.tensor([[[-5.0, -1.0, -2.0]]]))
    policy = kvcache.create("evict", "knorm")
    assert not policy.every_step and policy.observed_prompt_queries(50) == 0


def test_knorm_is_per_kv_head_and_ignores_queries():
    obs = observation(q_len=4, t=10)
    expected = -obs.keys.norm(dim=-1)
    knorm = kvcache.create("evict", "knorm")
    torch.testing.assert_close(knorm.score(obs, None), expected)
    other_queries = dataclasses.replace(obs, queries=torch.randn_like(obs.queries))
    torch.testing.assert_close(knorm.score(other_queries, None), expected)


# -- Expected Attention ------------------------------------------------------------------------------
def test_expected_attention_hand_checked_one_dimension():
    # queries 1 and 3: mu = 2, Sigma = 1 (1/n); keys 0, 1, 2 with s = 1: logits mu k + k^2 Sigma / 2 = [0, 2.5, 6]
    obs = single_head([[1.0], [3.0]], [[0.0], [1.0], [2.0]], values=[[1.0], [2.0], [-3.0]])
    policy = kvcache.create("evict", "expected-attention", sinks=0, use_vnorm=False)
    expected = torch.softmax(torch.tensor([0.0, 2.5, 6.0]), dim=0)
    torch.testing.assert_close(policy.score(obs, None), expected[None, None])
    mean_only = kvcache.create("evict", "expected-attention", sinks=0, use_vnorm=False, use_covariance=False)
    torch.testing.assert_close(mean_only.score(obs, None), torch.softmax(torch.tensor([0.0, 2.0, 4.0]), dim=0)[None, None])
    weighted = kvcache.create("evict", "expected-attention", sinks=0, epsilon=0.5)
    torch.testing.assert_close(weighted.score(obs, None), ((expected + 0.5) * torch.tensor([1.0, 2.0, 3.0]))[None, None])


def test_expected_attention_is_the_expectation_of_attention_under_gaussian_queries():
    """E[exp(s q.k)] for q ~ N(mu, Sigma) is exp(s mu.k + s^2 k^T Sigma k / 2): a Monte-Carlo average agrees."""
    gen = torch.Generator().manual_seed(0)
    d, t = 4, 6
    samples = torch.randn(4000, d, generator=gen) @ (torch.randn(d, d, generator=gen) * 0.5) + torch.randn(d, generator=gen)
    keys = torch.randn(t, d, generator=gen)
    obs = single_head(samples.tolist(), keys.tolist(), scaling=d**-0.5)
    scores = kvcache.create("evict", "expected-attention", query_window=None, sinks=0, use_vnorm=False).score(obs, None)[0, 0]
    mu, sigma = samples.mean(0), torch.cov(samples.T, correction=0)
    draws = torch.distributions.MultivariateNormal(mu, sigma).sample((400_000,))
    monte_carlo = torch.exp(draws @ keys.T * d**-0.5).mean(0)
    torch.testing.assert_close(scores, monte_carlo / monte_carlo.sum(), rtol=0.02, atol=0.0)


def reference_expected_attention(obs: Observation, n: int, sinks: int) -> torch.Tensor:
    """The formula per query head, the textbook way: statistics of the last n queries after the sinks,
    softmax over the slots after the sinks, mean over the group, times ||v||."""
    b, h_q, q, d = obs.queries.shape
    group = obs.group_size
    out = torch.zeros(b, h_q, obs.keys.shape[2])
    for head in range(h_q):
        used = obs.queries[0, head, -n:][obs.query_index[0, -n:] >= sinks]
        mu, sigma = used.mean(0), torch.cov(used.T, correction=0)
        k = obs.keys[0, head // group, sinks:]
        logits = k @ mu / math.sqrt(d) + torch.einsum("ti,ij,tj->t", k, sigma, k) / (2 * d)
        out[0, head, sinks:] = torch.softmax(logits, dim=0)
    return group_mean(out, group) * obs.values.norm(dim=-1)


@pytest.mark.parametrize("n", [5, None])
def test_expected_attention_matches_the_formula_with_gqa_and_sinks(n):
    obs = observation(q_len=12, t=12, d=8)
    obs = dataclasses.replace(obs, values=torch.randn(1, 2, 12, 8, generator=torch.Generator().manual_seed(4)))
    policy = kvcache.create("evict", "expected-attention", query_window=n, sinks=3)
    expected = reference_expected_attention(obs, n or 12, sinks=3)
    torch.testing.assert_close(policy.score(obs, None), expected)
    assert policy.observed_prompt_queries(40) == (n or 40)
    # the sinks' own queries are left out of the statistics
    changed = obs.queries.clone()
    changed[:, :, :3] = 100.0
    torch.testing.assert_close(policy.score(dataclasses.replace(obs, queries=changed), None), expected)


def test_expected_attention_leaves_padding_out():
    """A left-padded row scores as the same sequence alone: padding is neither a query nor a slot."""
    alone = observation(q_len=8, t=8, d=8)
    alone = dataclasses.replace(alone, values=torch.ones(1, 2, 8, 8))
    pad = 3
    padded = Observation(
        queries=torch.cat([torch.randn(1, 4, pad, 8), alone.queries], dim=2),
        keys=torch.cat([torch.randn(1, 2, pad, 8), alone.keys], dim=2),
        key_index=torch.arange(8 + pad).expand(1, 2, -1),
        key_valid=torch.arange(8 + pad).expand(1, 2, -1) >= pad,
        query_index=torch.arange(8 + pad)[None],
        scaling=alone.scaling,
        step=0,
        values=torch.cat([torch.ones(1, 2, pad, 8) * 7, alone.values], dim=2),
    )
    assert real_queries(padded).tolist() == [[False] * pad + [True] * 8]
    policy = kvcache.create("evict", "expected-attention", sinks=2)
    torch.testing.assert_close(policy.score(padded, None)[..., pad:], policy.score(alone, None))


def test_expected_attention_needs_values_for_the_vnorm_weighting():
    obs = observation(q_len=4, t=8)  # no values, as an engine that does not pass them
    with pytest.raises(PolicyConfigError, match="use_vnorm=false"):
        kvcache.create("evict", "expected-attention").score(obs, None)
    assert kvcache.create("evict", "expected-attention:use_vnorm=false").score(obs, None).shape == (1, 2, 8)


# -- registry and surfaces ---------------------------------------------------------------------------
def test_registered_with_papers_defaults():
    assert set(NEW_POLICIES) <= set(kvcache.names("evict"))
    tova, knorm, ea = (kvcache.create("evict", name) for name in NEW_POLICIES)
    assert (tova.window, tova.sinks, knorm.window, knorm.sinks) == (1, 0, 0, 0)
    assert (ea.query_window, ea.sinks, ea.window, ea.use_covariance, ea.use_vnorm, ea.epsilon) == (32, 4, 0, True, True, 0.0)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("tova:window=-1", "window must be >= 0"),
        ("tova:sinks=-2", "sinks must be an int.* >= 0"),
        ("knorm:window=1.5", r"window as a fraction of the budget must be in \[0, 1\)"),
        ("knorm:kernel=3", "has no parameter.*kernel.*valid parameters: sinks, window"),
        ("expected-attention:query_window=0", "query_window must be an int >= 1"),
        ("expected-attention:epsilon=-0.1", "epsilon must be a number >= 0"),
        ("expected-attention:use_vnorm=maybe", "cannot read 'maybe' as bool"),
    ],
)
def test_bad_parameters_are_refused_with_the_fix(spec, message):
    with pytest.raises(PolicyConfigError, match=message):
        kvcache.create("evict", spec)


def test_lm_eval_model_args_take_the_new_policies():
    from kvcache.eval.lm_eval_model import split_kv_args

    kv, _ = split_kv_args({"kv_policy": "tova", "kv_budget": "0.5", "kv_window": "2"})
    assert kv["settings"]["policy"] == "tova" and kv["settings"]["window"] == "2"
    assert split_kv_args({"kv_policy": "expected-attention:query_window=16"})[0]["settings"]["policy"] == "expected-attention:query_window=16"


# -- through the Hugging Face adapter ------------------------------------------------------------------
def generate(model, ids, mask, max_new_tokens=6):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                          output_logits=True, return_dict_in_generate=True)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("policy", NEW_POLICIES)
def test_budget_one_reproduces_the_unmodified_model(policy, family, make_model):
    model = make_model(family)
    ids, mask = padded_batch([28, 19])
    reference = generate(model, ids, mask)
    with kv_policy(model, policy, budget=1.0):
        out = generate(model, ids, mask)
    assert torch.equal(out.sequences, reference.sequences)
    for got, want in zip(out.logits, reference.logits):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("policy", NEW_POLICIES)
def test_half_budget_keeps_half_the_prompt(policy, make_model):
    model = make_model("llama")
    ids, mask = padded_batch([40, 40])
    with kv_policy(model, policy, budget=0.5) as session:
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    cache = session.last_cache
    for layer in cache.layers:
        kept = layer.valid.sum(dim=-1)  # [B, H_kv]
        if policy == "tova":  # budget fixed from the prompt, evicted at every step
            assert (kept == 20).all()
        else:  # prompt compressed to 20, the 4 stored decode tokens appended
            assert (kept == 24).all()
    if policy == "expected-attention":  # the 4 sinks of every sequence are kept
        first = mask.argmax(dim=-1)
        for layer in cache.layers:
            for row in range(2):
                for head in range(layer.index.shape[1]):
                    kept_positions = layer.index[row, head][layer.valid[row, head]].tolist()
                    assert all(first[row].item() + s in kept_positions for s in range(4))
    assert session.stats()["uncompressed_sequences"] == []
