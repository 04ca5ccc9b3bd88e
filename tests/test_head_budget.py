"""Head-adaptive budgets (Ada-KV, arXiv 2407.11550) and the ragged per-head layout that holds them.

References: the paper's rule written out in plain Python (joint top-k over heads after the safeguard) for
the split; HF eager attention (``eager_attention_forward``) with each layer's evicted positions masked per
KV head for the cache; the dense uniform cache for ``alpha = 1`` (every head then keeps exactly C).
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from conftest import padded_batch
from kvcache.attention.backends import attend, reference_attention
from kvcache.budget.heads import HeadBudget, adaptive_head_budgets, parse_head_budget
from kvcache.engine_adapters.hf import kv_policy
from kvcache.engine_adapters.hf.cache import PolicyCache
from kvcache.engine_adapters.hf.ragged import RaggedPolicyCache, RaggedPolicyLayer
from kvcache.registry import PolicyConfigError
from kvcache.selector import select_keep, select_keep_per_head

try:  # the tiny Llama folder with the embedded tokenizer, for the lm-eval sweep (needs lm_eval)
    from test_eval_lm_eval import tiny_folder  # noqa: F401  (fixture)
except pytest.skip.Exception:
    pass

PARAMS = {"snapkv": {"window": 4}, "keyformer": {"seed": 0}, "expected-attention": {}, "tova": {"heads": "kv"}}  # tova: per-head, to split
PROMPT_ONLY = ["snapkv", "knorm", "expected-attention"]
EVERY_STEP = ["h2o", "keyformer", "tova", "streaming"]


# -- the split ------------------------------------------------------------------------------------------
def paper_rule(scores: list[list[float]], budget: int, alpha: float, protected: set[tuple[int, int]] = frozenset()) -> list[int]:
    """Ada-KV for one sequence, written from the paper: protected slots and each head's top floor(alpha * C)
    are kept (protected slots rank first, as kvpress gives SnapKV's window the top score); the rest of the
    C * H total goes to the best remaining scores over all heads."""
    heads = len(scores)
    chosen = set(protected)
    safe = math.floor(alpha * budget)
    for h, row in enumerate(scores):
        by_score = sorted(range(len(row)), key=lambda j: ((h, j) not in protected, -row[j]))
        chosen |= {(h, j) for j in by_score[:safe]}
    rest = sorted(((row[j], h, j) for h, row in enumerate(scores) for j in range(len(row)) if (h, j) not in chosen), reverse=True)
    chosen |= {(h, j) for _, h, j in rest[: max(0, budget * heads - len(chosen))]}
    return [sum(1 for c in chosen if c[0] == h) for h in range(heads)]


HAND_MADE = [
    [9.0, 8.0, 7.0, 6.0, 0.15, 0.25],  # concentrated on four tokens
    [0.5, 0.4, 5.0, 0.3, 0.2, 0.1],
    [1.0, 2.0, 3.0, 0.12, 0.05, 0.01],
]


@pytest.mark.parametrize(
    "budget, alpha, expected",
    [
        (2, 0.0, [4, 1, 1]),  # joint top 6: 9 8 7 6 | 5 | 3
        (2, 0.5, [4, 1, 1]),  # safeguard floor(0.5 * 2) = 1 per head is already met
        (2, 1.0, [2, 2, 2]),  # alpha 1: the uniform split
        (4, 0.5, [5, 4, 3]),  # safeguard 2 each (9 8 | 5 .5 | 3 2), then the rest's top 6: 7 6 .25 | .4 .3 | 1
        (3, 0.0, [4, 2, 3]),  # joint top 9: 9 8 7 6 | 5 0.5 | 3 2 1
    ],
)
def test_split_of_hand_made_scores_follows_the_papers_rule(budget, alpha, expected):
    assert paper_rule(HAND_MADE, budget, alpha) == expected
    scores = torch.tensor([HAND_MADE])
    valid = torch.ones_like(scores, dtype=torch.bool)
    counts = adaptive_head_budgets(scores, valid, torch.zeros_like(valid), budget, alpha)
    assert counts.tolist() == [expected]


def test_split_of_random_scores_matches_the_rule_with_protection_and_padding():
    rng = random.Random(0)
    for trial in range(40):
        heads, t = rng.randint(2, 5), rng.randint(4, 24)
        budget, alpha = rng.randint(1, t), rng.choice([0.0, 0.2, 0.5, 1.0])
        scores = [[rng.random() for _ in range(t)] for _ in range(heads)]
        recent = rng.randint(0, min(budget, 3))
        protected = {(h, j) for h in range(heads) for j in range(t - recent, t)}
        s = torch.tensor([scores])
        prot = torch.zeros(1, heads, t, dtype=torch.bool)
        prot[..., t - recent :] = True
        counts = adaptive_head_budgets(s, torch.ones_like(prot), prot, torch.tensor([budget]), alpha)
        assert counts.tolist() == [paper_rule(scores, budget, alpha, protected)], trial
    # padding never counts: a head with 2 real tokens keeps at most 2, and the counts sum to the real tokens
    s = torch.rand(1, 3, 8)
    valid = torch.ones(1, 3, 8, dtype=torch.bool)
    valid[0, 1, :6] = False
    counts = adaptive_head_budgets(s, valid, torch.zeros_like(valid), 6, 0.0)
    assert counts[0, 1] <= 2 and counts.sum() == 18


def test_per_head_selection_keeps_each_heads_top_count_and_equals_select_keep_for_equal_counts():
    torch.manual_seed(0)
    scores = torch.rand(2, 3, 10)
    valid = torch.ones_like(scores, dtype=torch.bool)
    protected = torch.zeros_like(valid)
    protected[..., -2:] = True
    index = torch.arange(10).expand(2, 3, 10)
    counts = torch.tensor([[5, 2, 8], [3, 3, 3]])
    slots, keep_valid = select_keep_per_head(scores, valid, protected, counts, 8, index)
    assert keep_valid.sum(-1).tolist() == counts.tolist()
    for b in range(2):
        for h in range(3):
            kept = set(slots[b, h][keep_valid[b, h]].tolist())
            ranked = torch.where(protected[b, h], float("inf"), scores[b, h])
            assert kept == set(ranked.topk(int(counts[b, h])).indices.tolist())
    uniform = select_keep(scores, valid, protected, torch.tensor([4, 4]), 4, index)
    per_head = select_keep_per_head(scores, valid, protected, torch.full((2, 3), 4), 4, index)
    assert all(torch.equal(a, b) for a, b in zip(uniform, per_head))


def test_head_budget_specs_parse_and_bad_ones_name_the_choices():
    assert parse_head_budget("uniform") == HeadBudget("uniform")
    assert parse_head_budget("adaptive") == HeadBudget("adaptive", 0.2)
    assert parse_head_budget("adaptive:alpha=0.5").alpha == 0.5
    assert parse_head_budget(None) == HeadBudget()
    with pytest.raises(PolicyConfigError, match="valid head budgets: uniform, adaptive"):
        parse_head_budget("ada")
    with pytest.raises(PolicyConfigError, match="valid parameters: alpha"):
        parse_head_budget("adaptive:beta=1")
    with pytest.raises(PolicyConfigError, match="alpha"):
        parse_head_budget("adaptive:alpha=1.5")
    with pytest.raises(PolicyConfigError, match="no parameter"):
        parse_head_budget("uniform:alpha=0.2")


# -- the ragged layer -----------------------------------------------------------------------------------
def test_ragged_layer_attention_equals_eager_attention_with_evicted_positions_masked():
    """Random per-head keep sets of different sizes: attention over the packed rows equals HF eager math
    over the whole cache with the evicted positions masked, and the buffers hold only the kept rows."""
    gen = torch.Generator().manual_seed(0)
    for b, h_kv, group, t, d in [(1, 2, 3, 17, 16), (2, 3, 1, 30, 8), (3, 1, 4, 9, 32)]:
        keys, values = torch.randn(b, h_kv, t, d, generator=gen), torch.randn(b, h_kv, t, d, generator=gen)
        layer = RaggedPolicyLayer()
        layer.update(keys, values)
        counts = torch.randint(1, t + 1, (b, h_kv), generator=gen)
        scores = torch.rand(b, h_kv, t, generator=gen)
        slots, keep_valid = select_keep_per_head(
            scores, layer.valid, torch.zeros_like(layer.valid), counts, int(counts.max())
        )
        layer.keep(slots, keep_valid, headroom=0)
        kept = torch.zeros(b, h_kv, t, dtype=torch.bool).scatter_(2, slots, keep_valid)
        assert layer.nbytes() == int(counts.sum()) * d * 2 * 4  # exactly the kept tokens' keys and values
        new_k, new_v = torch.randn(b, h_kv, 1, d, generator=gen), torch.randn(b, h_kv, 1, d, generator=gen)
        view_k, view_v = layer.update(new_k, new_v)
        query = torch.randn(b, h_kv * group, 1, d, generator=gen)
        got = attend(query, view_k, view_v, layer.visible(1), d**-0.5, "sdpa")
        allowed = torch.cat([kept, torch.ones(b, h_kv, 1, dtype=torch.bool)], dim=2)[:, :, None]
        want = reference_attention(query, torch.cat([keys, new_k], 2), torch.cat([values, new_v], 2), allowed, d**-0.5)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def masked_eager_logits(model, ids: torch.Tensor, allowed: list[torch.Tensor]) -> torch.Tensor:
    """Logits of one full forward pass through HF's eager attention with layer ``l``'s query rows seeing
    only ``allowed[l] [B, H_kv, T, T]`` (expanded to the query heads of each KV group)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.models.llama.modeling_llama import eager_attention_forward

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        mask = allowed[module.layer_idx].repeat_interleave(module.num_key_value_groups, dim=1)
        additive = torch.zeros(mask.shape, dtype=query.dtype).masked_fill(~mask, torch.finfo(query.dtype).min)
        return eager_attention_forward(module, query, key, value, additive, scaling=scaling, dropout=0.0)

    AttentionInterface.register("kvtest_masked_eager", attention)
    AttentionMaskInterface.register("kvtest_masked_eager", sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation("kvtest_masked_eager")
    try:
        return model(input_ids=ids).logits
    finally:
        model.set_attn_implementation(previous)


def kept_positions(cache: PolicyCache, total: int) -> list[torch.Tensor]:
    """``[B, H_kv, total]`` bool per layer: which logical positions each KV head holds now."""
    out = []
    for layer in cache.layers:
        held = torch.zeros(*layer.index.shape[:2], total + 1, dtype=torch.bool)
        held.scatter_(2, torch.where(layer.valid, layer.index, total), True)
        out.append(held[..., :total])
    return out


@pytest.mark.parametrize("policy", PROMPT_ONLY + EVERY_STEP)
def test_decode_equals_hf_eager_with_each_heads_evicted_positions_masked(policy, make_model):
    """Prompt pass, then decode steps one token at a time; each decode row of the reference sees what
    each KV head of that layer held before the step, plus itself (eviction follows attention)."""
    model = make_model("llama")
    prompt, steps = 40, 4
    ids, _ = padded_batch([prompt + steps], seed=7)
    allowed = [torch.ones(1, 2, prompt + steps, prompt + steps, dtype=torch.bool).tril() for _ in range(3)]
    with kv_policy(model, policy, budget=10, head_budget="adaptive", **PARAMS.get(policy, {})) as session:
        out = model(input_ids=ids[:, :prompt])
        cache = out.past_key_values
        assert isinstance(cache, RaggedPolicyCache)
        logits = [out.logits[:, -1]]
        for p in range(prompt, prompt + steps):
            for layer_allowed, held in zip(allowed, kept_positions(cache, prompt + steps)):
                layer_allowed[:, :, p] = held
                layer_allowed[:, :, p, p] = True
            logits.append(model(input_ids=ids[:, p : p + 1], past_key_values=cache).logits[:, -1])
    reference = masked_eager_logits(model, ids, allowed)
    for step, got in enumerate(logits):
        torch.testing.assert_close(got, reference[:, prompt - 1 + step], atol=1e-5, rtol=1e-5)
    held = session.last_cache.layers[0].head_tokens()
    if policy != "streaming":  # streaming protects its whole budget, so every head keeps the same count
        assert any(len(set(counts)) > 1 for layer in session.last_cache.layers for counts in layer.head_tokens())
    budget_total = 10 * 2 + (steps if policy in PROMPT_ONLY else 0) * 2
    assert sum(held[0]) == budget_total


@pytest.mark.parametrize("policy", ["snapkv", "h2o"])
def test_alpha_one_is_the_uniform_split_through_the_ragged_layout(policy, make_model):
    model = make_model("qwen2")
    ids, mask = padded_batch([36, 27], seed=4)
    kwargs = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with kv_policy(model, policy, budget=12, **PARAMS.get(policy, {})):
        dense = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    with kv_policy(model, policy, budget=12, head_budget="adaptive:alpha=1", **PARAMS.get(policy, {})) as session:
        ragged = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert isinstance(session.last_cache, RaggedPolicyCache)
    assert torch.equal(dense.sequences, ragged.sequences)
    for a, b in zip(dense.logits, ragged.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_memory_is_the_kept_tokens_and_every_step_counts_stay_fixed(make_model):
    model = make_model("llama")
    ids, mask = padded_batch([40, 32], seed=1)
    d, elem = model.config.head_dim, 4
    with kv_policy(model, "snapkv", budget=10, window=4, head_budget="adaptive") as session:
        out = model(input_ids=ids, attention_mask=mask)
    cache = out.past_key_values
    for layer in cache.layers:  # right after the prompt: one row per kept token, nothing else
        heads = layer.head_tokens()
        assert [sum(s) for s in heads] == [10 * 2, 10 * 2]
        assert layer.nbytes() == sum(map(sum, heads)) * d * 2 * elem
    assert session.stats()["kv_bytes"] == sum(layer.nbytes() for layer in cache.layers)
    with kv_policy(model, "h2o", budget=10, head_budget="adaptive") as session:
        out = model(input_ids=ids, attention_mask=mask)
        cache = out.past_key_values
        before = [layer.head_tokens() for layer in cache.layers]
        sizes = [layer._k.shape[0] for layer in cache.layers]
        token = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        for _ in range(5):
            out = model(input_ids=token, attention_mask=mask, past_key_values=cache)
            token = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    assert [layer.head_tokens() for layer in cache.layers] == before  # each head's count fixed after the prompt
    assert [layer._k.shape[0] for layer in cache.layers] == sizes  # replaced in place: no growth
    assert all(layer.nbytes() == (sum(map(sum, h)) + 2 * 2) * d * 2 * elem for layer, h in zip(cache.layers, before))


def test_batch_rows_split_on_their_own_and_match_single_runs(make_model):
    model = make_model("mistral")
    ids, mask = padded_batch([36, 21], seed=5)
    with kv_policy(model, "snapkv", budget=0.5, window=4, head_budget="adaptive") as session:
        batch = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        heads = session.last_cache.layers[1].head_tokens()
        singles = [
            model.generate(input_ids=ids[r : r + 1, -n:], attention_mask=mask[r : r + 1, -n:], max_new_tokens=6, do_sample=False)
            for r, n in ((0, 36), (1, 21))
        ]
    assert [sum(h) for h in heads] == [2 * (18 + 5), 2 * (11 + 5)]
    for row, single in enumerate(singles):
        assert torch.equal(batch[row, -6:], single[0, -6:])


@pytest.mark.parametrize("layer_budget", ["pyramid", "cake:window=4"])
def test_layer_budgets_compose_each_layer_splits_its_own_budget(layer_budget, make_model):
    model = make_model("llama")
    ids, mask = padded_batch([60, 60])
    with kv_policy(model, "snapkv", budget=0.5, window=4, layer_budget=layer_budget) as session:
        model(input_ids=ids, attention_mask=mask)
    uniform_heads = [layer.valid.sum(-1)[:, 0].tolist() for layer in session.last_cache.layers]
    with kv_policy(model, "snapkv", budget=0.5, window=4, layer_budget=layer_budget, head_budget="adaptive") as session:
        model(input_ids=ids, attention_mask=mask)
    for layer, per_head in zip(session.last_cache.layers, uniform_heads):
        assert [sum(h) for h in layer.head_tokens()] == [2 * c for c in per_head]  # C_l * H_kv per layer


def test_refusals_name_the_fix(make_model):
    model = make_model("llama")
    with pytest.raises(PolicyConfigError, match="head_budget='uniform' with quant"):
        with kv_policy(model, "snapkv", budget=0.5, quant="kivi:group_size=8", head_budget="adaptive"):
            pass
    with pytest.raises(PolicyConfigError, match="valid head budgets"):
        with kv_policy(model, "snapkv", budget=0.5, head_budget="per-head"):
            pass
    from kvcache.engine_adapters.vllm.config import KVPluginError, parse

    with pytest.raises(KVPluginError, match="Hugging Face adapter"):
        parse({"kv_policy": "snapkv", "kv_head_budget": "adaptive"})
    assert parse({"kv_policy": "snapkv", "kv_head_budget": "uniform"}) is not None


# -- surfaces -------------------------------------------------------------------------------------------
def test_lm_eval_model_args_carry_the_head_budget():
    pytest.importorskip("lm_eval")
    from kvcache.eval.lm_eval_model import KVModelArgsError, split_kv_args

    kv, _ = split_kv_args({"kv_policy": "snapkv", "kv_budget": "0.25", "kv_head_budget": "adaptive:alpha=0.3"})
    assert kv["settings"]["head_budget"] == "adaptive:alpha=0.3"
    assert "head_budget" not in split_kv_args({"kv_policy": "snapkv", "kv_head_budget": "uniform"})[0]["settings"]
    with pytest.raises(KVModelArgsError, match="valid head budgets: uniform, adaptive"):
        split_kv_args({"kv_policy": "snapkv", "kv_head_budget": "per-head"})
    with pytest.raises(KVModelArgsError, match="kv_head_budget=uniform"):
        split_kv_args({"kv_policy": "snapkv", "kv_head_budget": "adaptive", "kv_quant": "kivi"})


def test_generate_cli_refuses_a_bad_head_budget_before_loading_a_model():
    import argparse

    from kvcache.engine_adapters.hf import generate_cli

    parser = argparse.ArgumentParser()
    generate_cli.add_arguments(parser)
    assert parser.parse_args(["hi", "--kv-head-budget", "adaptive"]).kv_head_budget == "adaptive"
    args = parser.parse_args(["hi", "--model", "no/such-model", "--kv-head-budget", "adaptive:alpha=2"])
    with pytest.raises(PolicyConfigError, match="alpha"):
        generate_cli.run(args)


def test_sweep_runs_uniform_and_adaptive_heads_through_lm_eval(tmp_path, request):
    pytest.importorskip("lm_eval")
    import argparse
    import json

    from kvcache.eval import sweep

    folder = request.getfixturevalue("tiny_folder")
    parser = argparse.ArgumentParser()
    sweep.add_arguments(parser)
    out = tmp_path / "sweep"
    args = parser.parse_args(["--model", str(folder), "--policies", "snapkv", "--budgets", "0.25", "--head-budgets",
                              "uniform", "adaptive", "--tasks", "kvlong_passkey_1k", "--limit", "2", "--batch-size", "2",
                              "--out", str(out)])
    assert sweep.run(args) == 0
    configs = json.loads((out / "sweep.json").read_text())["configs"]
    assert [(c["policy"], c["head_budget"]) for c in configs] == [("full", "uniform"), ("snapkv", "uniform"), ("snapkv", "adaptive")]
    full, uniform, adaptive = configs
    # the same total per layer (C x H_kv), only split differently: bytes within the growth headroom of uniform's
    assert adaptive["mean_kv_bytes"] < 0.5 * full["mean_kv_bytes"]
    assert abs(adaptive["mean_kv_bytes"] - uniform["mean_kv_bytes"]) < 0.1 * uniform["mean_kv_bytes"]
    assert "| snapkv | uniform | adaptive | none | 0.25 |" in (out / "table.md").read_text()


# -- decode decided on the host ---------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["snapkv", "h2o", "keyformer"])
def test_adaptive_decode_reads_nothing_from_the_device(policy):
    """As the dense cache (tests/test_hf_sync_free.py): after the prompt's split, decode steps, in-place
    per-head replacement included, are decided from host mirrors: no host read whatever the depth."""
    from test_hf_sync_free import DENSE_POLICIES, decode_reads, llama

    for num_layers in (4, 8):
        model = llama(num_layers)
        with kv_policy(model, policy, budget=0.5, head_budget="adaptive", **DENSE_POLICIES[policy]):
            reads, cache = decode_reads(model, [40, 40])
        assert sum(reads.values()) == 0, (policy, num_layers, dict(reads))
        assert isinstance(cache, RaggedPolicyCache)
        heads = cache.layers[-1].head_tokens()
        extra = 0 if cache.plan.policy.every_step else 4 * 2  # DECODE_STEPS tokens appended to both heads
        assert [sum(h) for h in heads] == [20 * 2 + extra] * 2


@pytest.mark.parametrize("policy", ["snapkv", "h2o", "tova"])
def test_host_mirrors_equal_the_device_state_with_padding_mid_decode(policy, make_model):
    model = make_model("llama")
    ids, mask = padded_batch([40, 23, 31], seed=7)
    with torch.no_grad(), kv_policy(model, policy, budget=0.5, head_budget="adaptive", **PARAMS.get(policy, {})):
        out = model(input_ids=ids, attention_mask=mask)
        cache = out.past_key_values
        for step in range(6):
            new = torch.ones_like(mask[:, :1])
            if step == 2:
                new[1] = 0  # sequence 1 gets a padding token mid-decode
            mask = torch.cat([mask, new], dim=1)
            out = model(input_ids=out.logits[:, -1:].argmax(-1), attention_mask=mask, past_key_values=cache)
            for layer in cache.layers:
                assert layer.head_tokens() == layer.valid.sum(-1).tolist(), (policy, step)
                assert layer.rows_used <= layer._k.shape[0]
                rows = layer._row[:, :, : layer.length][layer.valid]
                assert rows.unique().numel() == rows.numel() and int(rows.max()) < layer.rows_used  # no row shared
