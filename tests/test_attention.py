"""Attention over compacted slots against HF eager attention (the ground truth)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.llama.modeling_llama import eager_attention_forward

from kvcache.attention.backends import attend
from kvcache.attention.scoring import column_sums, visibility, window_probabilities
from kvcache.engine_adapters.hf.cache import PolicyLayer


class _Module(torch.nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.training = False


def hf_eager(queries, keys, values, allowed, scaling):
    """HF eager attention with a float mask built from ``allowed [B, H_q, q, T]``."""
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    module = _Module(queries.shape[1] // keys.shape[1])
    out, _ = eager_attention_forward(module, queries, keys, values, mask, scaling=scaling)
    return out.transpose(1, 2)


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 2), h_kv=st.integers(1, 3), group=st.integers(1, 3), t=st.integers(3, 40),
    q=st.integers(1, 3), seed=st.integers(0, 999), backend=st.sampled_from(["sdpa", "reference"]),
)
def test_compacted_attention_equals_eager_over_full_cache_with_evicted_masked(b, h_kv, group, t, q, seed, backend):
    """Keep a different random subset per (sequence, KV head); attention over the compacted slots must
    equal HF eager attention over the whole cache with the evicted positions masked out."""
    gen = torch.Generator().manual_seed(seed)
    d = 8
    keys, values = torch.randn(b, h_kv, t, d, generator=gen), torch.randn(b, h_kv, t, d, generator=gen)
    queries = torch.randn(b, h_kv * group, q, d, generator=gen)
    past = t - q
    layer = PolicyLayer()
    layer.update(keys[:, :, :past], values[:, :, :past])
    kept = max(1, past // 2)
    slots = torch.stack([torch.stack([torch.randperm(past, generator=gen)[:kept].sort().values for _ in range(h_kv)]) for _ in range(b)]) if past else torch.zeros(b, h_kv, 0, dtype=torch.long)
    if past:
        layer.keep(slots, torch.ones_like(slots, dtype=torch.bool), headroom=0)
    k_now, v_now = layer.update(keys[:, :, past:], values[:, :, past:])
    query_index = torch.arange(past, t).expand(b, q)
    ours = attend(queries, k_now, v_now, visibility(layer.index, layer.valid, query_index), d**-0.5, backend)

    allowed = torch.zeros(b, h_kv, q, t, dtype=torch.bool)
    for row in range(b):
        for head in range(h_kv):
            for s in (slots[row, head].tolist() if past else []):
                allowed[row, head, :, s] = True
    allowed[..., past:] = torch.ones(q, q, dtype=torch.bool).tril()
    reference = hf_eager(queries, keys, values, allowed.repeat_interleave(group, dim=1), d**-0.5)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_column_sums_and_window_probs_match_the_dense_softmax():
    gen = torch.Generator().manual_seed(1)
    queries, keys = torch.randn(2, 4, 50, 8, generator=gen), torch.randn(2, 2, 50, 8, generator=gen)
    index = torch.arange(50).expand(2, 2, 50)
    valid = torch.ones(2, 2, 50, dtype=torch.bool)
    valid[1, :, :5] = False  # left padding of sequence 1
    q_index = torch.arange(50).expand(2, 50)
    allowed = visibility(index, valid, q_index)[:, :, None]
    z = (queries.reshape(2, 2, 2, 50, 8) @ keys[:, :, None].transpose(-1, -2)) * 8**-0.5
    dense = torch.softmax(z.masked_fill(~allowed, float("-inf")), dim=-1)
    import kvcache.attention.scoring as scoring

    old = scoring.CHUNK_ELEMENTS
    scoring.CHUNK_ELEMENTS = 2 * 4 * 50 * 7  # force 8 query chunks
    try:
        torch.testing.assert_close(column_sums(queries, keys, index, valid, q_index, 8**-0.5), dense.sum(dim=3))
    finally:
        scoring.CHUNK_ELEMENTS = old
    torch.testing.assert_close(
        window_probabilities(queries, keys, index, valid, q_index, 8**-0.5, 6), dense[:, :, :, -6:]
    )
    assert torch.isfinite(dense[1, :, :, :5]).all()  # padding queries see themselves: no NaNs


# -- decode attention that also returns its probabilities (scoring reuses them) -----------------------------
@pytest.mark.parametrize("group", [1, 3])
def test_attention_with_probabilities_equals_eager_attention(group):
    from kvcache.attention.backends import attention_with_probabilities, reference_attention

    gen = torch.Generator().manual_seed(group)
    queries = torch.randn(2, 2 * group, 1, 16, generator=gen)
    keys, values = torch.randn(2, 2, 9, 16, generator=gen), torch.randn(2, 2, 9, 16, generator=gen)
    out, probs = attention_with_probabilities(queries, keys, values, 0.25)
    torch.testing.assert_close(out, reference_attention(queries, keys, values, None, 0.25))
    expected = torch.softmax(queries @ keys.repeat_interleave(group, dim=1).transpose(-1, -2) * 0.25, dim=-1)
    torch.testing.assert_close(probs, expected)
    assert probs.dtype == torch.float32 and probs.shape == (2, 2 * group, 1, 9)


# -- a per-key logit bias (ALiBi) in every backend and statistic ---------------------------------------------
def test_alibi_key_bias_in_attention_and_scores_matches_the_dense_softmax():
    """ALiBi over scattered kept positions: ``key_bias`` (slope * (p_j - reference)) gives every backend and
    statistic the softmax of z - slope * (i - p_j), the bias of each query's own distance, whatever the reference."""
    from kvcache.attention.backends import attention_with_probabilities
    from kvcache.attention.scoring import alibi_key_bias

    gen = torch.Generator().manual_seed(4)
    b, h_kv, group, t, q, d = 2, 2, 3, 12, 3, 8
    queries = torch.randn(b, h_kv * group, q, d, generator=gen)
    keys, values = torch.randn(b, h_kv, t, d, generator=gen), torch.randn(b, h_kv, t, d, generator=gen)
    kept = torch.stack([torch.randperm(40, generator=gen)[: t - q].sort().values for _ in range(b * h_kv)])
    index = torch.cat([kept.view(b, h_kv, t - q), torch.arange(40, 40 + q).expand(b, h_kv, q)], dim=-1)
    valid = torch.ones(b, h_kv, t, dtype=torch.bool)
    valid[1, :, :2] = False  # padding
    q_index = torch.arange(40, 40 + q).expand(b, q)
    slopes = torch.tensor([0.5, 0.25, 0.125, 2**-4, 2**-5, 2**-6])
    bias = alibi_key_bias(slopes, index, 40 + q - 1)
    visible = visibility(index, valid, q_index)  # [B, H_kv, q, T]
    distance = (q_index[:, None, :, None] - index.repeat_interleave(group, 1)[:, :, None, :]).float()
    z = queries @ keys.repeat_interleave(group, 1).transpose(-1, -2) * d**-0.5 - slopes.view(1, -1, 1, 1) * distance
    dense = torch.softmax(z.masked_fill(~visible.repeat_interleave(group, 1), float("-inf")), dim=-1)
    expected = dense @ values.repeat_interleave(group, 1)
    for backend in ("sdpa", "reference"):
        out = attend(queries, keys, values, visible, d**-0.5, backend, key_bias=bias)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    grouped = dense.reshape(b, h_kv, group, q, t)
    torch.testing.assert_close(column_sums(queries, keys, index, valid, q_index, d**-0.5, key_bias=bias), grouped.sum(3))
    torch.testing.assert_close(
        window_probabilities(queries, keys, index, valid, q_index, d**-0.5, 2, bias), grouped[:, :, :, -2:]
    )
    # a decode query over real tokens only (no mask): the probabilities attention returns carry the bias too
    out, probs = attention_with_probabilities(queries[:1, :, -1:], keys[:1], values[:1], d**-0.5, bias[:1])
    torch.testing.assert_close(probs, dense[:1, :, -1:], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out, expected[:1, :, -1:], atol=1e-5, rtol=1e-5)
