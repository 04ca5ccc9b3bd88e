"""The Triton kernels equal their torch references, run on CPU tensors by Triton's interpreter.

``attention.triton_scoring.column_sums`` against ``attention.scoring.column_sums`` (H2O's plain softmax;
Keyformer's Gumbel softmax with the noise the kernel drew), and ``attention.triton_packed.attend_packed``
against ``attention.quantized.attend_packed`` over KIVI 2/4-bit and ZipCache two-tier stores, before and
after eviction. ``TRITON_INTERPRET=1`` is set only while this module imports triton (``triton.jit`` reads
it then) and during its tests, so no other test module sees it.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.triton

_previous = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # before triton itself is imported: tl.rand & co. are jit functions too
try:
    triton = pytest.importorskip("triton")
    from triton.runtime.interpreter import InterpretedFunction

    # torch._dynamo imports triton (transformers imports it), so in a whole-suite run triton's own jit
    # functions were made before TRITON_INTERPRET=1 and cannot run on CPU: this file then reruns itself
    # in a fresh Python (test_kernels_in_a_fresh_interpreter)
    IN_PROCESS = isinstance(triton.language.rand, InterpretedFunction)
    from kvcache.attention import triton_packed, triton_scoring
finally:
    if _previous is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _previous

import kvcache  # noqa: E402
from kvcache.attention import quantized, scoring  # noqa: E402
from kvcache.attention.gumbel import GumbelLogits  # noqa: E402
from kvcache.attention.triton_dispatch import ENV_SWITCH, kernel_computes, use_triton  # noqa: E402
from kvcache.evict.base import Observation  # noqa: E402
from kvcache.quant.store import KVStore  # noqa: E402

EULER_GAMMA = 0.5772156649


@pytest.fixture(autouse=True)
def interpreter(request, monkeypatch):
    """Triton reads ``TRITON_INTERPRET`` again when a kernel first launches; set only around these tests."""
    if not IN_PROCESS and request.function is not test_kernels_in_a_fresh_interpreter:
        pytest.skip("triton was imported before TRITON_INTERPRET=1: run by test_kernels_in_a_fresh_interpreter")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.skipif("IN_PROCESS", reason="the kernels run in this process")
def test_kernels_in_a_fresh_interpreter():
    """This file's tests in a fresh Python that sets ``TRITON_INTERPRET=1`` before anything imports triton."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "not fresh_interpreter", __file__]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=os.path.dirname(__file__))
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]


@pytest.fixture
def torch_path(monkeypatch):
    """Force the torch references (``KVCACHE_TRITON=0``) whatever the caller's environment says."""
    monkeypatch.setenv(ENV_SWITCH, "0")


def scoring_inputs(b: int, h_kv: int, group: int, q: int, t: int, d: int, seed: int, shuffled: bool = True):
    """Queries, keys and slot metadata with invalid (padding) slots and slots out of order per head.

    The queries are the last ``q`` positions; every query position is a slot of every head (its own).
    """
    gen = torch.Generator().manual_seed(seed)
    queries = torch.randn(b, h_kv * group, q, d, generator=gen)
    keys = torch.randn(b, h_kv, t, d, generator=gen)
    if shuffled:
        key_index = torch.stack([torch.randperm(t, generator=gen) for _ in range(b * h_kv)]).reshape(b, h_kv, t)
    else:
        key_index = torch.arange(t).expand(b, h_kv, t).contiguous()
    key_valid = torch.rand(b, h_kv, t, generator=gen) > 0.25
    key_valid[0, :, key_index[0, 0] < 3] = False  # left padding of the first sequence
    query_index = torch.arange(t - q, t).expand(b, q).contiguous()
    return queries, keys, key_index, key_valid, query_index


@pytest.mark.parametrize(
    "h_kv, group, q, t, d, block_slots, shuffled",
    [
        (2, 2, 1, 64, 16, 64, True),  # decode
        (2, 2, 5, 37, 32, 16, True),  # a few queries, several key blocks, tail block
        (2, 3, 12, 48, 16, 16, False),  # prompt chunk: rows of one program span query heads; causal blocks skipped
        (1, 2, 16, 64, 24, 16, True),  # head dim that is not a power of two
    ],
)
def test_column_sums_match_the_torch_reference(torch_path, monkeypatch, h_kv, group, q, t, d, block_slots, shuffled):
    monkeypatch.setattr(triton_scoring, "BLOCK_SLOTS", block_slots)
    inputs = scoring_inputs(2, h_kv, group, q, t, d, seed=q + t, shuffled=shuffled)
    expected = scoring.column_sums(*inputs, scaling=d**-0.5)
    got = triton_scoring.column_sums(*inputs, scaling=d**-0.5)
    assert got.shape == (2, h_kv, group, t) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.sum(-1), torch.full((2, h_kv, group), float(q)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_column_sums_of_half_precision_inputs(torch_path, dtype):
    queries, keys, *meta = scoring_inputs(2, 2, 2, 4, 32, 16, seed=3)
    queries, keys = queries.to(dtype), keys.to(dtype)
    expected = scoring.column_sums(queries, keys, *meta, scaling=0.25)
    torch.testing.assert_close(triton_scoring.column_sums(queries, keys, *meta, scaling=0.25), expected, rtol=1e-4, atol=1e-4)


def test_keyformer_column_sums_equal_the_reference_with_the_kernels_noise(torch_path):
    inputs = scoring_inputs(2, 2, 2, 16, 64, 16, seed=5)
    tau = 1.5
    got, noise = triton_scoring.column_sums(*inputs, scaling=0.25, transform=GumbelLogits(tau), seed=1234, return_noise=True)
    assert noise.shape == (2, 2, 2, 16, 64)
    expected = scoring.column_sums(*inputs, scaling=0.25, transform=lambda z: (z + noise) / tau)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the seed fixes the noise; another seed draws other noise
    again, same_noise = triton_scoring.column_sums(*inputs, scaling=0.25, transform=GumbelLogits(tau), seed=1234, return_noise=True)
    assert torch.equal(same_noise, noise) and torch.equal(again, got)
    _, other = triton_scoring.column_sums(*inputs, scaling=0.25, transform=GumbelLogits(tau), seed=1235, return_noise=True)
    assert (other != noise).float().mean() > 0.99
    # standard Gumbel: mean = Euler's gamma, variance = pi^2 / 6; neighbours uncorrelated
    flat = torch.cat([noise.flatten(), other.flatten()]).double()
    assert abs(flat.mean().item() - EULER_GAMMA) < 0.04  # standard error 0.01
    assert abs(flat.var().item() - math.pi**2 / 6) < 0.12  # standard error 0.03
    centred = noise.flatten().double() - noise.mean()
    assert abs((centred[1:] * centred[:-1]).mean().item() / centred.var().item()) < 0.05


def observation(q: int, t: int, seed: int) -> Observation:
    queries, keys, key_index, key_valid, query_index = scoring_inputs(2, 2, 2, q, t, 16, seed)
    return Observation(queries, keys, key_index, key_valid, query_index, scaling=0.25, step=0, max_new_tokens=8)


def test_policies_reach_the_kernels_through_column_sums(monkeypatch):
    obs = observation(q=6, t=40, seed=9)
    monkeypatch.setenv(ENV_SWITCH, "0")
    h2o_torch = kvcache.create("evict", "h2o", kernel=1).score(obs, None)
    monkeypatch.setenv(ENV_SWITCH, "1")
    torch.testing.assert_close(kvcache.create("evict", "h2o", kernel=1).score(obs, None), h2o_torch, rtol=1e-5, atol=1e-6)
    # Keyformer: the kernel is seeded from the policy's generator, one draw per pass
    scores = kvcache.create("evict", "keyformer", kernel=1, seed=7).score(obs, None)
    seed = GumbelLogits(1.0, torch.Generator().manual_seed(7)).kernel_seed()
    sums = triton_scoring.column_sums(
        obs.queries, obs.keys, obs.key_index, obs.key_valid, obs.query_index, obs.scaling, GumbelLogits(1.0), seed=seed
    )
    torch.testing.assert_close(scores, sums.mean(dim=2))
    policy = kvcache.create("evict", "keyformer", kernel=1, seed=7)
    assert torch.equal(policy.score(obs, None), scores)
    assert not torch.allclose(policy.score(obs, None), scores)  # fresh noise on the next pass


def test_dispatch_rules(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv(ENV_SWITCH, raising=False)
    assert not use_triton(cpu)  # CPU keeps the torch path
    monkeypatch.setenv(ENV_SWITCH, "1")
    assert use_triton(cpu)
    monkeypatch.setenv(ENV_SWITCH, "0")
    assert not use_triton(cpu)
    assert kernel_computes(None) and kernel_computes(GumbelLogits(2.0))
    assert not kernel_computes(lambda z: z * 2)
    # a transform the kernel does not know runs in torch even when the kernels are forced
    inputs = scoring_inputs(1, 1, 2, 3, 20, 16, seed=1)
    expected = scoring.column_sums(*inputs, scaling=0.25, transform=lambda z: z * 2)
    monkeypatch.setenv(ENV_SWITCH, "1")
    torch.testing.assert_close(scoring.column_sums(*inputs, scaling=0.25, transform=lambda z: z * 2), expected)


# ------------------------------------------------------------------------------------------- packed
D = 32


def filled_store(spec: str, prompt: int, steps: int, seed: int, dtype: torch.dtype = torch.float32) -> KVStore:
    gen = torch.Generator().manual_seed(seed)
    store = KVStore(kvcache.create("quant", spec), D, dtype)
    for t in [prompt] + [1] * steps:
        k, v = torch.randn(2, 2, t, D, generator=gen), torch.randn(2, 2, t, D, generator=gen)
        store.append(k, v, torch.rand(2, 2, store.num_tokens + t, generator=gen))
    return store


SPECS = {
    "kivi2": ("kivi:bits=2,residual=8,group_size=8", {2}),
    "kivi4": ("kivi:bits=4,residual=4,group_size=16", {4}),
    "zipcache": ("zipcache:streaming_gap=16,ratio=0.6", {2, 4}),  # regular tier: 4-bit keys, 2-bit values
    "zipcache_paper": ("zipcache:streaming_gap=16,ratio=0.4,low_key_bits=2", {2, 4}),
}


@pytest.mark.parametrize("codec", list(SPECS))
@pytest.mark.parametrize("evict", [False, True])
@pytest.mark.parametrize("mask_kind, q", [("none", 1), ("keys", 1), ("per_query", 3)])
def test_packed_decode_matches_attend_packed(torch_path, codec, evict, mask_kind, q):
    spec, tier_bits = SPECS[codec]
    store = filled_store(spec, prompt=50, steps=3, seed=len(spec) + q)
    gen = torch.Generator().manual_seed(11)
    if evict:  # every head keeps its own 30 slots
        kept = torch.stack([torch.randperm(store.num_tokens, generator=gen)[:30] for _ in range(4)]).reshape(2, 2, 30)
        store.keep(kept)
    widths = set(store.bit_widths().unique().tolist())
    assert tier_bits <= widths and bool((store.fp_count > 0).any())  # quantised tiers and the fp buffer are both read
    t = store.num_tokens
    query = torch.randn(2, 4, q, D, generator=gen)
    mask = None
    if mask_kind == "keys":
        mask = torch.rand(2, 2, t, generator=gen) > 0.3
    elif mask_kind == "per_query":
        mask = torch.rand(2, 2, q, t, generator=gen) > 0.3
        mask[0, 0, 0] = False  # a query that sees nothing: zero output, -inf log-sum-exp
    expected, expected_lse = quantized.attend_packed(query, store, mask, D**-0.5, return_lse=True)
    for rows_per_split in (32, None):  # several splits merged by log-sum-exp, and the default sizing
        out, lse = triton_packed.attend_packed(query, store, mask, D**-0.5, return_lse=True, rows_per_split=rows_per_split)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse, expected_lse, rtol=1e-5, atol=1e-5)


def test_packed_decode_half_precision_store_and_dispatch(monkeypatch):
    store = filled_store("zipcache:streaming_gap=16,ratio=0.5", prompt=40, steps=2, seed=4, dtype=torch.float16)
    query = torch.randn(2, 4, 1, D, generator=torch.Generator().manual_seed(2)).to(torch.float16)
    monkeypatch.setenv(ENV_SWITCH, "0")
    expected, expected_lse = quantized.attend_packed(query, store, scaling=0.2, return_lse=True)
    monkeypatch.setenv(ENV_SWITCH, "1")
    out, lse = quantized.attend_packed(query, store, scaling=0.2, return_lse=True)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-5, atol=1e-5)


def test_packed_decode_edge_cases():
    empty = KVStore(kvcache.create("quant", "kivi"), D)
    query = torch.randn(1, 2, 1, D)
    out, lse = triton_packed.attend_packed(query, empty, return_lse=True)
    assert torch.equal(out, torch.zeros_like(query)) and bool(torch.isinf(lse).all())
    store = filled_store("kivi:residual=0,group_size=8", prompt=16, steps=0, seed=0)  # no fp rows left
    assert store.packed_layout().fp_keys.shape[2] == 0
    torch.testing.assert_close(
        triton_packed.attend_packed(torch.ones(2, 4, 1, D), store), quantized.attend_packed(torch.ones(2, 4, 1, D), store),
        rtol=1e-5, atol=1e-5,
    )
    with pytest.raises(ValueError, match="mask must be"):
        triton_packed.attend_packed(torch.ones(2, 4, 1, D), store, torch.ones(2, 2, 3, dtype=torch.bool))
    recent_only = filled_store("kivi:residual=64", prompt=10, steps=0, seed=1)  # every row still full precision
    assert not recent_only.packed_layout().tiers and recent_only.packed_layout().fp_keys.shape[2] == 10
    torch.testing.assert_close(
        triton_packed.attend_packed(torch.ones(2, 4, 1, D), recent_only),
        quantized.attend_packed(torch.ones(2, 4, 1, D), recent_only), rtol=1e-5, atol=1e-5,
    )
