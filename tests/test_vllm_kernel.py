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


# ------------------------------------------------------------------------------------------------
# All layers at once (engine_adapters/vllm/compact.py) against the per-layer reference above

from kvcache.engine_adapters.vllm.compact import StackedKV, affine_strides, compact_order, fill_holes  # noqa: E402

LAYERS = 4


def layer_caches(dtype, block_size, shared, num_blocks=12):
    """Per-layer views as vLLM hands them out: one buffer, a constant stride between layers (``shared``),
    or separate tensors."""
    if shared:
        buffer = torch.zeros(LAYERS, num_blocks, H_KV, block_size, 2 * D, dtype=dtype)
        return [buffer[i] for i in range(LAYERS)]
    return [make_cache(dtype, block_size, num_blocks) for _ in range(LAYERS)]


def filled(dtype, block_size, shared, layout_write, t, block_ids):
    caches = layer_caches(dtype, block_size, shared)
    for cache in caches:
        keys, values = torch.randn(t, H_KV, D).to(dtype), torch.randn(t, H_KV, D).to(dtype)
        kc, vc = split(cache, block_size)
        pos = torch.arange(t)
        slots = torch.tensor(block_ids)[pos // block_size] * block_size + pos % block_size
        layout_write(keys, values, kc, vc, slots.long())
    return caches


def shuffled_writer(block_size):
    """A made-up kernel whose key tiles are a random (non-affine) permutation of [token, dim]."""
    perm = torch.randperm(block_size * D, generator=torch.Generator().manual_seed(1))

    def write(k, v, kc, vc, slots):
        for i, slot in enumerate(slots.tolist()):
            block, offset = divmod(slot, block_size)
            for head in range(k.shape[1]):
                tile = kc[block, head].reshape(-1)
                tile[perm.view(block_size, D)[offset]] = k[i, head]
                vc[block, head, offset] = v[i, head]

    return write


@pytest.mark.parametrize("kernel", ["vllm", "shuffled"])
@pytest.mark.parametrize("shared", [True, False])
def test_stacked_reads_and_moves_match_the_per_layer_reference(kernel, shared):
    torch.manual_seed(0)
    dtype, block_size = torch.float32, 32
    if kernel == "vllm":
        write = writer(cpu_attn._get_attn_isa(dtype, block_size, D))
    else:
        write = shuffled_writer(block_size)
    layout = probe_tile_layout(write, dtype, block_size, D)
    assert (affine_strides(layout.perm_k, block_size, D) is None) == (kernel == "shuffled")
    t, keep_n = 3 * block_size + 5, block_size + 7
    block_ids = [7, 2, 9, 4]
    caches = filled(dtype, block_size, shared, write, t, block_ids)
    stacked = StackedKV(caches, layout)
    assert len(stacked.parts) == (1 if shared else LAYERS)
    blocks = torch.tensor(block_ids)
    reference = [gather_tokens(c, layout, block_ids, t) for c in caches]
    assert torch.equal(stacked.read_keys(blocks, t), torch.stack([k for k, _ in reference]))

    # different kept slots per layer and head, the last 3 always (a recent window)
    keep = torch.stack([
        torch.stack([torch.cat([torch.randperm(t - 3)[: keep_n - 3].sort().values, torch.arange(t - 3, t)]) for _ in range(H_KV)])
        for _ in range(LAYERS)
    ])
    moved = stacked.move(blocks, compact_order(keep))
    assert 0 < moved <= LAYERS * H_KV * keep_n
    for layer, (keys, values) in enumerate(reference):
        gather = keep[layer][..., None].expand(-1, -1, D)
        k_back, v_back = gather_tokens(caches[layer], layout, block_ids, keep_n)
        assert torch.equal(k_back, keys.gather(1, gather)) and torch.equal(v_back, values.gather(1, gather))
    k_read, v_read = stacked.read(blocks, keep.sort(dim=-1).values[..., :5] % keep_n)
    assert k_read.shape == v_read.shape == (LAYERS, H_KV, 5, D)


def test_fill_holes_keeps_kept_slots_in_place_and_moves_only_the_tail():
    torch.manual_seed(0)
    capacity, extra = 20, 6
    keep = torch.stack([torch.randperm(capacity + extra)[:capacity].sort().values for _ in range(LAYERS * H_KV)])
    keep = keep.view(LAYERS, H_KV, capacity)
    source = fill_holes(keep, capacity)
    for row_keep, row_source in zip(keep.view(-1, capacity), source.view(-1, capacity)):
        kept = set(row_keep.tolist())
        assert set(row_source.tolist()) == kept  # exactly the kept slots, each once
        for slot, src in enumerate(row_source.tolist()):
            if slot in kept:
                assert src == slot  # a kept slot below C stays where it is
            else:
                assert src >= capacity  # a hole takes a kept slot from past C
        movers = sorted(s for s in kept if s >= capacity)
        holes = sorted(s for s in range(capacity) if s not in kept)
        assert [int(row_source[h]) for h in holes] == movers  # i-th hole <- i-th mover
