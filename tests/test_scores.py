"""Scores and budgets against the papers' formulas on small hand-checked inputs."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import kvcache
from kvcache.budget.cake import layer_preference
from kvcache.evict.base import Observation, pool_scores
from kvcache.attention.gumbel import GumbelLogits, numpy_noise_generator
from kvcache.evict.keyformer import gumbel_noise


def observation(q_len: int, t: int, h_kv: int = 2, group: int = 2, d: int = 8, seed: int = 0, step: int = 0):
    gen = torch.Generator().manual_seed(seed)
    queries = torch.randn(1, h_kv * group, q_len, d, generator=gen)
    keys = torch.randn(1, h_kv, t, d, generator=gen)
    index = torch.arange(t).expand(1, h_kv, t)
    return Observation(
        queries=queries,
        keys=keys,
        key_index=index,
        key_valid=torch.ones(1, h_kv, t, dtype=torch.bool),
        query_index=torch.arange(t - q_len, t).expand(1, q_len),
        scaling=d**-0.5,
        step=step,
        max_new_tokens=10,
    )


def causal_probs(obs: Observation, extra=None, tau: float = 1.0) -> torch.Tensor:
    """softmax over visible keys per query head, the textbook way: [B, H_q, q, T]."""
    group = obs.group_size
    keys = obs.keys.repeat_interleave(group, dim=1)
    z = obs.queries @ keys.transpose(-1, -2) * obs.scaling
    mask = obs.key_index[:, :1, None, :] <= obs.query_index[:, None, :, None]
    z = z.masked_fill(~mask, float("-inf"))
    if extra is not None:
        z = z + extra
    return torch.softmax(z / tau, dim=-1)


def group_mean(per_query_head: torch.Tensor, group: int) -> torch.Tensor:
    b, h_q, t = per_query_head.shape
    return per_query_head.reshape(b, h_q // group, group, t).mean(dim=2)


def test_h2o_accumulates_column_sums_over_passes():
    policy = kvcache.create("evict", "h2o", kernel=1)  # the paper; pooling is checked below
    prompt = observation(q_len=6, t=6)
    first = policy.score(prompt, None)
    expected_first = group_mean(causal_probs(prompt).sum(dim=2), 2)
    torch.testing.assert_close(first, expected_first)
    decode = observation(q_len=1, t=7, seed=1)
    second = policy.score(decode, first)
    expected = torch.cat([first, torch.zeros(1, 2, 1)], dim=-1) + group_mean(causal_probs(decode).sum(dim=2), 2)
    torch.testing.assert_close(second, expected)
    # kernel > 1 max-pools the prompt pass only; decode passes add unpooled column sums
    pooled = kvcache.create("evict", "h2o", kernel=3)
    first_pooled = pooled.score(prompt, None)
    torch.testing.assert_close(first_pooled, pool_scores(expected_first, prompt.key_index, 3))
    second_pooled = pooled.score(decode, first_pooled)
    torch.testing.assert_close(second_pooled, expected - torch.cat([first - first_pooled, torch.zeros(1, 2, 1)], dim=-1))


@pytest.mark.parametrize("spec", ["h2o:kernel=1", "keyformer:seed=5,kernel=1"])
def test_scores_from_given_probabilities_match_scores_from_keys(spec):
    """An engine that already has the pass's probabilities (attention over a quantised cache) passes them
    instead of keys; h2o's column sums and Keyformer's Gumbel softmax (shift-invariant: log p = z - lse) agree."""
    obs = observation(q_len=1, t=9, seed=3, step=2)
    from_probs = dataclasses.replace(obs, keys=None, probabilities=causal_probs(obs))
    previous = torch.rand(1, 2, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(kvcache.create("evict", spec).score(from_probs, previous),
                               kvcache.create("evict", spec).score(obs, previous))


def test_keyformer_scores_are_gumbel_softmax_sums_with_the_tau_schedule():
    policy = kvcache.create("evict", "keyformer", seed=7, kernel=1)
    assert policy.temperature(0, 10) == 1.0
    assert policy.temperature(5, 10) == 1.5
    assert policy.temperature(10, 10) == 2.0
    assert policy.temperature(3, None) == 1.0
    obs = observation(q_len=5, t=5, step=5)
    scores = policy.score(obs, None)
    noise = gumbel_noise(torch.Size([1, 2, 2, 5, 5]), torch.device("cpu"), None, numpy_noise_generator(7))
    probs = causal_probs(obs, extra=noise.reshape(1, 4, 5, 5), tau=1.5)
    torch.testing.assert_close(scores, group_mean(probs.sum(dim=2), 2))
    # fresh noise per pass: a second call with the same generator draws different noise
    assert not torch.allclose(policy.score(obs, None), scores)


@pytest.mark.parametrize("stream", ["torch", "numpy"])
def test_gumbel_noise_has_the_gumbel_mean_and_variance(stream):
    torch_gen, numpy_gen = torch.Generator().manual_seed(0), numpy_noise_generator(0)
    g = gumbel_noise(torch.Size([400_000]), torch.device("cpu"), torch_gen, numpy_gen if stream == "numpy" else None)
    assert abs(g.mean().item() - 0.5772) < 0.01  # Euler-Mascheroni constant
    assert abs(g.var().item() - math.pi**2 / 6) < 0.02
    again = gumbel_noise(torch.Size([8]), torch.device("cpu"), None, numpy_noise_generator(3))
    assert torch.equal(again, gumbel_noise(torch.Size([8]), torch.device("cpu"), None, numpy_noise_generator(3)))


@pytest.mark.parametrize("tau", [1.0, 1.7])
def test_gumbel_softmax_in_place_equals_softmax_of_the_perturbed_logits(tau):
    """GumbelLogits.softmax_ (the prompt pass's path; at tau 1 exp(z)/E with E = -log U) is
    softmax((z + g) / tau) for the same draws, masked slots included."""
    z = torch.randn(2, 3, 4, 6, generator=torch.Generator().manual_seed(1))
    z[..., 4:] = float("-inf")
    expected = torch.softmax(GumbelLogits(tau, numpy_generator=numpy_noise_generator(5))(z), dim=-1)
    got = GumbelLogits(tau, numpy_generator=numpy_noise_generator(5)).softmax_(z.clone())
    torch.testing.assert_close(got, expected)
    assert (got[..., 4:] == 0).all()


def test_snapkv_pools_window_attention():
    in_order = torch.arange(7).reshape(1, 1, 7)
    assert pool_scores(torch.tensor([[[0.0, 1, 0, 0, 5, 0, 0]]]), in_order, 3, "max").tolist() == [[[1, 1, 1, 5, 5, 5, 0]]]
    # slots in any order pool along logical position
    perm = torch.tensor([4, 0, 6, 2, 1, 5, 3])
    shuffled = pool_scores(torch.tensor([[[0.0, 1, 0, 0, 5, 0, 0]]])[..., perm], in_order[..., perm], 3, "max")
    assert shuffled.tolist() == [[[[1, 1, 1, 5, 5, 5, 0][i] for i in perm.tolist()]]]
    avg = pool_scores(torch.tensor([[[3.0, 0, 0, 6]]]), torch.arange(4).reshape(1, 1, 4), 3, "avg")
    torch.testing.assert_close(avg, torch.tensor([[[1.0, 1.0, 2.0, 2.0]]]))
    policy = kvcache.create("evict", "snapkv", window=3, kernel=1)
    obs = observation(q_len=9, t=9)
    expected = group_mean(causal_probs(obs)[:, :, -3:].sum(dim=2), 2)
    torch.testing.assert_close(policy.score(obs, None), expected)


def test_pyramid_budget_arithmetic():
    pyramid = kvcache.create("budget", "pyramid")
    one = lambda v: torch.tensor([v])  # noqa: E731
    budgets = pyramid.allocate(one(512), one(32), one(4096), 30)[:, 0].tolist()
    # B = 480, min = 24, max = 936, step = floor(912 / 29) = 31; plus w = 32
    assert budgets[0] == 936 + 32 and budgets[-1] == 936 - 29 * 31 + 32
    assert all(a - b == 31 for a, b in zip(budgets, budgets[1:]))
    # cap: B = 90, min = 4, max = 176 >= L - w = 110 -> max = 110, min = 70, step = 13
    assert pyramid.allocate(one(100), one(10), one(120), 4)[:, 0].tolist() == [120, 107, 94, 81]
    # no compression when the prompt fits
    assert pyramid.allocate(one(100), one(10), one(80), 4)[:, 0].tolist() == [80] * 4


def test_cake_allocation_caps_and_spreads_the_excess():
    cake = kvcache.create("budget", "cake")
    prefs = torch.tensor([[10.0], [1.0], [1.0], [1.0]])
    budgets = cake.allocate(torch.tensor([512]), torch.tensor([32]), torch.tensor([600]), 4, prefs)[:, 0]
    # T = 4 * 480 = 1920; layer 0 wants 1477 > cap 568: capped, excess 909 spread over 3 -> 450 each
    assert budgets.tolist() == [600, 482, 482, 482]
    uniform = cake.allocate(torch.tensor([100]), torch.tensor([10]), torch.tensor([1000]), 3, torch.ones(3, 1))
    assert uniform[:, 0].tolist() == [100, 100, 100]


def test_cake_preference_is_entropy_times_variance():
    probs = torch.tensor([[0.5, 0.5, 0.0], [0.9, 0.1, 0.0]]).reshape(1, 1, 1, 2, 3)
    prefix = torch.ones(1, 1, 3, dtype=torch.bool)
    entropy = -sum(p * math.log(p + 1e-10) for p in (0.5, 0.5, 0.9, 0.1))
    variance = 0.2**2 + 0.2**2  # per-key variance over the 2 queries, summed
    got = layer_preference(probs, prefix, 1.0, 1.0)
    assert got.item() == pytest.approx(entropy * variance, rel=1e-5)
    assert layer_preference(probs, prefix, 2.0, 1.0).item() == pytest.approx(entropy**0.5 * variance, rel=1e-5)
