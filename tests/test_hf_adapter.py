"""The Hugging Face adapter on tiny random models of every supported architecture."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, padded_batch
from kvcache.engine_adapters.hf import kv_policy
from kvcache.engine_adapters.hf.cache import GROW_TOKENS, PolicyCache
from kvcache.registry import PolicyConfigError

POLICIES = ["full", "streaming", "h2o", "snapkv", "keyformer"]
SMALL_WINDOW = {"snapkv": {"window": 4}}


def generate(model, ids, mask, **kwargs):
    return model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=6, output_logits=True,
        return_dict_in_generate=True, **kwargs,
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_budget_one_reproduces_the_unmodified_model(family, make_model):
    model = make_model(family)
    ids, mask = padded_batch([28, 19])
    reference = generate(model, ids, mask, do_sample=False)
    for policy in POLICIES:
        with kv_policy(model, policy, budget=1.0, **SMALL_WINDOW.get(policy, {})):
            out = generate(model, ids, mask, do_sample=False)
        assert torch.equal(out.sequences, reference.sequences), (family, policy)
        for got, want in zip(out.logits, reference.logits):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert model.config._attn_implementation == "eager"  # restored on exit
    assert "generate" not in vars(model)


def test_budget_one_reproduces_sampled_decoding(make_model):
    model = make_model("llama")
    ids, mask = padded_batch([20, 25], seed=3)
    torch.manual_seed(11)
    reference = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=20)
    for policy in ("snapkv", "h2o"):  # keyformer's own Gumbel draws would consume the global generator
        torch.manual_seed(11)
        with kv_policy(model, policy, budget=1.0, **SMALL_WINDOW.get(policy, {})):
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=20)
        assert torch.equal(out, reference), policy


@pytest.mark.parametrize("family", ["llama", "gpt2", "gptj", "mpt"])
def test_evicted_tokens_are_gone_and_positions_stay_logical(family, make_model):
    """StreamingLLM keeps the same tokens in every layer and head, so one HF forward pass with the
    evicted positions masked out of the new token's row (and positions left as they were) is the exact
    reference. For MPT that pass gives the kept tokens their original ALiBi distances."""
    model = make_model(family)
    ids, _ = padded_batch([30])
    with kv_policy(model, "streaming", budget=10, sinks=2) as session:
        out = model(input_ids=ids[:, :-1])
        cache = out.past_key_values
        logits = model(input_ids=ids[:, -1:], past_key_values=cache).logits[:, -1]
    assert isinstance(cache, PolicyCache)
    assert cache.get_seq_length() == 30  # logical
    assert cache.layers[0].length == 10  # physical: 2 sinks + 8 recent, the new token took an evicted slot
    # prompt rows attend causally over the whole prompt (eviction happens after the prompt pass);
    # the new token's row sees the 2 sinks, the 8 most recent prompt tokens and itself
    allowed = torch.ones(30, 30, dtype=torch.bool).tril()
    allowed[29] = False
    allowed[29, :2] = True
    allowed[29, 21:] = True
    mask = torch.zeros(1, 1, 30, 30).masked_fill(~allowed, torch.finfo(torch.float32).min)
    reference = model(input_ids=ids, attention_mask=mask, position_ids=torch.arange(30)[None]).logits[:, -1]
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)
    assert session.stats()["logical_tokens"] == 30


@pytest.mark.parametrize("policy", ["snapkv", "keyformer", "h2o", "streaming"])
def test_cache_really_shrinks_to_the_kept_tokens(policy, make_model):
    model = make_model("llama")
    ids, mask = padded_batch([40, 40])
    with kv_policy(model, policy, budget=0.5, **SMALL_WINDOW.get(policy, {})) as session:
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    cache = session.last_cache
    config = model.config
    held_slots = sum(layer._k.shape[2] for layer in cache.layers)  # allocated, per sequence and KV head
    assert session.stats()["kv_bytes"] == held_slots * 2 * config.num_key_value_heads * config.head_dim * 2 * 4
    assert session.stats()["kv_bytes"] == sum(
        t.numel() * t.element_size() for layer in cache.layers for t in (layer._k, layer._v)
    )
    for layer in cache.layers:
        assert layer.keys.shape[1] == config.num_key_value_heads  # only KV heads are stored
        kept = layer.valid.sum(dim=-1)
        if policy == "snapkv":  # prompt compressed to 20, decode tokens appended
            assert (kept == 20 + 4).all()
            assert layer._k.shape[2] == layer.length or layer._k.shape[2] - layer.length < GROW_TOKENS
        else:  # budget fixed from the prompt, evicted every step; one spare slot for the next token
            assert (kept == 20).all()
            assert layer._k.shape[2] == 21


def test_batch_rows_get_their_own_budget_and_match_single_runs(make_model):
    model = make_model("qwen2")
    ids, mask = padded_batch([36, 21], seed=5)
    with kv_policy(model, "snapkv", budget=0.5, window=4) as session:
        batch = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        kept = session.last_cache.layers[0].valid.sum(dim=-1)[:, 0].tolist()
        singles = [
            model.generate(input_ids=ids[r : r + 1, -n:], attention_mask=mask[r : r + 1, -n:], max_new_tokens=6, do_sample=False)
            for r, n in ((0, 36), (1, 21))
        ]
    assert kept == [18 + 5, 11 + 5]  # ceil(0.5 * L) each, plus the 5 decode tokens appended so far
    for row, single in enumerate(singles):
        assert torch.equal(batch[row, -6:], single[0, -6:])


def test_decode_fast_path_equals_full_reselection(make_model, monkeypatch):
    model = make_model("mistral")
    ids, mask = padded_batch([30, 30], seed=2)
    with kv_policy(model, "h2o", budget=12):
        fast = generate(model, ids, mask, do_sample=False)
    monkeypatch.setattr(PolicyCache, "_replace_one", staticmethod(lambda *a: False))
    with kv_policy(model, "h2o", budget=12):
        slow = generate(model, ids, mask, do_sample=False)
    assert torch.equal(fast.sequences, slow.sequences)
    for a, b in zip(fast.logits, slow.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_pyramid_and_cake_give_layers_different_budgets(make_model):
    model = make_model("llama")
    ids, mask = padded_batch([60, 60])
    with kv_policy(model, "snapkv", budget=0.5, window=4, layer_budget="pyramid") as session:
        model(input_ids=ids, attention_mask=mask)
    kept = session.stats()["kept_tokens_per_layer"]
    assert kept[0] > kept[1] > kept[2] and sum(kept) <= 3 * 30
    with kv_policy(model, "snapkv", budget=0.5, window=4, layer_budget="cake:window=4") as session:
        model(input_ids=ids, attention_mask=mask)
    cache = session.last_cache
    final = cache.plan.plan.layer_budgets(cache.plan.requests, 3, torch.stack(cache.plan.preferences))
    kept = [layer.valid.sum(dim=-1)[:, 0] for layer in cache.layers]
    assert all(torch.equal(k, final[i]) for i, k in enumerate(kept))  # cascading ends at the one-shot split
    assert sum(int(k.sum()) for k in kept) <= 2 * 3 * 30


def test_unsupported_models_and_bad_settings_are_refused(make_model):
    import transformers as tf

    bloom = tf.BloomForCausalLM(tf.BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=2))
    with pytest.raises(PolicyConfigError, match="Supported families: gpt2, gptj, llama, mistral, mpt, qwen2, qwen3"):
        with kv_policy(bloom, "snapkv"):
            pass
    model = make_model("llama")
    for budget in (0, 1.5, -0.1):
        with pytest.raises(PolicyConfigError, match="budget"):
            with kv_policy(model, "snapkv", budget=budget):
                pass
    with pytest.raises(PolicyConfigError, match="window"):
        with kv_policy(model, "snapkv", budget=16):  # default window 32 > 16 tokens
            pass
    ids, mask = padded_batch([40])
    with kv_policy(model, "snapkv", budget=0.25, window=16) as session:  # 10 tokens for a 40-token prompt
        model(input_ids=ids, attention_mask=mask)  # too short for the window: left uncompressed, not refused
    assert session.stats()["uncompressed_sequences"] == [0]
    with pytest.raises(PolicyConfigError, match="beam search"):
        with kv_policy(model, "h2o", budget=0.5):
            model.generate(input_ids=ids, max_new_tokens=2, num_beams=2)
    with pytest.raises(PolicyConfigError, match="unknown attention backend"):
        with kv_policy(model, "h2o", attention="flash"):
            pass
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_a_cache_passed_under_either_name_is_the_one_used_without_warnings(name, make_model):
    """transformers 5.24 renamed ``past_key_values`` to ``cache``: kvcache takes either from its user and
    passes its own under the installed version's name, so none of our calls raises a FutureWarning."""
    import warnings

    model = make_model("llama")
    ids, mask = padded_batch([30])
    with kv_policy(model, "streaming", budget=10, sinks=2) as session:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            mine = session.new_cache()
            model(input_ids=ids[:, :-1], **{name: mine})
            model(input_ids=ids[:, -1:], **{name: mine})
            assert mine.get_seq_length() == 30 and mine.layers[0].length == 10  # this cache was used and compressed
            given = session.new_cache(4)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, **{name: given})
            assert session.last_cache is given and given.get_seq_length() == 30 + 3
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)  # our own cache
    assert out.shape == (1, 34)


def test_a_prompt_too_short_for_the_policy_is_left_uncompressed(make_model):
    """snapkv's 32-token window does not fit half of a 20-token prompt: that sequence keeps everything (and
    says so) while a long prompt in the same batch is compressed as usual."""
    model = make_model("llama")
    ids, mask = padded_batch([20, 100])
    reference = generate(model, ids[:1, -20:], mask[:1, -20:], do_sample=False)
    with kv_policy(model, "snapkv", budget=0.5) as session:
        out = generate(model, ids, mask, do_sample=False)
        stats = session.stats()
        kept = session.last_cache.layers[0].valid.sum(dim=-1)  # [B, H] real tokens held
        alone = generate(model, ids[:1, -20:], mask[:1, -20:], do_sample=False)
    assert stats["uncompressed_sequences"] == [0]
    assert "20 tokens" in stats["notes"][0] and "left uncompressed" in stats["notes"][0]
    assert kept[0].tolist() == [20 + 5] * kept.shape[1]  # prompt + generated tokens, nothing evicted
    assert kept[1].max() < 100
    assert torch.equal(alone.sequences, reference.sequences)
    assert out.sequences.shape[0] == 2


@pytest.mark.parametrize("setting", [
    {"policy": "snapkv", "window": 4},
    {"policy": "h2o"},
    {"policy": "streaming"},
    {"policy": "snapkv", "window": 4, "head_budget": "adaptive"},
    {"policy": "snapkv", "window": 4, "layer_budget": "pyramid"},
    {"policy": "snapkv", "window": 4, "quant": "kivi:bits=4:group_size=8"},
    {"policy": "h2o", "prefill_chunk": 16},
])
def test_one_budget_per_row_gives_each_row_its_single_run(make_model, setting):
    """``budget=[0.5, 1.0, 12]``: every row keeps its own count (1.0: the whole row) and generates what it
    generates alone with that budget, in the dense, ragged (adaptive heads), pyramid, quantised and chunked
    layouts."""
    model = make_model("llama")
    # chunked prefill cuts the padded batch at the same columns, so rows of one length match their single runs
    lengths = [36, 36, 36] if "prefill_chunk" in setting else [36, 30, 40]
    budgets = [0.5, 1.0, 12]
    ids, mask = padded_batch(lengths, seed=7)
    setting = dict(setting)
    policy = setting.pop("policy")
    with kv_policy(model, policy, budget=budgets, **setting):
        batch = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    for row, (n, budget) in enumerate(zip(lengths, budgets)):
        with kv_policy(model, policy, budget=budget, **setting):
            single = model.generate(input_ids=ids[row : row + 1, -n:], attention_mask=mask[row : row + 1, -n:],
                                    max_new_tokens=6, do_sample=False)
        assert torch.equal(batch[row, -6:], single[0, -6:]), (row, budget)


def test_per_row_budgets_must_match_the_batch(make_model):
    model = make_model("llama")
    ids, mask = padded_batch([20, 24], seed=1)
    with pytest.raises(PolicyConfigError, match="budget lists 3 per-row budgets but the batch has 2 rows"):
        with kv_policy(model, "snapkv", budget=[0.5, 0.5, 1.0], window=4):
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
    for bad, message in (([], "empty list"), ([0.5, 1.5], r"budget 1.5 as a fraction")):
        with pytest.raises(PolicyConfigError, match=message):
            with kv_policy(model, "snapkv", budget=bad):
                pass
