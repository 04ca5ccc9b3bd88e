"""MPT in the Hugging Face adapter: ALiBi over the kept tokens' original positions (the Keyformer paper's third family).

MPT adds its ALiBi bias inside ``MptAttention.forward``, over the physical key positions; under ``kv_policy`` the
adapter takes that attention over and gives every kept slot the bias of its token's logical position
(``PolicyLayer.alibi_bias``). References: HF's own MPT with its full cache (budget 1.0), and ALiBi computed by hand
from transformers' ``build_mpt_alibi_tensor`` over the kept tokens at their original positions (and, to show the
check can fail, at compacted positions 0..C-1). The tiny model (``conftest.tiny_model("mpt")``) has 6 heads, a
non-power-of-two count, and ``use_cache: false`` as MPT checkpoints ship.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

from conftest import VOCAB, padded_batch
from kvcache.engine_adapters.hf import kv_policy
from kvcache.engine_adapters.hf.compat import output_cache, with_cache
from kvcache.registry import PolicyConfigError

POLICY_PARAMS = {"snapkv": {"window": 4}, "keyformer": {"seed": 3}, "expected-attention": {"sinks": 1}}


def generate(model, ids, mask, **kwargs):
    return model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, output_logits=True,
        return_dict_in_generate=True, **kwargs,
    )


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_budget_one_is_the_plain_models_full_cache_generate(backend, make_model):
    model = make_model("mpt")
    ids, mask = padded_batch([28, 19])
    reference = generate(model, ids, mask, use_cache=True)  # HF's MptAttention over its DynamicCache
    tolerance = 1e-6 if backend == "reference" else 1e-5
    for policy in ("full", "snapkv", "h2o", "keyformer", "tova", "streaming"):
        with kv_policy(model, policy, budget=1.0, attention=backend, **POLICY_PARAMS.get(policy, {})):
            out = generate(model, ids, mask)  # the config says use_cache false: the policy cache is used anyway
        assert torch.equal(out.sequences, reference.sequences), policy
        for got, want in zip(out.logits, reference.logits):
            torch.testing.assert_close(got, want, atol=tolerance, rtol=tolerance)
    with kv_policy(model, "h2o", budget=0.5):  # no cache at all: ALiBi over the sequence itself
        uncached = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    plain = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(uncached[real], plain[real], atol=1e-5, rtol=1e-5)
    assert all("forward" not in vars(block.attn) for block in model.transformer.blocks)  # restored on exit


def test_kept_tokens_keep_their_original_alibi_distances(make_model):
    """SnapKV keeps a scattered subset of the prompt per head; the decode query's attention output must be
    ALiBi over those tokens at their original positions, not at their slots 0..C-1."""
    model = make_model("mpt")
    attn = model.transformer.blocks[-1].attn
    heads, head_dim = model.config.n_heads, model.config.d_model // model.config.n_heads
    ids = torch.randint(3, VOCAB, (1, 40), generator=torch.Generator().manual_seed(5))
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        attn.register_forward_pre_hook(lambda m, args, kwargs: seen.update(hidden=args[0]), with_kwargs=True),
        attn.register_forward_hook(lambda m, args, out: seen.update(out=out[0])),
    ]
    try:
        with torch.no_grad(), kv_policy(model, "snapkv", budget=12, window=4, kernel=1, attention="reference"):
            cache = output_cache(model(input_ids=ids[:, :-1]))
            model(**with_cache(model, cache, input_ids=ids[:, -1:]))
    finally:
        for hook in hooks:
            hook.remove()
    layer = cache.layers[-1]
    index, keys, values = layer.index[0], layer.keys[0], layer.values[0]  # 12 kept prompt tokens + the new one
    assert index.shape == (heads, 13) and (index[:, -1] == 39).all()
    assert (index[:, :-1] != torch.arange(12)).any(dim=-1).all()  # every head kept tokens from far back

    with torch.no_grad():
        query = attn.Wqkv(seen["hidden"]).chunk(3, dim=2)[0].reshape(heads, 1, head_dim)

        def by_hand(positions: torch.Tensor, query_position: int) -> torch.Tensor:
            alibi = build_mpt_alibi_tensor(heads, query_position + 1)[:, 0]  # [H, Q + 1]: slope_h * (p - Q)
            logits = (query @ keys.transpose(-1, -2))[:, 0] * attn.softmax_scale + alibi.gather(1, positions)
            context = torch.softmax(logits, dim=-1)[:, None] @ values  # [H, 1, D]
            return attn.out_proj(context.reshape(1, 1, heads * head_dim))

        original = by_hand(index, 39)
        compacted = by_hand(torch.arange(13).expand(heads, 13), 12)
    torch.testing.assert_close(seen["out"], original, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(seen["out"], compacted, atol=1e-3)  # the check tells the two apart


@pytest.mark.parametrize("setting", [
    {"policy": "snapkv"},
    {"policy": "h2o"},
    {"policy": "tova"},
    {"policy": "streaming"},
    {"policy": "expected-attention"},
    {"policy": "keyformer"},
    {"policy": "snapkv", "head_budget": "adaptive"},
    {"policy": "h2o", "layer_budget": "cake:window=4"},
])
def test_policies_at_half_budget_on_a_padded_batch(setting, make_model):
    """Budget 0.5 on a left-padded batch: each row keeps half its own prompt and generates what it generates
    alone (ALiBi distances do not depend on the padding before a row). Keyformer's Gumbel noise is drawn per
    batch shape, so its rows are checked for their budgets only."""
    model = make_model("mpt")
    setting = dict(setting)
    policy = setting.pop("policy")
    params = {**POLICY_PARAMS.get(policy, {}), **setting}
    lengths = [36, 21]
    ids, mask = padded_batch(lengths, seed=5)
    with kv_policy(model, policy, budget=0.5, **params) as session:
        batch = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        held = [layer.valid.sum(dim=-1) for layer in session.last_cache.layers]  # [B, H] per layer
        singles = [
            model.generate(input_ids=ids[r : r + 1, -n:], attention_mask=mask[r : r + 1, -n:], max_new_tokens=6,
                           do_sample=False)
            for r, n in enumerate(lengths)
        ]
    prompt_only = policy in ("snapkv", "expected-attention")  # decode tokens appended: 5 fed back so far
    if "layer_budget" not in params:
        for kept in held:
            per_row = kept.float().mean(dim=-1).tolist()  # adaptive heads keep different counts, the mean per row
            assert per_row == pytest.approx([18 + 5 * prompt_only, 11 + 5 * prompt_only]), policy
    else:
        assert sum(int(kept.sum()) for kept in held) <= 2 * model.config.n_heads * (18 + 11)
    if policy != "keyformer":
        for row, single in enumerate(singles):
            assert torch.equal(batch[row, -6:], single[0, -6:]), (policy, row)


def test_chunked_prefill_and_refusals(make_model):
    model = make_model("mpt")
    ids, mask = padded_batch([40, 29], seed=2)
    with kv_policy(model, "h2o", budget=0.5) as session:
        one_shot = generate(model, ids, mask)
    with kv_policy(model, "h2o", budget=0.5, prefill_chunk=40) as session:  # one chunk: the one-shot run
        chunked = generate(model, ids, mask)
    assert torch.equal(chunked.sequences, one_shot.sequences)
    with kv_policy(model, "h2o", budget=0.5, prefill_chunk=16) as session:
        generate(model, ids, mask)
    assert session.stats()["kept_tokens_per_layer"] == [pytest.approx((20 + 15) / 2)] * 2
    with pytest.raises(PolicyConfigError, match="with MPT is not supported yet"):
        with kv_policy(model, "snapkv", quant="kivi"):
            pass
    with pytest.raises(PolicyConfigError, match="use_cache=False"):
        with kv_policy(model, "h2o", budget=0.5):
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, use_cache=False)
