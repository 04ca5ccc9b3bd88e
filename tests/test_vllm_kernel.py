"""Compaction against vLLM's real CPU attention kernel: the learned tile layout, gather, write, and
attention over compacted blocks with different kept tokens per KV head."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")
ops = pytest.importorskip("vllm._custom_ops")
cpu_attn = pytest.importorskip("vllm.v1.attention.backends.cpu_attn")

from kvcache.engine_adapters.vllm.layout import gather_tokens, probe_tile_layout, write_tokens  # noqa: E402

H_KV, GROUP, D = 3, 3, 64
H_Q = H_KV * GROUP


def make_cache(dtype, block_size, num_blocks=12):
    return torch.zeros(num_blocks, H_KV, block_size, 2 * D, dtype=dtype)


def split(kv_cache, block_size):
    view = kv_cache.view(kv_cache.shape[0], H_KV, 2 * block_size, D)
    return view.chunk(2, dim=2)


def writer(isa):
    def write(k, v, kc, vc, slots):
        ops.cpu_attn_reshape_and_cache(k, v, kc, vc, slots, isa)

    return write


def fill(kv_cache, isa, block_size, block_ids, keys, values):
    """Write tokens [T, H, D] with vLLM's own reshape_and_cache through the request's block table."""
    t = keys.shape[0]
    pos = torch.arange(t)
    slots = torch.tensor(block_ids)[pos // block_size] * block_size + pos % block_size
    kc, vc = split(kv_cache, block_size)
    ops.cpu_attn_reshape_and_cache(keys, values, kc, vc, slots.long(), isa)


def kernel_attention(kv_cache, isa, dtype, block_size, block_ids, query, seq_len, scale):
    """vLLM's paged attention for one request whose last ``query.shape[0]`` tokens are the queries."""
    q = query.shape[0]
    kc, vc = split(kv_cache, block_size)
    qsl = torch.tensor([0, q], dtype=torch.int32)
    seq_lens = torch.tensor([seq_len], dtype=torch.int32)
    n_blocks = -(-seq_len // block_size)
    block_table = torch.tensor([block_ids[:n_blocks]], dtype=torch.int32)
    meta = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=1, num_heads=H_Q, num_kv_heads=H_KV, head_dim=D, seq_lens=seq_lens, dtype=dtype,
        query_start_loc=qsl, causal=True, sliding_window_size=-1, isa=isa, enable_kv_split=False,
    )
    out = torch.empty(q, H_Q, D, dtype=dtype)
    ops.cpu_attention_with_kv_cache(
        query=query, key_cache=kc, value_cache=vc, output=out, query_start_loc=qsl, seq_lens=seq_lens,
        scale=scale, causal=True, alibi_slopes=None, sliding_window=-1, block_table=block_table, softcap=0.0,
        scheduler_metadata=meta, s_aux=None,
    )
    return out.float()


def reference_attention(query, keys, values, scale):
    """softmax(q K^T * scale) V per query head over its KV head's tokens [H_kv, C, D]; causal for a
    block of queries that are the last tokens."""
    q = query.shape[0]
    c = keys.shape[1]
    out = torch.empty(q, H_Q, D)
    for head in range(H_Q):
        k, v = keys[head // GROUP].float(), values[head // GROUP].float()
        logits = query[:, head].float() @ k.T * scale
        causal = torch.arange(c)[None, :] <= (c - q + torch.arange(q))[:, None]
        logits = logits.masked_fill(~causal, float("-inf"))
        out[:, head] = torch.softmax(logits, dim=-1) @ v
    return out


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("block_size", [32, 128])
def test_compacted_blocks_match_reference_attention(dtype, tol, block_size):
    torch.manual_seed(0)
    isa = cpu_attn._get_attn_isa(dtype, block_size, D)
    layout = probe_tile_layout(writer(isa), dtype, block_size, D)
    t, keep_n = 3 * block_size + 17, block_size + 13
    block_ids = [7, 2, 9, 4, 0][: -(-t // block_size)]
    keys = torch.randn(t, H_KV, D).to(dtype)
    values = torch.randn(t, H_KV, D).to(dtype)
    kv_cache = make_cache(dtype, block_size)
    fill(kv_cache, isa, block_size, block_ids, keys, values)

    # the learned layout reads back exactly what the kernel wrote
    k_read, v_read = gather_tokens(kv_cache, layout, block_ids, t)
    assert torch.equal(k_read, keys.transpose(0, 1)) and torch.equal(v_read, values.transpose(0, 1))

    # keep different tokens per KV head (the last 3 always, as a recent window would)
    keep = torch.stack([torch.cat([torch.randperm(t - 3)[: keep_n - 3].sort().values, torch.arange(t - 3, t)]) for _ in range(H_KV)])
    assert not torch.equal(keep[0], keep[1])
    gather = keep[..., None].expand(-1, -1, D)
    k_kept, v_kept = k_read.gather(1, gather), v_read.gather(1, gather)
    write_tokens(kv_cache, layout, block_ids, k_kept, v_kept)
    k_back, _ = gather_tokens(kv_cache, layout, block_ids, keep_n)
    assert torch.equal(k_back, k_kept)

    scale = D**-0.5
    query = torch.randn(3, H_Q, D).to(dtype)
    got = kernel_attention(kv_cache, isa, dtype, block_size, block_ids, query, keep_n, scale)
    want = reference_attention(query, k_kept, v_kept, scale)
    assert torch.allclose(got, want, atol=tol, rtol=tol), (got - want).abs().max()
    # head 0's selection for every head is a different answer: the test tells the heads apart
    wrong = reference_attention(query, k_kept[[0, 0, 0]], v_kept[[0, 0, 0]], scale)
    assert not torch.allclose(got, wrong, atol=tol, rtol=tol)


def test_layout_probe_reports_key_transposition():
    dtype = torch.float32
    isa = cpu_attn._get_attn_isa(dtype, 128, D)
    layout = probe_tile_layout(writer(isa), dtype, 128, D)
    assert sorted(layout.perm_k.tolist()) == list(range(128 * D))
    # values are stored token-major on every ISA we know; keys differ by ISA (e.g. transposed for 'vec')
    assert torch.equal(layout.perm_v, torch.arange(128 * D)) or isa not in ("vec", "vec16")
