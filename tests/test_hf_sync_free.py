"""Decode steps read nothing back from the device per layer (issue 12, item 1).

On a GPU every host read of a device tensor (``bool(t)``, ``int(t)``, ``.tolist()``, ``nonzero``, a boolean
index) waits for the queued kernels, and a decode step there is launch-bound. The cache therefore decides
everything that depends on its state (mask or not, evict or not, the in-place replacement path, the kept
capacity) from host-side counters. These tests count, with a ``TorchDispatchMode`` (plus a
``TorchFunctionMode`` for ``.tolist()``, which never reaches the dispatcher on CPU), every op that reads a
tensor on the host or has a data-dependent output shape, and every tensor made from host data (on a GPU
an upload that also synchronises), over decode steps of tiny random Llama models with 4 and 8 layers:
the count must not grow with the number of layers. Stock transformers decode is the reference.
"""

from __future__ import annotations

import collections
import traceback
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import VOCAB, padded_batch
from kvcache.engine_adapters.hf import kv_policy
from kvcache.engine_adapters.hf.compat import output_cache, with_cache

REPO = Path(__file__).resolve().parents[1]
DENSE_POLICIES = {"snapkv": {"window": 4}, "streaming": {}, "h2o": {}, "keyformer": {"seed": 0}, "tova": {}}
DECODE_STEPS = 4
KIVI = "kivi:group_size=8,residual=8"  # small groups so the tiny prompts really get quantised
ZIPCACHE = "zipcache:streaming_gap=3"  # flushes at the prompt and again within the counted decode steps


def reads_host(func: torch._ops.OpOverload, args: tuple) -> bool:
    """Ops whose result the host must wait for: a scalar read, a data-dependent output (``equal``), a
    data-dependent shape (``nonzero``, ``masked_select``, ``unique``, boolean indexing), or a tensor made
    from host data (``torch.tensor``; on a GPU a synchronous upload)."""
    if func is torch.ops.aten.lift_fresh.default or torch.Tag.data_dependent_output in func.tags:
        return True
    if torch.Tag.dynamic_output_shape not in func.tags:
        return False
    if func is torch.ops.aten.index.Tensor:  # integer indices have a known shape; boolean masks do not
        return any(i is not None and i.dtype == torch.bool for i in args[1])
    return True


def source(stack: list[traceback.FrameSummary]) -> str:
    """Where a host read comes from: the innermost frame of this repository (``file:line``), or
    ``transformers`` when none (the model's own code, e.g. its mask construction)."""
    for frame in reversed(stack):
        path = Path(frame.filename)
        if REPO in path.parents and ".venv" not in path.parts and path.name != Path(__file__).name:
            return f"{path.relative_to(REPO)}:{frame.lineno}"
    return "transformers"


class HostReads(TorchDispatchMode):
    """Counts host reads (see :func:`reads_host`) by source location while active."""

    def __init__(self) -> None:
        super().__init__()
        self.by_source: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if reads_host(func, args):
            self.by_source[source(traceback.extract_stack())] += 1
        return func(*args, **(kwargs or {}))


class ToListReads(TorchFunctionMode):
    """``Tensor.tolist`` copies without dispatching on CPU (on a GPU it is a device-to-host copy)."""

    def __init__(self, counter: collections.Counter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") == "tolist":
            self.counter[source(traceback.extract_stack())] += 1
        return func(*args, **(kwargs or {}))


def llama(num_layers: int, attention: str = "eager") -> torch.nn.Module:
    """conftest's tiny Llama (GQA 6/2 heads, head_dim 16) with ``num_layers`` layers."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=VOCAB, max_position_embeddings=256, hidden_size=96, intermediate_size=128,
        num_hidden_layers=num_layers, num_attention_heads=6, num_key_value_heads=2, head_dim=16,
        tie_word_embeddings=False,
    )
    config._attn_implementation = attention
    return tf.LlamaForCausalLM(config).eval()


def decode_reads(model: torch.nn.Module, lengths: list[int], cache=None) -> tuple[collections.Counter, object]:
    """Host reads by source over ``DECODE_STEPS`` greedy decode steps after one prompt pass (not counted).
    Equal lengths pass no attention mask (as ``generate`` does when nothing is padded)."""
    ids, mask = padded_batch(lengths, seed=1)
    padded = len(set(lengths)) > 1
    reads: collections.Counter[str] = collections.Counter()
    with torch.no_grad():
        out = model(**with_cache(model, cache, input_ids=ids, attention_mask=mask if padded else None, use_cache=True))
        cache = output_cache(out)
        for _ in range(DECODE_STEPS):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            token = out.logits[:, -1:].argmax(dim=-1)
            step = with_cache(model, cache, input_ids=token, attention_mask=mask if padded else None, use_cache=True)
            with ToListReads(reads), HostReads() as counted:
                out = model(**step)
            reads.update(counted.by_source)
    return reads, cache


def stock_reads(num_layers: int, lengths: list[int], attention: str) -> int:
    from transformers import DynamicCache

    model = llama(num_layers, attention)
    return sum(decode_reads(model, lengths, DynamicCache(config=model.config))[0].values())


@pytest.mark.parametrize("policy", list(DENSE_POLICIES))
def test_unpadded_decode_reads_nothing_from_the_device(policy: str) -> None:
    """Every decode step of every layer is decided on the host: zero reads, like stock transformers."""
    for num_layers in (4, 8):
        assert stock_reads(num_layers, [40, 40], "sdpa") == 0  # the reference
        model = llama(num_layers)
        with kv_policy(model, policy, budget=0.5, **DENSE_POLICIES[policy]):
            reads, cache = decode_reads(model, [40, 40])
        assert sum(reads.values()) == 0, (policy, num_layers, dict(reads))
        layer = cache.layers[-1]
        if cache.plan.policy.every_step:  # the decode steps really evicted: the layer stays at its budget
            assert layer.real_tokens == layer.budget_tokens == [20, 20]
        else:
            assert layer.real_tokens == [20 + DECODE_STEPS] * 2


@pytest.mark.parametrize("policy", list(DENSE_POLICIES))
def test_padded_decode_reads_once_per_step_whatever_the_depth(policy: str) -> None:
    """With padding, transformers' own mask construction reads once per step (its reference count); the
    cache adds one read per step (the pass's real tokens, shared by all layers), never one per layer."""
    counts = {}
    for num_layers in (4, 8):
        stock = stock_reads(num_layers, [40, 29], "sdpa")
        model = llama(num_layers)
        with kv_policy(model, policy, budget=0.5, **DENSE_POLICIES[policy]):
            reads, _ = decode_reads(model, [40, 29])
        ours = sum(n for where, n in reads.items() if where != "transformers")
        assert reads["transformers"] == stock == DECODE_STEPS
        assert ours <= DECODE_STEPS, dict(reads)
        counts[num_layers] = sum(reads.values())
    assert counts[4] == counts[8], counts


@pytest.mark.parametrize("quant", [KIVI, ZIPCACHE])
@pytest.mark.parametrize("policy", ["snapkv", "h2o"])
def test_quantised_decode_reads_nothing_from_the_device(policy: str, quant: str) -> None:
    """A quantised store decides its flushes, removals and sizes from host-side bounds (``KVStore.fp_least``,
    ``Tier.rows``/``least``): zero reads per decode step at 4 and 8 layers, with a prompt-only policy and
    with one that removes a victim from the packed store every step."""
    for num_layers in (4, 8):
        model = llama(num_layers)
        with kv_policy(model, policy, budget=0.5, quant=quant, **DENSE_POLICIES[policy]):
            reads, cache = decode_reads(model, [40, 40])
        store = cache.layers[0].store
        assert any(tier.rows for tier in store.tiers)  # tokens really were quantised
        assert sum(reads.values()) == 0, (policy, quant, num_layers, dict(reads))
        if policy == "h2o":  # the decode steps evicted from the store: it stays at the budget
            assert store.num_tokens == 20


def test_quantised_decode_flushes_inside_the_counted_steps() -> None:
    """The counted steps include a flush, so the test above covers quantising at decode, not only attention
    over a store that stays put. SnapKV keeps 20 of the 40 prompt tokens. KIVI (G = R = 8) quantises 8 of
    them at the prompt (20 - R = 12 -> one group) and the next 8 when the 4th decode token makes the buffer
    16 = R + G; ZipCache (gap 3) quantises all 20 at the prompt and the buffer of 3 at the 3rd decode step."""
    model = llama(2)
    for quant, after_prompt, after_decode in ((KIVI, 8, 16), (ZIPCACHE, 20, 23)):
        with kv_policy(model, "snapkv", budget=0.5, window=4, quant=quant):
            _, cache = decode_reads(model, [40, 40])
        store = cache.layers[0].store
        assert store.quantized_count().tolist() == [[after_decode] * 2] * 2, quant
        assert store.codec.flush_rows(20, 20) == after_prompt  # the prompt's own flush
        assert store.num_tokens == 20 + DECODE_STEPS


@pytest.mark.parametrize("policy", list(DENSE_POLICIES))
def test_host_counters_mirror_the_device_state(policy: str) -> None:
    """The counters the decisions come from equal what the tensors hold after every pass, with padded
    prompts, a decode token marked as padding mid-generation, and per-sequence budgets."""
    model = llama(3)
    ids, mask = padded_batch([40, 23, 31], seed=7)
    with torch.no_grad(), kv_policy(model, policy, budget=0.5, **DENSE_POLICIES[policy]):
        out = model(input_ids=ids, attention_mask=mask)
        cache = output_cache(out)
        for step in range(8):
            new = torch.ones_like(mask[:, :1])
            if step == 3:
                new[1] = 0  # sequence 1 gets a padding token mid-decode
            mask = torch.cat([mask, new], dim=1)
            out = model(**with_cache(model, cache, input_ids=out.logits[:, -1:].argmax(dim=-1), attention_mask=mask))
            for layer in cache.layers:
                held = layer.valid.sum(dim=-1)  # [B, H_kv]
                assert held.tolist() == [[n] * held.shape[1] for n in layer.real_tokens], (policy, step)
                assert layer.budget.tolist() == layer.budget_tokens
                assert layer.all_valid == bool(layer.valid.all())


@pytest.mark.parametrize("policy", ["h2o", "keyformer", "tova"])
def test_decode_scoring_reuses_the_attention_probabilities_and_keeps_the_same_tokens(policy: str) -> None:
    """Every-step attention scorers get this step's probabilities from the decode attention itself (no second
    Q K^T): the same tokens are kept, step by step, as when scoring recomputes them from the keys, and the
    logits agree."""
    model = llama(4)
    ids, _ = padded_batch([40, 40], seed=2)
    runs = []
    for reuse in (True, False):
        with torch.no_grad(), kv_policy(model, policy, budget=0.5, **DENSE_POLICIES[policy]) as session:
            assert session.scores_with_decode_attention
            session.scores_with_decode_attention = reuse
            out = model(input_ids=ids, use_cache=True)
            cache = output_cache(out)
            kept, logits = [], []
            for _ in range(6):
                out = model(**with_cache(model, cache, input_ids=out.logits[:, -1:].argmax(dim=-1), use_cache=True))
                kept.append([layer.index.sort(dim=-1).values.clone() for layer in cache.layers])
                logits.append(out.logits[:, -1])
        runs.append((kept, torch.stack(logits)))
    (kept_a, logits_a), (kept_b, logits_b) = runs
    for step_a, step_b in zip(kept_a, kept_b):
        for a, b in zip(step_a, step_b):
            assert torch.equal(a, b)
    torch.testing.assert_close(logits_a, logits_b, rtol=1e-4, atol=1e-5)
    assert len(kept_a[0][0][0, 0]) == 20  # budget reached: each step evicted one token


def test_streaming_does_not_compute_decode_probabilities() -> None:
    with kv_policy(llama(2), "streaming", budget=0.5) as session:
        assert not session.scores_with_decode_attention


@pytest.mark.parametrize("layer_budget", ["uniform", "pyramid"])
def test_streaming_decode_ring_keeps_what_the_general_path_keeps(layer_budget: str, monkeypatch) -> None:
    """StreamingLLM's decode steps evict the oldest token after the sinks through a host-side ring (no scoring,
    no search): the same positions are kept, step by step, and the logits are equal, as the general path."""
    from kvcache.engine_adapters.hf.cache import PolicyCache

    model = llama(4)
    ids, _ = padded_batch([40, 40], seed=4)

    def decode(ring: bool):
        if not ring:
            monkeypatch.setattr(PolicyCache, "_evicts_oldest", lambda self, layer: False)
        with torch.no_grad(), kv_policy(model, "streaming", budget=0.5, layer_budget=layer_budget):
            out = model(input_ids=ids, use_cache=True)
            cache = output_cache(out)
            kept, logits = [], []
            for _ in range(25):  # past one full turn of the 16-slot ring
                out = model(**with_cache(model, cache, input_ids=out.logits[:, -1:].argmax(dim=-1), use_cache=True))
                kept.append([layer.index.sort(dim=-1).values.clone() for layer in cache.layers])
                logits.append(out.logits[:, -1])
        monkeypatch.undo()
        return cache, kept, torch.stack(logits)

    ring_cache, ring_kept, ring_logits = decode(True)
    assert all(layer.ring_next is not None for layer in ring_cache.layers)
    general_cache, general_kept, general_logits = decode(False)
    assert all(layer.ring_next is None for layer in general_cache.layers)
    for step_a, step_b in zip(ring_kept, general_kept):
        for a, b in zip(step_a, step_b):
            assert torch.equal(a, b)
    torch.testing.assert_close(ring_logits, general_logits)
    sinks_and_recent = torch.cat([torch.arange(4), torch.arange(65 - 16, 65)])  # 40 prompt + 25 generated
    if layer_budget == "uniform":
        assert torch.equal(ring_kept[-1][0][0, 0], sinks_and_recent)


def test_streaming_ring_gives_way_to_the_general_path_when_padding_arrives() -> None:
    model = llama(2)
    ids, mask = padded_batch([30, 30], seed=5)
    with torch.no_grad(), kv_policy(model, "streaming", budget=0.5):
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        cache = output_cache(out)
        assert all(layer.ring_next is not None for layer in cache.layers)
        for step in range(4):
            new = torch.ones_like(mask[:, :1])
            if step == 1:
                new[0] = 0  # sequence 0 gets a padding token mid-decode
            mask = torch.cat([mask, new], dim=1)
            out = model(**with_cache(model, cache, input_ids=out.logits[:, -1:].argmax(-1), attention_mask=mask, use_cache=True))
        assert all(layer.ring_next is None for layer in cache.layers)
        for layer in cache.layers:
            assert layer.real_tokens == layer.valid[:, 0].sum(-1).tolist() == [15, 15]
