"""Compaction against the KV cache layouts of vLLM's attention backends: the real CPU kernel (its own
cache write and paged attention), and CPU tensors laid out as the GPU backends lay them out (FlashAttention,
FlashInfer, Triton in vLLM 0.32's physical orders, and the older 5-D caches), written by a torch version
of their ``reshape_and_cache_flash``. The layout is learned through the write op only; reads, writes and
compactions are checked against the backend's own view of its cache."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")
ops = pytest.importorskip("vllm._custom_ops")
cpu_attn = pytest.importorskip("vllm.v1.attention.backends.cpu_attn")

from kvcache.engine_adapters.vllm.layout import (  # noqa: E402
    gather_tokens, learn_kv_layout, probe_kv_layout, write_tokens,
)

H_KV, GROUP, D = 3, 3, 64
H_Q = H_KV * GROUP


def make_cache(dtype, block_size, num_blocks=12):
    return torch.zeros(num_blocks, H_KV, block_size, 2 * D, dtype=dtype)


def split(kv_cache, block_size):
    view = kv_cache.view(kv_cache.shape[0], H_KV, 2 * block_size, D)
    return view.chunk(2, dim=2)


def cpu_backend(dtype, block_size):
    """vLLM's CPU attention backend: the ISA its kernel uses, what its cache write reads of the impl
    (building a real impl needs a whole engine config) and of the layer."""
    isa = cpu_attn._get_attn_isa(dtype, block_size, D)
    impl = SimpleNamespace(attn_type="decoder", kv_cache_dtype="auto", head_size=D)
    layer = SimpleNamespace(isa=isa, _k_scale_float=1.0, _v_scale_float=1.0)
    return isa, impl, layer


def writer(impl, layer):
    """The backend's own cache write, ``CPUAttentionBackendImpl.do_kv_cache_update``, on a layer's
    ``[blocks, H, bs, 2D]`` cache."""

    def write(k, v, cache, slots):
        cpu_attn.CPUAttentionBackendImpl.do_kv_cache_update(impl, layer, k, v, cache, slots)

    return write


def cpu_layout(dtype, block_size):
    isa, impl, layer = cpu_backend(dtype, block_size)
    return isa, writer(impl, layer), probe_kv_layout(writer(impl, layer), make_cache(dtype, block_size), 0, block_size, H_KV, D)


def slots_of(block_ids, block_size, t):
    pos = torch.arange(t)
    return (torch.tensor(block_ids)[pos // block_size] * block_size + pos % block_size).long()


def fill(kv_cache, write, block_size, block_ids, keys, values):
    """Write tokens [T, H, D] with the backend's own write through the request's block table."""
    write(keys, values, kv_cache, slots_of(block_ids, block_size, keys.shape[0]))


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
    isa, write, layout = cpu_layout(dtype, block_size)
    t, keep_n = 3 * block_size + 17, block_size + 13
    block_ids = [7, 2, 9, 4, 0][: -(-t // block_size)]
    keys = torch.randn(t, H_KV, D).to(dtype)
    values = torch.randn(t, H_KV, D).to(dtype)
    kv_cache = make_cache(dtype, block_size)
    fill(kv_cache, write, block_size, block_ids, keys, values)

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
    isa, _, layout = cpu_layout(dtype, 128)
    for side in (layout.key, layout.value):
        assert sorted(side.table.flatten().tolist()) == list(range(128 * D))  # one tile of block_size * D elements
        assert side.block_stride == H_KV * 128 * 2 * D and side.head_stride == 128 * 2 * D
    assert layout.key.base == 0 and layout.value.base == 128 * D  # the value tile follows the key tile
    # values are stored token-major on every ISA we know; keys differ by ISA (transposed for 'vec')
    assert layout.value.affine == (D, 1)
    assert layout.transposed_keys == (layout.key.affine == (1, 128))
    assert layout.transposed_keys or isa not in ("vec", "vec16")


# ------------------------------------------------------------------------------------------------
# All layers at once (engine_adapters/vllm/compact.py), in every backend's layout, against each backend's
# own view of its cache

from kvcache.engine_adapters.vllm.compact import StackedKV, compact_order, fill_holes  # noqa: E402

LAYERS = 4
BLOCKS = 12


def torch_reshape_and_cache_flash(key, value, key_cache, value_cache, slots):
    """vLLM's ``reshape_and_cache_flash`` (the GPU backends' cache write) in torch: the token in slot s goes
    to ``key_cache[s // block_size, s % block_size]`` ([num_blocks, block_size, H_kv, D] views, any strides)."""
    bs = key_cache.shape[1]
    key_cache[slots // bs, slots % bs] = key.to(key_cache.dtype)
    value_cache[slots // bs, slots % bs] = value.to(value_cache.dtype)


def views_0_32(cache):
    """vLLM 0.32's GPU backends: a layer's logical [blocks, H, bs, 2D] cache, keys the first D channels
    (``kv_cache.transpose(1, 2).split(head_size, dim=-1)`` in flash_attn.py, flashinfer.py, triton_attn.py)."""
    return cache.transpose(1, 2).split(D, dim=-1)


# name -> (allocate(dtype, block_size) -> per-layer caches of one buffer, the backend's [blocks, bs, H, D] views)
GPU_LAYOUTS = {
    # vLLM 0.32 KVCacheLayout physical orders of the [L, B, H, N, C] cache
    "LBNHC-flashattn-NHD": (
        lambda dtype, bs: [b.permute(0, 2, 1, 3) for b in torch.zeros(LAYERS, BLOCKS, bs, H_KV, 2 * D, dtype=dtype)],
        views_0_32,
    ),
    "LBHNC-flashinfer-HND": (lambda dtype, bs: list(torch.zeros(LAYERS, BLOCKS, H_KV, bs, 2 * D, dtype=dtype)), views_0_32),
    "BLHNC-layers-inside-blocks": (
        lambda dtype, bs: list(torch.zeros(BLOCKS, LAYERS, H_KV, bs, 2 * D, dtype=dtype).unbind(1)), views_0_32,
    ),
    "LHBNC-heads-outside-blocks": (
        lambda dtype, bs: [b.transpose(0, 1) for b in torch.zeros(LAYERS, H_KV, BLOCKS, bs, 2 * D, dtype=dtype)], views_0_32,
    ),
    # earlier releases: (2, num_blocks, block_size, H_kv, D) FlashAttention, (num_blocks, 2, ...) FlashInfer/Triton
    "2xBNHD-flashattn-older": (
        lambda dtype, bs: list(torch.zeros(LAYERS, 2, BLOCKS, bs, H_KV, D, dtype=dtype)), lambda c: (c[0], c[1]),
    ),
    "Bx2NHD-flashinfer-older": (
        lambda dtype, bs: list(torch.zeros(LAYERS, BLOCKS, 2, bs, H_KV, D, dtype=dtype)), lambda c: (c[:, 0], c[:, 1]),
    ),
}


def gpu_write(views):
    def write(k, v, cache, slots):
        key_cache, value_cache = views(cache)
        torch_reshape_and_cache_flash(k, v, key_cache, value_cache, slots)

    return write


def gpu_read(views):
    """The backend's own read of a request's first ``length`` slots: ``[H, length, D]`` keys and values."""

    def read(cache, block_ids, length):
        key_cache, value_cache = views(cache)
        bs = key_cache.shape[1]
        pos = torch.arange(length)
        blocks = torch.tensor(block_ids)[pos // bs]
        return key_cache[blocks, pos % bs].transpose(0, 1), value_cache[blocks, pos % bs].transpose(0, 1)

    return read


def shuffled_writer(block_size):
    """A made-up CPU-style kernel whose key tiles are a random (non-affine) permutation of [token, dim]."""
    perm = torch.randperm(block_size * D, generator=torch.Generator().manual_seed(1)).view(block_size, D)

    def write(k, v, cache, slots):
        kc, vc = split(cache, block_size)
        for i, slot in enumerate(slots.tolist()):
            block, offset = divmod(slot, block_size)
            for head in range(k.shape[1]):
                kc[block, head].reshape(-1)[perm[offset]] = k[i, head]
                vc[block, head, offset] = v[i, head]

    def read(cache, block_ids, length):
        kc, vc = split(cache, block_size)
        pos = torch.arange(length)
        blocks = torch.tensor(block_ids)[pos // block_size]
        tiles = kc.reshape(kc.shape[0], H_KV, block_size * D)[blocks]  # [length, H, bs * D]
        keys = tiles.gather(-1, perm[pos % block_size][:, None, :].expand(-1, H_KV, -1))  # [length, H, D]
        return keys.transpose(0, 1), vc[blocks, :, pos % block_size].transpose(0, 1)

    return write, read


def backend(name, dtype, block_size):
    """(per-layer caches, the backend's write, its own reader of a request's slots)."""
    if name in GPU_LAYOUTS:
        allocate, views = GPU_LAYOUTS[name]
        return allocate(dtype, block_size), gpu_write(views), gpu_read(views)
    if name in ("cpu-shared", "shuffled"):
        caches = list(torch.zeros(LAYERS, BLOCKS, H_KV, block_size, 2 * D, dtype=dtype))
    else:  # separate tensors per layer
        caches = [make_cache(dtype, block_size, BLOCKS) for _ in range(LAYERS)]
    if name == "shuffled":
        write, read = shuffled_writer(block_size)
        return caches, write, read
    _, impl, layer = cpu_backend(dtype, block_size)
    layout = probe_kv_layout(writer(impl, layer), caches[0], 0, block_size, H_KV, D)  # validated by the kernel tests above
    return caches, writer(impl, layer), lambda cache, ids, n: gather_tokens(cache, layout, ids, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["cpu-shared", "cpu-separate", "shuffled", *GPU_LAYOUTS])
def test_stacked_reads_and_moves_match_the_backends_own_view(name, dtype):
    torch.manual_seed(0)
    block_size = 32 if name.startswith(("cpu", "shuffled")) else 16
    caches, write, read = backend(name, dtype, block_size)
    layout = learn_kv_layout(write, caches[0], BLOCKS, block_size, H_KV, D)
    assert (layout.key.affine is None) == (name == "shuffled")
    t, keep_n = 3 * block_size + 5, block_size + 7
    block_ids = [7, 2, 9, 4]
    written = []
    for cache in caches:
        keys, values = torch.randn(t, H_KV, D).to(dtype), torch.randn(t, H_KV, D).to(dtype)
        fill(cache, write, block_size, block_ids, keys, values)
        written.append((keys.transpose(0, 1), values.transpose(0, 1)))
        assert all(torch.equal(got, want) for got, want in zip(read(cache, block_ids, t), written[-1]))
    stacked = StackedKV(caches, layout)
    assert len(stacked.parts) == (LAYERS if name == "cpu-separate" else 1)  # one strided view over all layers
    blocks = torch.tensor(block_ids)
    assert torch.equal(stacked.read_keys(blocks, t), torch.stack([k for k, _ in written]))
    assert torch.equal(stacked.read_values(blocks, t), torch.stack([v for _, v in written]))

    # different kept slots per layer and head, the last 3 always (a recent window)
    keep = torch.stack([
        torch.stack([torch.cat([torch.randperm(t - 3)[: keep_n - 3].sort().values, torch.arange(t - 3, t)]) for _ in range(H_KV)])
        for _ in range(LAYERS)
    ])
    moved = stacked.move(blocks, compact_order(keep))
    assert 0 < moved <= LAYERS * H_KV * keep_n
    for layer, (keys, values) in enumerate(written):
        gather = keep[layer][..., None].expand(-1, -1, D)
        k_back, v_back = read(caches[layer], block_ids, keep_n)
        assert torch.equal(k_back, keys.gather(1, gather)) and torch.equal(v_back, values.gather(1, gather))
    k_read, v_read = stacked.read(blocks, keep.sort(dim=-1).values[..., :5] % keep_n)
    assert k_read.shape == v_read.shape == (LAYERS, H_KV, 5, D)


@pytest.mark.parametrize("name", list(GPU_LAYOUTS))
def test_decode_recompaction_in_gpu_layouts_matches_a_paged_attention_reference(name):
    """A decode re-compaction (fill_holes: kept tokens past C move into evicted slots below C) in a GPU
    layout; paged attention read through the backend's own views over the compacted blocks equals
    attention over the kept tokens."""
    torch.manual_seed(1)
    dtype, block_size = torch.float32, 16
    allocate, views = GPU_LAYOUTS[name]
    caches = allocate(dtype, block_size)
    layout = learn_kv_layout(gpu_write(views), caches[0], BLOCKS, block_size, H_KV, D)
    capacity, extra = 2 * block_size + 3, 8
    t = capacity + extra
    block_ids = [5, 11, 0]
    written = []
    for cache in caches:
        keys, values = torch.randn(t, H_KV, D), torch.randn(t, H_KV, D)
        fill(cache, gpu_write(views), block_size, block_ids, keys, values)
        written.append((keys.transpose(0, 1), values.transpose(0, 1)))
    keep = torch.stack([
        torch.stack([torch.cat([torch.randperm(t - 2)[: capacity - 2].sort().values, torch.arange(t - 2, t)]) for _ in range(H_KV)])
        for _ in range(LAYERS)
    ])
    source = fill_holes(keep, capacity)
    StackedKV(caches, layout).move(torch.tensor(block_ids), source)
    query = torch.randn(2, H_Q, D)
    for layer, (keys, values) in enumerate(written):
        key_cache, value_cache = views(caches[layer])  # [blocks, bs, H, D]
        table = torch.tensor(block_ids)
        paged_k = key_cache[table].reshape(-1, H_KV, D)[:capacity].transpose(0, 1)  # the backend's paged read
        paged_v = value_cache[table].reshape(-1, H_KV, D)[:capacity].transpose(0, 1)
        gather = source[layer][..., None].expand(-1, -1, D)
        want = reference_attention(query, keys.gather(1, gather), values.gather(1, gather), D**-0.5)
        got = reference_attention(query, paged_k, paged_v, D**-0.5)
        assert torch.allclose(got, want, atol=1e-5)
        # the kept set is exactly keep (in slot order after fill_holes): attention is order-independent but the set is not
        assert torch.equal(source[layer].sort(dim=-1).values, keep[layer])


def test_probe_refuses_a_write_that_is_not_a_placement():
    caches = GPU_LAYOUTS["LBHNC-flashinfer-HND"][0](torch.float32, 16)

    def drops_a_head(k, v, cache, slots):
        key_cache, value_cache = views_0_32(cache)
        torch_reshape_and_cache_flash(k[:, :1], v[:, :1], key_cache[:, :, :1], value_cache[:, :, :1], slots)

    with pytest.raises(RuntimeError, match="could not learn the KV cache layout"):
        learn_kv_layout(drops_a_head, caches[0], BLOCKS, 16, H_KV, D)


def test_query_capture_follows_any_backend_with_the_shared_forward_signature():
    """The capture wraps whatever impl class the layers use (here a stand-in GPU backend), once per class;
    a subclass that overrides ``forward`` is wrapped on its own."""
    from kvcache.engine_adapters.vllm import worker

    class FakeImpl:
        num_heads, head_size = H_Q, D

        def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None):
            output.fill_(1.0)
            return output

    class FakeSubImpl(FakeImpl):
        def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None):
            return output

    worker.patch_attention_impl(FakeImpl)
    worker.patch_attention_impl(FakeImpl)  # idempotent
    worker.patch_attention_impl(FakeSubImpl)
    query = torch.randn(7, H_Q * D)
    store = torch.zeros(2, 3, H_Q, D)
    worker._CAPTURE = {"rows": torch.tensor([2, 5, 6]), "store": store, "layers": {"l0": 0, "l1": 1}}
    try:
        out = FakeImpl().forward(SimpleNamespace(layer_name="l1"), query, None, None, None, object(), torch.zeros(7, 4))
        FakeSubImpl().forward(SimpleNamespace(layer_name="l0"), query, None, None, None, object(), torch.zeros(7, 4))
    finally:
        worker._CAPTURE = None
    assert bool((out == 1.0).all())  # the backend still runs
    want = query.view(7, H_Q, D)[[2, 5, 6]]
    assert torch.equal(store[1], want) and torch.equal(store[0], want)


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
