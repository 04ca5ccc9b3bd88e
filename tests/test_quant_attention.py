"""Attention over the packed cache equals reference attention over the dequantised tensors; the cache
is read block by block; ZipCache saliency matches its definition."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvcache
from kvcache.quant.store import KVStore
from kvcache.attention.quantized import attend_packed, packed_probabilities
from kvcache.quant.saliency import attention_saliency, normalized_attention, probe_positions

D = 16


def reference(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """softmax(Q K^T * scaling + mask) V with K/V repeated per query head (HF eager math), fp64."""
    g = query.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(g, 1)
    v = values.double().repeat_interleave(g, 1)
    logits = query.double() @ k.transpose(-1, -2) * scaling
    if mask is not None:
        m = mask if mask.dim() == 4 else mask[:, :, None]
        logits = logits.masked_fill(~m.repeat_interleave(g, 1), float("-inf"))
    return torch.softmax(logits, -1) @ v


def _filled_store(spec: str, b: int, h_kv: int, prompt: int, steps: int, seed: int) -> kvcache.quant.KVStore:
    gen = torch.Generator().manual_seed(seed)
    store = KVStore(kvcache.create("quant", spec), D, torch.float32)
    for t in [prompt] + [1] * steps:
        k, v = torch.randn(b, h_kv, t, D, generator=gen), torch.randn(b, h_kv, t, D, generator=gen)
        store.append(k, v, torch.rand(b, h_kv, store.num_tokens + t, generator=gen))
    return store


SPECS = ["none", "kivi:residual=8,group_size=4", "kivi:bits=4,residual=0,group_size=8", "zipcache:streaming_gap=8", "zipcache:ratio=0.5,streaming_gap=3"]


@settings(max_examples=30, deadline=None)
@given(
    spec=st.sampled_from(SPECS),
    b=st.integers(1, 2),
    h_kv=st.integers(1, 3),
    group=st.integers(1, 3),
    prompt=st.integers(1, 70),
    steps=st.integers(0, 6),
    q=st.integers(1, 4),
    block=st.integers(1, 40),
    mask_kind=st.sampled_from(["none", "keys", "per_query"]),
    evict=st.booleans(),
    seed=st.integers(0, 999),
)
def test_attend_packed_equals_reference_over_dequantised(
    spec: str, b: int, h_kv: int, group: int, prompt: int, steps: int, q: int, block: int, mask_kind: str, evict: bool, seed: int
) -> None:
    store = _filled_store(spec, b, h_kv, prompt, steps, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    if evict and store.num_tokens > 2:
        c = store.num_tokens // 2
        idx = torch.stack([torch.randperm(store.num_tokens, generator=gen)[:c] for _ in range(b * h_kv)])
        store.keep(idx.reshape(b, h_kv, c))
    t = store.num_tokens
    query = torch.randn(b, h_kv * group, q, D, generator=gen)
    mask = None
    if mask_kind == "keys":
        mask = torch.rand(b, h_kv, t, generator=gen) > 0.3
        mask[..., -1] = True
    elif mask_kind == "per_query":
        mask = torch.rand(b, h_kv, q, t, generator=gen) > 0.3
        mask[..., 0] = True
    keys, values = store.dequantize()
    scaling = 1 / math.sqrt(D)
    out = attend_packed(query, store, mask, scaling, block_size=block)
    assert out.shape == query.shape and out.dtype == query.dtype
    torch.testing.assert_close(out.double(), reference(query, keys, values, mask, scaling), atol=1e-5, rtol=1e-5)
    # the probabilities in slot order (what eviction and ZipCache saliency use), from the same pass
    _, lse = attend_packed(query, store, mask, scaling, block_size=block, return_lse=True)
    probs = packed_probabilities(query, store, mask, scaling, block_size=block, lse=lse)
    torch.testing.assert_close(probs.double(), reference(query, keys, torch.eye(t).expand(b, h_kv, t, t), mask, scaling), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spec", ["kivi:residual=4,group_size=4", "zipcache:streaming_gap=5", "zipcache:streaming_gap=5,ratio=0.5,low_key_bits=2"])
@pytest.mark.parametrize("mask_kind", ["none", "keys"])
def test_attention_after_decode_removals_that_leave_padding_rows(spec: str, mask_kind: str) -> None:
    """Decode-time eviction (``KVStore.remove``, one victim per head per step, as H2O does) is sized from the
    host's bounds, so heads that lost tokens from different regions leave padding rows: attention, its
    probabilities and the dequantised cache still equal the reference over exactly the kept tokens, and no
    region ever holds more rows than slots."""
    gen = torch.Generator().manual_seed(3)
    store = _filled_store(spec, 2, 2, 24, 0, 1)
    kept_k, kept_v = store.dequantize()
    for step in range(14):
        k, v = torch.randn(2, 2, 1, D, generator=gen), torch.randn(2, 2, 1, D, generator=gen)
        store.append(k, v, torch.rand(2, 2, store.num_tokens + 1, generator=gen))
        before_k, before_v = store.dequantize()  # bit for bit what the store holds, buffer included
        victim = torch.randint(0, store.num_tokens - 1, (2, 2, 1), generator=gen)
        store.remove(victim)
        others = torch.stack([torch.arange(store.num_tokens + 1)] * 4).reshape(2, 2, -1)
        others = others[others != victim].reshape(2, 2, store.num_tokens)  # the kept slots, in order
        kept_k = before_k.gather(2, others[..., None].expand(-1, -1, -1, D))
        kept_v = before_v.gather(2, others[..., None].expand(-1, -1, -1, D))
        now_k, now_v = store.dequantize()
        assert torch.equal(now_k, kept_k) and torch.equal(now_v, kept_v)
        assert all(tier.rows <= store.num_tokens for tier in store.tiers) and store.fp_rows <= store.num_tokens + 1
    assert not store.exact  # padding rows really were left behind
    t = store.num_tokens
    mask = None if mask_kind == "none" else torch.rand(2, 2, t, generator=gen) > 0.3
    query = torch.randn(2, 4, 1, D, generator=gen)
    out, lse = attend_packed(query, store, mask, 0.3, block_size=8, return_lse=True)
    torch.testing.assert_close(out.double(), reference(query, kept_k, kept_v, mask, 0.3), atol=1e-5, rtol=1e-5)
    probs = packed_probabilities(query, store, mask, 0.3, block_size=8, lse=lse)
    torch.testing.assert_close(probs.double(), reference(query, kept_k, torch.eye(t).expand(2, 2, t, t), mask, 0.3), atol=1e-5, rtol=1e-5)


def test_blocks_never_exceed_block_size_and_cover_every_token() -> None:
    store = _filled_store("zipcache:streaming_gap=10", 1, 2, 95, 7, 0)
    sizes = [block.keys.shape[2] for block in store.blocks(block_size=16)]
    assert max(sizes) <= 16
    visible = sum(int(block.visible.sum()) for block in store.blocks(block_size=16))
    assert visible == 2 * store.num_tokens


def test_fully_masked_query_gives_zeros_and_shapes_are_checked() -> None:
    store = _filled_store("kivi:residual=4,group_size=4", 1, 2, 20, 0, 0)
    query = torch.randn(1, 4, 2, D)
    mask = torch.ones(1, 2, 2, 20, dtype=torch.bool)
    mask[:, :, 0] = False
    out = attend_packed(query, store, mask)
    assert (out[:, :, 0] == 0).all() and (out[:, :, 1] != 0).any()
    with pytest.raises(ValueError, match="does not fit a store"):
        attend_packed(torch.randn(1, 3, 1, D), store)
    with pytest.raises(ValueError, match="mask must be"):
        attend_packed(query, store, torch.ones(1, 2, 19, dtype=torch.bool))


def test_attend_packed_in_half_precision_store() -> None:
    store = KVStore(kvcache.create("quant", "zipcache:streaming_gap=4"), D, torch.bfloat16)
    k, v = torch.randn(1, 1, 30, D), torch.randn(1, 1, 30, D)
    store.append(k, v, torch.rand(1, 1, 30))
    query = torch.randn(1, 2, 1, D, dtype=torch.bfloat16)
    keys, values = store.dequantize()
    torch.testing.assert_close(attend_packed(query, store).double(), reference(query, keys, values, None, D**-0.5), atol=1e-2, rtol=1e-2)


# --------------------------------------------------------------------------------------- saliency
def test_normalized_attention_matches_its_definition() -> None:
    gen = torch.Generator().manual_seed(0)
    b, h_kv, g, q, t = 1, 2, 2, 5, 7
    probs = torch.rand(b, h_kv * g, q, t, generator=gen)
    visible = torch.rand(b, h_kv, q, t, generator=gen) > 0.4
    sal = normalized_attention(probs, visible=visible)
    for head in range(h_kv):
        for j in range(t):
            seen = [i for i in range(q) if visible[0, head, i, j]]
            expected = sum(float(probs[0, head * g + gg, i, j]) for gg in range(g) for i in seen) / len(seen) if seen else 0.0
            assert sal[0, head, j].item() == pytest.approx(expected, rel=1e-5)
    assert torch.equal(normalized_attention(probs.reshape(b, h_kv, g, q, t), visible=visible), sal)


def test_attention_saliency_with_causal_probe_queries() -> None:
    gen = torch.Generator().manual_seed(1)
    b, h_kv, g, t = 1, 2, 3, 40
    queries = torch.randn(b, h_kv * g, t, D, generator=gen)
    keys = torch.randn(b, h_kv, t, D, generator=gen)
    probes = probe_positions(t, generator=gen)
    assert probes[-2:].tolist() == [38, 39] and len(probes) == 4 and probes.unique().numel() == 4
    query_index = probes.expand(b, -1)
    sal = attention_saliency(queries[:, :, probes], keys, D**-0.5, query_index=query_index)
    # brute force: causal softmax of the probe rows, then sum / number of probes that see each key
    logits = queries[:, :, probes] @ keys.repeat_interleave(g, 1).transpose(-1, -2) * D**-0.5
    causal = torch.arange(t)[None, :] <= probes[:, None]
    probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)
    visible = causal.expand(b, h_kv, -1, -1)
    torch.testing.assert_close(sal, normalized_attention(probs, visible=visible))
    # decoding: one query that sees everything -> saliency is its attention summed over the group
    dec = attention_saliency(queries[:, :, -1:], keys, D**-0.5)
    torch.testing.assert_close(dec, torch.softmax(logits[:, :, -1:].float(), -1).reshape(b, h_kv, g, t).sum(2))


def test_decode_step_recipe_saliency_from_the_step_attention() -> None:
    """append(flush=False) -> attend -> probabilities -> saliency -> flush: the tokens quantised at the
    gap get their bit width from the current query's attention, computed once for output and saliency."""
    store = KVStore(kvcache.create("quant", "zipcache:streaming_gap=6,ratio=0.5"), D, torch.float32)
    gen = torch.Generator().manual_seed(3)
    k, v = torch.randn(1, 2, 12, D, generator=gen), torch.randn(1, 2, 12, D, generator=gen)
    store.append(k[:, :, :6], v[:, :, :6], torch.rand(1, 2, 6, generator=gen))
    for t in range(6, 12):
        store.append(k[:, :, t : t + 1], v[:, :, t : t + 1], flush=False)
        query = torch.randn(1, 4, 1, D, generator=gen)
        _, lse = attend_packed(query, store, return_lse=True)  # the layer output comes from the same pass
        if store.will_flush(0):
            probs = packed_probabilities(query, store, lse=lse)
            saliency = normalized_attention(probs, kv_heads=2)
            store.flush(saliency)
    assert store.quantized_count().flatten().tolist() == [12, 12]
    # the 6 decode tokens: the 3 most attended by the last query (summed over its group) got 4 bits
    last = saliency[..., 6:]
    bits = store.bit_widths()[..., 6:]
    assert torch.equal(bits == 4, last >= last.sort(-1).values[..., 3:4])
