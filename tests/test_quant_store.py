"""Codecs and the per-layer store: registry, windows at their boundaries, salient bit widths, measured
bytes, and composition with eviction (exactly the kept tokens, bit for bit)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvcache
from kvcache.quant.quantizer import dequantize_groups, quantize_groups
from kvcache.quant.store import KVStore
from kvcache.registry import PolicyConfigError
from kvcache.selector import select_keep

D = 16


def _kv(b: int, h: int, t: int, d: int = D, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, t, d, generator=gen), torch.randn(b, h, t, d, generator=gen)


def _fp_count(store: kvcache.quant.KVStore) -> list[int]:
    return store.fp_count.flatten().tolist()


# ----------------------------------------------------------------------------------- registry, errors
def test_registered_with_defaults() -> None:
    assert {"none", "kivi", "zipcache"} <= set(kvcache.names("quant"))
    z = kvcache.create("quant", "zipcache")
    assert (z.high_bits, z.low_bits, z.low_key_bits, z.ratio, z.streaming_gap) == (4, 2, 4, 0.95, 100)
    assert z.buffer_dtype == "auto"
    k = kvcache.create("quant", "kivi:bits=4,group_size=16")
    assert (k.bits, k.group_size, k.residual) == (4, 16, 128)
    assert kvcache.create("quant", "kivi").bits == 2


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("kivi:bits=3", "bits must be one of 2, 4, 8"),
        ("kivi:group_size=0", "group_size must be an integer >= 1"),
        ("kivi:residual=-1", "residual must be an integer >= 0"),
        ("zipcache:high_bits=5", "high_bits must be one of 2, 4, 8"),
        ("zipcache:low_bits=1", "low_bits must be one of 2, 4, 8"),
        ("zipcache:high_bits=2,low_bits=4", "must not exceed high_bits"),
        ("zipcache:ratio=1.5", r"ratio must be a number in \[0.0, 1.0\]"),
        ("zipcache:streaming_gap=0", "streaming_gap must be an integer >= 1"),
        ("zipcache:low_key_bits=3", "low_key_bits must be one of 2, 4, 8"),
        ("zipcache:buffer_dtype=int8", "buffer_dtype must be one of 'auto', 'float16'"),
        ("kivi:scale_dtype=int8", "scale_dtype must be one of float16, bfloat16, float32"),
    ],
)
def test_bad_configs_name_the_valid_choices(spec: str, message: str) -> None:
    with pytest.raises(PolicyConfigError, match=message):
        kvcache.create("quant", spec)


def test_group_size_must_divide_head_dim() -> None:
    with pytest.raises(PolicyConfigError, match="group_size 48 does not divide head_dim 64; valid group sizes: 1, 2, 4, 8, 16, 32, 64"):
        KVStore(kvcache.create("quant", "kivi:group_size=48"), 64)
    with pytest.raises(PolicyConfigError, match="head_dim must be a multiple of 4"):
        KVStore(kvcache.create("quant", "zipcache"), 6)


# ---------------------------------------------------------------------------------------- none codec
def test_none_is_the_identity() -> None:
    k, v = _kv(2, 3, 37)
    store = KVStore(kvcache.create("quant", "none"), D, torch.float16)
    store.append(k, v)
    k2, v2 = store.dequantize()
    assert torch.equal(k2, k.half()) and torch.equal(v2, v.half())
    assert store.nbytes() == 2 * 2 * 3 * 37 * D * 2 + 2 * 3 * 4  # K+V at 2 bytes + the per-head counter
    assert (store.bit_widths() == 16).all()


# ---------------------------------------------------------------------------- KIVI residual window
R, G = 8, 4


def _kivi_quantised(tokens: int) -> int:
    return max(0, (tokens - R) // G) * G


@pytest.mark.parametrize("tokens", [R - 1, R, R + 1, R + G - 1, R + G, R + G + 1, 3 * R + 2])
def test_kivi_residual_window_at_prefill(tokens: int) -> None:
    k, v = _kv(1, 2, tokens)
    store = KVStore(kvcache.create("quant", f"kivi:residual={R},group_size={G}"), D, torch.float32)
    store.append(k, v)
    n_q = _kivi_quantised(tokens)
    assert store.quantized_count().flatten().tolist() == [n_q, n_q]
    assert _fp_count(store) == [tokens - n_q] * 2
    k2, v2 = store.dequantize()
    assert torch.equal(k2[:, :, n_q:], k[:, :, n_q:]) and torch.equal(v2[:, :, n_q:], v[:, :, n_q:])
    assert tokens - n_q >= min(tokens, R)  # the last R tokens are always full precision
    assert (store.bit_widths()[..., :n_q] == 2).all() and (store.bit_widths()[..., n_q:] == 32).all()


def test_kivi_residual_window_while_decoding() -> None:
    k, v = _kv(1, 2, R + 2 * G + 2)
    store = KVStore(kvcache.create("quant", f"kivi:residual={R},group_size={G}"), D, torch.float32)
    for t in range(k.shape[2]):
        assert store.will_flush(1) == (_kivi_quantised(t + 1) > _kivi_quantised(t))
        store.append(k[:, :, t : t + 1], v[:, :, t : t + 1])
        assert store.quantized_count().flatten().tolist() == [_kivi_quantised(t + 1)] * 2
        assert R <= _fp_count(store)[0] + (R - min(R, t + 1)) < R + G


# ------------------------------------------------------------------------ ZipCache streaming buffer
GAP = 5


def _zip(gap: int = GAP, **params: object) -> kvcache.quant.KVStore:
    """An fp32 ZipCache store whose buffer is fp32 too (these tests check bookkeeping, not the buffer dtype)."""
    spec = ",".join(f"{k}={v}" for k, v in {"streaming_gap": gap, "buffer_dtype": "float32", **params}.items())
    return KVStore(kvcache.create("quant", f"zipcache:{spec}"), D, torch.float32)


def _append_scored(store: kvcache.quant.KVStore, k: torch.Tensor, v: torch.Tensor, seed: int = 0) -> None:
    b, h, t, _ = k.shape
    sal = torch.rand(b, h, store.num_tokens + t, generator=torch.Generator().manual_seed(seed))
    store.append(k, v, sal)


@pytest.mark.parametrize("prompt", [GAP - 1, GAP, GAP + 1])
def test_zipcache_prompt_at_the_gap_boundary(prompt: int) -> None:
    store = _zip()
    k, v = _kv(1, 2, prompt)
    _append_scored(store, k, v)
    quantised = prompt if prompt >= GAP else 0
    assert store.quantized_count().flatten().tolist() == [quantised] * 2
    assert _fp_count(store) == [prompt - quantised] * 2


@pytest.mark.parametrize("steps", [GAP - 1, GAP, GAP + 1, 2 * GAP + 1])
def test_zipcache_decode_buffer_flushes_every_gap_steps(steps: int) -> None:
    prompt = 3 * GAP
    store = _zip()
    k, v = _kv(1, 2, prompt + steps)
    _append_scored(store, k[:, :, :prompt], v[:, :, :prompt])
    for t in range(prompt, prompt + steps):
        _append_scored(store, k[:, :, t : t + 1], v[:, :, t : t + 1], seed=t)
    buffered = steps % GAP
    assert _fp_count(store) == [buffered] * 2
    assert store.quantized_count().flatten().tolist() == [prompt + steps - buffered] * 2
    k2, _ = store.dequantize()
    assert torch.equal(k2[:, :, prompt + steps - buffered :], k[:, :, prompt + steps - buffered :])


def test_zipcache_needs_saliency_when_it_flushes() -> None:
    store = _zip()
    k, v = _kv(1, 2, GAP)
    assert store.will_flush(GAP - 1) is False and store.will_flush(GAP) is True
    store.append(k[:, :, :2], v[:, :, :2])  # buffered only: saliency not needed
    with pytest.raises(ValueError, match="needs their saliency"):
        store.append(k[:, :, 2:], v[:, :, 2:])
    with pytest.raises(ValueError, match=r"saliency must be \[B, H_kv, num_tokens \+ t\]"):
        store.append(k[:, :, 2:], v[:, :, 2:], torch.rand(1, 2, 3))


@settings(max_examples=20, deadline=None)
@given(tokens=st.integers(1, 40), ratio=st.sampled_from([0.0, 0.25, 0.4, 0.5, 1.0]), seed=st.integers(0, 999))
def test_salient_tokens_get_the_high_bit_width(tokens: int, ratio: float, seed: int) -> None:
    store = _zip(gap=1, ratio=ratio)
    k, v = _kv(2, 3, tokens, seed=seed)
    sal = torch.rand(2, 3, tokens, generator=torch.Generator().manual_seed(seed))
    store.append(k, v, sal)
    n_low = math.floor(ratio * tokens)
    rank = sal.argsort(-1).argsort(-1)  # 0 = least salient
    expected = torch.where(rank < n_low, 2, 4)
    assert torch.equal(store.bit_widths(), expected)


@pytest.mark.parametrize("low_key_bits", [2, 4])
def test_salient_tokens_are_reconstructed_better(low_key_bits: int) -> None:
    k, v = _kv(1, 2, 200, d=64, seed=3)
    spec = f"zipcache:streaming_gap=1,ratio=0.4,low_key_bits={low_key_bits}"
    store = KVStore(kvcache.create("quant", spec), 64, torch.float32)
    store.append(k, v, torch.rand(1, 2, 200, generator=torch.Generator().manual_seed(1)))
    k2, v2 = store.dequantize()
    high = store.bit_widths() == 4
    for orig, back, low_bits in ((k, k2, low_key_bits), (v, v2, 2)):
        err = (orig - back).pow(2).mean(-1)
        if low_bits < 4:  # regular tokens at fewer bits: well over 4x the error
            assert err[high].mean() * 4 < err[~high].mean()
        else:  # the same bits: the same error, up to the sets' own ranges
            assert err[~high].mean() < 2 * err[high].mean()


@pytest.mark.parametrize("low_key_bits", [2, 4, 8])
def test_regular_tokens_keys_at_low_key_bits(low_key_bits: int) -> None:
    """All tokens regular (ratio=1): keys are channel-wise min-max quantised at low_key_bits over the flush
    (quantize_groups, KIVI eq. 1), values at low_bits; the packed codes take exactly those widths."""
    k, v = _kv(1, 2, 40, d=64, seed=5)
    store = KVStore(kvcache.create("quant", f"zipcache:streaming_gap=1,ratio=1.0,low_key_bits={low_key_bits}"), 64, torch.float32)
    store.append(k, v, torch.rand(1, 2, 40))
    low = store.tiers[0]
    assert low.k_codes.shape[-1] == 64 * low_key_bits // 8 and low.v_codes.shape[-1] == 64 * 2 // 8
    assert store.tiers[1].rows == 0 and (store.bit_widths() == 2).all()
    codes, scale, zero = quantize_groups(k.half(), low_key_bits, 2, 40, torch.float16)  # the buffer is fp16 (auto)
    k2, _ = store.dequantize()
    assert torch.allclose(k2, dequantize_groups(codes, scale, zero, 2, 40), atol=1e-6)


@pytest.mark.parametrize(
    ("model_dtype", "buffer_dtype", "held"),
    [
        (torch.float32, "auto", torch.float16),  # the paper's 16-bit buffer for an fp32 model
        (torch.bfloat16, "auto", torch.bfloat16),  # a 16-bit model keeps its own dtype
        (torch.float32, "float32", torch.float32),
        (torch.float16, "bfloat16", torch.bfloat16),
    ],
)
def test_zipcache_buffer_dtype(model_dtype: torch.dtype, buffer_dtype: str, held: torch.dtype) -> None:
    k, v = _kv(1, 2, 10, d=64)
    k, v = k.to(model_dtype), v.to(model_dtype)
    store = KVStore(kvcache.create("quant", f"zipcache:buffer_dtype={buffer_dtype}"), 64, model_dtype)
    store.append(k, v)  # under the streaming gap: all buffered
    assert store.nbytes() == 2 * 2 * 10 * 64 * torch.empty((), dtype=held).element_size() + 2 * 4
    assert store.fp_k.dtype == model_dtype and torch.equal(store.fp_k, k.to(held).to(model_dtype))
    assert torch.equal(store.dequantize()[1], v.to(held).to(model_dtype))
    assert (store.bit_widths() == torch.finfo(held).bits).all()


# ------------------------------------------------------------------------------------ bytes held
CODECS = ["none", "kivi", "kivi:bits=4", "kivi:group_size=8,residual=16", "zipcache", "zipcache:ratio=0.7,streaming_gap=7,scale_dtype=bfloat16"]


@settings(max_examples=30, deadline=None)
@given(
    spec=st.sampled_from(CODECS),
    tokens=st.integers(1, 300),
    head_dim=st.sampled_from([32, 64, 128]),
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
)
def test_measured_bytes_match_the_formula(spec: str, tokens: int, head_dim: int, batch: int, heads: int, dtype: torch.dtype) -> None:
    codec = kvcache.create("quant", spec)
    store = KVStore(codec, head_dim, dtype)
    k, v = _kv(batch, heads, tokens, head_dim)
    store.append(k, v, torch.rand(batch, heads, tokens))
    assert store.nbytes() == codec.bytes_formula(tokens, head_dim, batch, heads, dtype)
    # and nbytes counts what is really held: every byte of every tensor
    held = [store._fp_k, store._fp_v, store.fp_count, store._flags] + [t for tier in store.tiers for t in tier.tensors()]
    assert store.nbytes() == sum(t.numel() * t.element_size() for t in held if t is not None)


def test_zipcache_defaults_compress_at_least_4_5x() -> None:
    tokens, head_dim = 4096, 64
    store = KVStore(kvcache.create("quant", "zipcache"), head_dim, torch.float16)
    k, v = _kv(1, 3, tokens, head_dim)
    store.append(k, v, torch.rand(1, 3, tokens))
    sixteen_bit = 2 * 3 * tokens * head_dim * 2
    assert sixteen_bit / store.nbytes() >= 4.5
    assert store.quantized_count().flatten().tolist() == [tokens] * 3


# ---------------------------------------------------------------------------- eviction composition
def _random_keep(b: int, h: int, t: int, c: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(t, generator=gen)[:c] for _ in range(b * h)]).reshape(b, h, c)


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(2, idx[..., None].expand(-1, -1, -1, x.shape[-1]))


@settings(max_examples=25, deadline=None)
@given(
    spec=st.sampled_from(["none", "kivi:residual=8,group_size=4", "zipcache:streaming_gap=6,buffer_dtype=float32",
                          "zipcache:streaming_gap=50,buffer_dtype=float32"]),
    prompt=st.integers(1, 60),
    steps=st.integers(0, 9),
    keep_frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 999),
)
def test_keep_holds_exactly_the_kept_tokens(spec: str, prompt: int, steps: int, keep_frac: float, seed: int) -> None:
    store = KVStore(kvcache.create("quant", spec), D, torch.float32)
    k, v = _kv(2, 3, prompt + steps, seed=seed)
    _append_scored(store, k[:, :, :prompt], v[:, :, :prompt], seed)
    for t in range(prompt, prompt + steps):
        _append_scored(store, k[:, :, t : t + 1], v[:, :, t : t + 1], seed + t)
    before_k, before_v = store.dequantize()
    before_bits = store.bit_widths()
    c = int(keep_frac * store.num_tokens)
    idx = _random_keep(2, 3, store.num_tokens, c, seed)
    store.keep(idx)
    ordered = idx.sort(-1).values  # kept slots keep their relative order
    after_k, after_v = store.dequantize()
    assert store.num_tokens == c
    assert torch.equal(after_k, _gather(before_k, ordered)) and torch.equal(after_v, _gather(before_v, ordered))
    assert torch.equal(store.bit_widths(), before_bits.gather(2, ordered))
    # appending (and flushing) after eviction keeps working: quantised tokens stay bit-identical, the
    # rest (buffered, then maybe quantised now) within half a quantisation step
    quantised = store.bit_widths() < 32
    new_k, new_v = _kv(2, 3, 7, seed=seed + 1)
    for t in range(7):
        _append_scored(store, new_k[:, :, t : t + 1], new_v[:, :, t : t + 1], seed + 100 + t)
    final_k, _ = store.dequantize()
    assert torch.equal(final_k[:, :, :c][quantised], after_k[quantised])
    step = max((tier.k_scale.float().max().item() for tier in store.tiers if tier.k_scale is not None), default=0.0)
    assert (final_k - torch.cat([after_k, new_k], 2)).abs().max() <= step / 2 + 1e-5


def test_keep_frees_memory_and_checks_indices() -> None:
    store = KVStore(kvcache.create("quant", "kivi:residual=16,group_size=8"), D, torch.float16)
    k, v = _kv(1, 2, 200)
    store.append(k, v)
    full = store.nbytes()
    store.keep(torch.arange(100).expand(1, 2, 100))  # 184 quantised + 16 buffered -> 100 quantised
    groups = math.ceil(100 / 8)  # key groups still in use (the last one partly)
    per_head = 2 * 100 * D * 2 // 8 + 2 * 100 * (D // 8) * 2 + groups * (2 * D * 2 + 4) + 4
    assert store.nbytes() == 2 * per_head < 0.55 * full
    store.keep(torch.arange(0, 100, 2).expand(1, 2, 50))  # every other token: key groups all still used
    assert store.nbytes() == 2 * (2 * 50 * D * 2 // 8 + 2 * 50 * (D // 8) * 2 + groups * (2 * D * 2 + 4) + 4)
    held, k_before = store.nbytes(), store.dequantize()[0]
    store.keep(torch.arange(50).expand(1, 2, 50))  # keep everything: nothing changes
    assert store.nbytes() == held and torch.equal(store.dequantize()[0], k_before)
    with pytest.raises(ValueError, match=r"keep indices must lie in \[0, 50\)"):
        store.keep(torch.full((1, 2, 3), 50))
    with pytest.raises(ValueError, match="repeat a slot"):
        store.keep(torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"indices must be \[B=1, H_kv=2, C\]"):
        store.keep(torch.zeros(2, 2, 2, dtype=torch.long))


def test_saliency_and_eviction_scores_from_one_set_of_statistics() -> None:
    """SnapKV-style window votes and ZipCache saliency from the same probabilities; the store then holds
    exactly the selector's tokens, at the bit widths the saliency ranking gives them."""
    from kvcache.attention.scoring import visibility, window_probabilities
    from kvcache.quant.saliency import normalized_attention

    b, h_kv, g, t, w = 1, 2, 3, 80, 8
    gen = torch.Generator().manual_seed(5)
    queries = torch.randn(b, h_kv * g, t, D, generator=gen)
    keys, values = _kv(b, h_kv, t, seed=6)
    key_index = torch.arange(t).expand(b, h_kv, t)
    key_valid = torch.ones(b, h_kv, t, dtype=torch.bool)
    query_index = torch.arange(t).expand(b, t)
    probs = window_probabilities(queries, keys, key_index, key_valid, query_index, D**-0.5, w)  # computed once
    votes = probs.sum(3).mean(2)  # the eviction policy's scores
    visible = visibility(key_index, key_valid, query_index[:, -w:])
    saliency = normalized_attention(probs, visible=visible)  # ZipCache's saliency
    protected = key_index >= t - w
    keep, _ = select_keep(votes, key_valid, protected, torch.tensor([40]), 40)
    store = KVStore(kvcache.create("quant", "zipcache:streaming_gap=16"), D, torch.float32)
    store.append(keys, values, saliency)
    before_k, _ = store.dequantize()
    store.keep(keep)
    assert torch.equal(store.dequantize()[0], _gather(before_k, keep))
    kept_saliency = saliency.gather(2, keep)
    bits = store.bit_widths()
    assert kept_saliency[bits == 4].min() >= kept_saliency[bits == 2].max()


# ---------------------------------------------------------------------- per-element bounds in the store
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_kivi_store_round_trip_within_each_elements_bound(bits: int) -> None:
    g, r, t = 8, 16, 100
    store = KVStore(kvcache.create("quant", f"kivi:bits={bits},group_size={g},residual={r}"), D, torch.float32)
    k, v = _kv(2, 3, t, seed=bits)
    store.append(k, v)
    n_q = max(0, (t - r) // g) * g
    tier = store.tiers[0]
    k_hat, v_hat = store.dequantize()
    k_step = tier.k_scale.float().repeat_interleave(g, 2)  # per channel, per group of g tokens
    v_step = tier.v_scale.float().repeat_interleave(g, 3)  # per token, per group of g channels
    assert ((k_hat - k)[:, :, :n_q].abs() <= k_step / 2 + 1e-6).all()
    assert ((v_hat - v)[:, :, :n_q].abs() <= v_step / 2 + 1e-6).all()
    assert torch.equal(k_hat[:, :, n_q:], k[:, :, n_q:])


def test_zipcache_store_round_trip_within_each_elements_bound() -> None:
    t = 60
    store = _zip(gap=t)
    k, v = _kv(2, 3, t, seed=9)
    v = v * torch.linspace(0.1, 10.0, D)  # uneven channels, as CSTQuant expects
    store.append(k, v, torch.rand(2, 3, t, generator=torch.Generator().manual_seed(2)))
    k_hat, v_hat = store.dequantize()
    bits = store.bit_widths()
    for tier in store.tiers:
        members = bits == tier.bits
        n = int(members[0, 0].sum())
        k_err = (k_hat - k)[members].reshape(2, 3, n, D).abs()
        v_err = (v_hat - v)[members].reshape(2, 3, n, D).abs()
        assert (k_err <= tier.k_scale.float() / 2 + 1e-6).all()  # one scale per channel per set
        assert (v_err <= tier.v_chan.float() * tier.v_scale.float() / 2 * (1 + 1e-5) + 1e-6).all()


def test_remove_drops_victims_and_the_rest_keeps_its_order() -> None:
    store = _zip(gap=4)
    k, v = _kv(1, 2, 12)
    _append_scored(store, k[:, :, :10], v[:, :, :10])
    for t in (10, 11):
        _append_scored(store, k[:, :, t : t + 1], v[:, :, t : t + 1], seed=t)
    assert store.bit_widths()[..., 10:].eq(32).all() and store.bit_widths()[..., :10].lt(32).all()
    before, _ = store.dequantize()
    victims = torch.tensor([[3, 11]])  # one slot per head: a quantised one and a buffered one
    store.remove(victims)
    keep = torch.tensor([[[s for s in range(12) if s != 3], [s for s in range(12) if s != 11]]])
    assert torch.equal(store.dequantize()[0], _gather(before, keep))
    with pytest.raises(ValueError, match="same number of distinct slots"):
        store.remove(torch.tensor([[[0, 0], [0, 1]]]))


def test_deferred_flush_equals_immediate_flush() -> None:
    """HF order: append the step's token, attend, then flush with that query's attention as saliency."""
    k, v = _kv(1, 2, GAP + 3)
    sal = torch.rand(1, 2, GAP + 3, generator=torch.Generator().manual_seed(4))
    now, later = _zip(), _zip()
    for t in range(GAP + 3):
        now.append(k[:, :, t : t + 1], v[:, :, t : t + 1], sal[..., : t + 1])
        later.append(k[:, :, t : t + 1], v[:, :, t : t + 1], flush=False)
        assert later.will_flush(0) == (t + 1 - later.quantized_count().max().item() >= GAP)
        later.flush(sal[..., : t + 1])
        assert torch.equal(now.dequantize()[0], later.dequantize()[0])
        assert torch.equal(now.bit_widths(), later.bit_widths())
    assert now.quantized_count().max().item() == GAP
    buffered = _zip()
    buffered.append(k, v, flush=False)  # past the gap, but deferred
    assert buffered.quantized_count().max().item() == 0 and buffered.will_flush(0)
    with pytest.raises(ValueError, match=r"saliency must be \[B, H_kv, num_tokens\]"):
        buffered.flush(sal[..., :3])
    buffered.flush(sal)
    assert buffered.quantized_count().max().item() == GAP + 3
