"""The Hugging Face adapter with a quantised KV store (``kv_policy(..., quant=...)``): eviction and
quantisation compose, ``quant="none"`` is the dense path, bytes are what the stores hold."""

from __future__ import annotations

import pytest
import torch
from conftest import padded_batch

from kvcache.engine_adapters.hf import kv_policy
from kvcache.engine_adapters.hf.cache import PolicyLayer, QuantPolicyLayer
from kvcache.registry import PolicyConfigError

# codecs sized for the tiny models' 16-channel heads and short prompts, so tokens really get quantised
KIVI4 = "kivi:bits=4,group_size=16,residual=16"
KIVI2 = "kivi:bits=2,group_size=16,residual=16"
ZIP84 = "zipcache:high_bits=8,low_bits=4,streaming_gap=32"
ZIP = "zipcache:streaming_gap=32"


def generate(model, ids, mask, new_tokens=8, **kw):
    with kv_policy(model, **kw) as session:
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
            output_scores=True, return_dict_in_generate=True,
        )
        return out, session.stats(), session.last_cache


def prompt_pass(model, ids, mask, **kw):
    with kv_policy(model, **kw) as session:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        return session.last_cache, session.stats()


def test_quant_none_is_the_dense_path(make_model) -> None:
    model = make_model("llama")
    ids, mask = padded_batch([90, 71], seed=3)
    dense, dense_stats, dense_cache = generate(model, ids, mask, policy="snapkv", budget=0.5)
    for quant in (None, "none"):
        out, stats, cache = generate(model, ids, mask, policy="snapkv", budget=0.5, quant=quant)
        assert all(type(layer) is PolicyLayer for layer in cache.layers)
        torch.testing.assert_close(out.sequences, dense.sequences, rtol=0, atol=0)
        for a, b in zip(out.scores, dense.scores):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert stats["kv_bytes"] == dense_stats["kv_bytes"] and stats["quant"] == "none"


@pytest.mark.parametrize("quant, atol", [(KIVI4, 0.05), (ZIP84, 0.05)])
def test_quantised_full_budget_generates_like_the_full_cache(make_model, quant: str, atol: float) -> None:
    model = make_model("llama")
    ids, mask = padded_batch([70, 52], seed=1)
    full, _, _ = generate(model, ids, mask, new_tokens=10, policy="full", budget=1.0)
    out, stats, cache = generate(model, ids, mask, new_tokens=10, policy="full", budget=1.0, quant=quant)
    layer = cache.layers[0]
    assert isinstance(layer, QuantPolicyLayer)
    assert int(layer.store.quantized_count().min()) > 0  # the check below is about quantised tokens
    assert stats["quant"] == quant.split(":")[0]
    torch.testing.assert_close(out.sequences, full.sequences, rtol=0, atol=0)
    error = max(float((a - b).abs().max()) for a, b in zip(out.scores, full.scores))
    assert error < atol, error


@pytest.mark.parametrize("quant", [KIVI2, ZIP])
def test_low_bit_logits_stay_close(make_model, quant: str) -> None:
    """2-bit codes move the logits by their quantisation error, far less than the logits' own spread."""
    model = make_model("llama")
    ids, mask = padded_batch([70, 52], seed=1)
    full, _, _ = generate(model, ids, mask, new_tokens=4, policy="full", budget=1.0)
    out, _, cache = generate(model, ids, mask, new_tokens=4, policy="full", budget=1.0, quant=quant)
    assert int(cache.layers[0].store.quantized_count().min()) > 0
    first, ref = out.scores[0], full.scores[0]
    cosine = torch.nn.functional.cosine_similarity(first, ref, dim=-1)
    assert bool((cosine > 0.99).all()), cosine
    assert float((first - ref).abs().max()) < 0.25 * float(ref.std())


@pytest.mark.parametrize("policy", ["snapkv", "h2o", "keyformer", "streaming"])
@pytest.mark.parametrize("quant", [ZIP, KIVI2])
def test_store_keeps_exactly_the_slots_eviction_keeps(make_model, policy: str, quant: str) -> None:
    model = make_model("llama")
    ids, mask = padded_batch([90, 71], seed=5)
    params = {"seed": 0} if policy == "keyformer" else {}  # keyformer's Gumbel noise is random unless seeded
    dense, _ = prompt_pass(model, ids, mask, policy=policy, budget=0.5, **params)
    quant_cache, _ = prompt_pass(model, ids, mask, policy=policy, budget=0.5, quant=quant, **params)
    for plain, packed in zip(dense.layers, quant_cache.layers):
        assert isinstance(packed, QuantPolicyLayer)
        store = packed.store
        assert store.num_tokens == packed.length == packed.index.shape[-1]
        assert int(store.quantized_count().min()) > 0  # eviction happened before the flush, and it flushed
        for b in range(ids.shape[0]):
            for h in range(packed.index.shape[1]):
                want = sorted(plain.index[b, h][plain.valid[b, h]].tolist())
                got = packed.index[b, h][packed.valid[b, h]].tolist()
                assert got == sorted(got)  # the store keeps slots in sequence order
                assert got == want
        # the store's slots hold those tokens: its full-precision keys match the dense layer's kept keys
        k, _ = store.dequantize()
        assert k.shape[2] == packed.length


def test_decode_eviction_removes_from_the_store(make_model) -> None:
    model = make_model("llama")
    ids, mask = padded_batch([60, 45], seed=2)
    _, stats, cache = generate(model, ids, mask, new_tokens=12, policy="h2o", budget=0.5, quant=ZIP)
    _, dense_stats, _ = generate(model, ids, mask, new_tokens=12, policy="h2o", budget=0.5)
    assert stats["kept_tokens_per_layer"] == dense_stats["kept_tokens_per_layer"]
    for layer in cache.layers:
        assert layer.store.num_tokens == layer.length
        assert int(layer.valid.sum(-1).max()) <= int(layer.budget.max())
        assert bool((layer.index.diff(dim=-1) > 0).all())  # slot order = sequence order, new token last


@pytest.mark.parametrize("policy", ["h2o", "keyformer:seed=0"])
def test_every_step_scoring_reads_the_packed_cache_not_dequantised_keys(make_model, monkeypatch, policy: str) -> None:
    """Once tokens are quantised, decode-time scoring uses the attention's probabilities over the packed
    codes (shared with ZipCache's saliency): the store is never dequantised whole."""
    from kvcache.quant.store import KVStore

    calls = []
    real = KVStore.dequantize
    monkeypatch.setattr(KVStore, "dequantize", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    model = make_model("llama")
    ids, mask = padded_batch([70, 52], seed=4)
    _, stats, cache = generate(model, ids, mask, new_tokens=10, policy=policy, budget=0.5, quant=KIVI4)
    assert calls == []
    assert any(tier.rows for layer in cache.layers for tier in layer.store.tiers)  # tokens really were quantised
    assert all(int(layer.valid.sum(-1).max()) <= int(layer.budget.max()) for layer in cache.layers)


def test_kv_bytes_are_the_stores_bytes_and_zipcache_is_small() -> None:
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=96, hidden_size=256, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=128, max_position_embeddings=1024, tie_word_embeddings=False,
    )
    model = tf.LlamaForCausalLM(config).eval()
    ids = torch.randint(3, 96, (1, 512), generator=torch.Generator().manual_seed(0))
    cache, stats = prompt_pass(model, ids, torch.ones_like(ids), policy="full", budget=1.0, quant="zipcache")
    held = sum(layer.store.nbytes() for layer in cache.layers)
    assert stats["kv_bytes"] == held and stats["quant"] == "zipcache"
    fp16_equivalent = config.num_hidden_layers * 2 * 1 * 1 * 512 * 128 * 2  # layers x (K, V) x B x H_kv x T x D x 2 bytes
    assert fp16_equivalent / held >= 4.5, fp16_equivalent / held
    dense, dense_stats = prompt_pass(model, ids, torch.ones_like(ids), policy="full", budget=1.0)
    assert dense_stats["kv_bytes"] >= 2 * fp16_equivalent  # the fp32 dense cache, for scale


def test_zipcache_defaults_hold_4_5x_fewer_bytes_than_16_bit_through_the_adapter() -> None:
    """head_dim 64 (SmolLM2's), a 1K prompt and 16 generated tokens, fp32 model: the bytes held per stored
    token, scales and the 16-bit streaming buffer included, against 2 bytes x (K, V) x head_dim per layer
    and KV head."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=96, hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, max_position_embeddings=2048, tie_word_embeddings=False,
    )
    model = tf.LlamaForCausalLM(config).eval()
    ids = torch.randint(3, 96, (1, 1000), generator=torch.Generator().manual_seed(0))
    _, stats, cache = generate(model, ids, torch.ones_like(ids), new_tokens=16, policy="full", budget=1.0, quant="zipcache")
    stored = cache.layers[0].store.num_tokens
    assert stored == 1000 + 15  # the last generated token is never fed back
    assert all(layer.store._fp_k.dtype == torch.float16 for layer in cache.layers)  # the paper's 16-bit buffer
    sixteen_bit = config.num_hidden_layers * 1 * stored * 2 * 64 * 2
    assert sixteen_bit / stats["kv_bytes"] >= 4.5, sixteen_bit / stats["kv_bytes"]


@pytest.mark.parametrize(
    "quant, message",
    [
        ("zipcach", "valid quant policies"),
        ("kivi:bits=3", "bits must be one of"),
        ("kivi:group_size=12", "does not divide head_dim 16"),
        ("zipcache:ratio=2", "ratio must be a number in"),
        ("kivi:foo=1", "valid parameters"),
    ],
)
def test_bad_codecs_fail_clearly(make_model, quant: str, message: str) -> None:
    model = make_model("llama")
    with pytest.raises(PolicyConfigError, match=message):
        with kv_policy(model, "snapkv", 0.5, quant=quant):
            pass
    assert getattr(model, "_kvcache_session_root", None) is None  # nothing left installed
