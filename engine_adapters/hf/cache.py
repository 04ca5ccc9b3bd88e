"""A ``transformers`` Cache that really holds only the kept tokens.

Each layer stores ``[B, H_kv, C_l, D]`` keys and values plus, per slot, its logical position, whether
it is a real token, and its policy score. Slots need not be in sequence order and may differ per KV
head. Two lengths are kept apart: ``seen`` (logical: tokens the sequence has seen, what RoPE and
``generate`` count) and ``length`` (physical: slots held). Keys are cached after RoPE, so a kept key needs
nothing more; an ALiBi model (MPT) gets its bias from each slot's logical position at every pass
(:meth:`PolicyLayer.alibi_bias`), so a kept token keeps its original distance to every query.

Host mirrors, so decode never reads a device tensor to decide anything (on a GPU each read is a
synchronisation, and a decode step there is launch-bound): every layer keeps on the host how many real
tokens each sequence holds per KV head (``real_tokens``; all heads of a sequence hold the same number)
and its budget in tokens (``budget_tokens``). Whether attention needs a mask, whether a layer is over
budget, the in-place replacement path and the kept capacity are all decided from them. The only reads
left are once per forward pass, not per layer: the real tokens of a pass whose mask has padding
(:meth:`PolicyCache.pass_real_tokens`) and, at the prompt pass, the budgets.

Chunked prefill (``kv_policy(..., prefill_chunk=N)``): the adapter feeds a long prompt N tokens at a time
and calls :meth:`PolicyCache.begin_prompt` first, so budgets are fixed from the whole prompt; every chunk is
then scored (:meth:`kvcache.plan.KVPlan.prompt_chunk_scores`) and evicted back to the budget: between chunks
every layer holds its budget C, and the layer being fed C plus one chunk. (A one-pass prompt also evicts layer
by layer, but the layer being fed holds the whole prompt, and the pass's activations scale with it.)
``peak_nbytes`` records the largest total the layers' K/V tensors held (after every append and every
eviction; the copy inside one layer's append or eviction is not counted).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvcache.attention.quantized import packed_probabilities
from kvcache.attention.scoring import alibi_key_bias, visibility, window_probabilities
from kvcache.budget import LayerBudget
from kvcache.evict.base import EvictionPolicy, Observation
from kvcache.plan import KVPlan, RequestBudget
from kvcache.quant.base import QuantCodec
from kvcache.quant.store import KVStore
from kvcache.quant.saliency import normalized_attention, probe_positions
from kvcache.selector import protected_slots, replacement_slot, select_keep

PROBE_SEED = 0  # ZipCache's random probe queries at the prompt are drawn from this seed (reproducible runs)
GROW_TOKENS = 16  # capacity grows in blocks of this many tokens, like vLLM's paged blocks


@dataclass
class CompressionPlan:
    """One batch's view of the shared :class:`kvcache.plan.KVPlan`: its requests' budgets as tensors over
    the batch's sequences, fixed at the prompt pass and shared by all layers."""

    plan: KVPlan
    num_layers: int
    max_new_tokens: int | None = None
    # Filled at the prompt pass: real prompt tokens per sequence (host), first real position [B] (device),
    # per-layer budgets [N, B] (device, and the same on the host), one RequestBudget per sequence.
    prompt_len: list[int] | None = None
    first_index: torch.Tensor | None = None
    layer_budgets: torch.Tensor | None = None
    layer_budget_tokens: list[list[int]] | None = None
    requests: list[RequestBudget] = field(default_factory=list)
    preferences: list[torch.Tensor] = field(default_factory=list)

    @property
    def policy(self) -> EvictionPolicy:
        return self.plan.policy

    @property
    def layer_budget(self) -> LayerBudget:
        return self.plan.layer_budget

    @property
    def notes(self) -> list[str]:
        return [f"sequence {i}: {r.note}" for i, r in enumerate(self.requests) if r.note]

    @property
    def uncompressed(self) -> list[int]:
        """Sequences whose prompt the budget would have compressed but the policy cannot (too short)."""
        return [i for i, r in enumerate(self.requests) if r.note]

    def start(self, prompt_len: list[int], first_index: torch.Tensor) -> None:
        """Fix per-sequence budgets from the prompt (``prompt_len``: real tokens of the prompt pass per
        sequence, host ints; ``first_index [B]``: position of each sequence's first real token)."""
        self.plan.check_rows(len(prompt_len))
        self.prompt_len = list(prompt_len)
        self.first_index = first_index
        self.requests = [self.plan.request(n, row=i) for i, n in enumerate(self.prompt_len)]
        if not self.layer_budget.cascading:  # computed on the host, uploaded once
            budgets = self.plan.layer_budgets(self.requests, self.num_layers)
            self.layer_budget_tokens = budgets.tolist()
            self.layer_budgets = budgets.to(first_index.device)

    def cascade(self, preference: torch.Tensor) -> torch.Tensor:
        """CAKE: add layer ``len(preferences)``'s preference; budgets ``[m + 1, B]`` for the layers seen so far."""
        self.preferences.append(preference)
        return self.plan.layer_budgets(
            self.requests, self.num_layers, torch.stack(self.preferences), device=preference.device
        )


class PolicyLayer(CacheLayerMixin):
    """One layer's compacted cache (see module docstring)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self) -> None:
        super().__init__()
        self.length = 0  # physical slots in use
        self.seen = 0  # logical tokens seen
        self.passes = 0  # forward passes so far (0 during the prompt pass)
        self.budget: torch.Tensor | None = None  # [B] tokens this layer may keep per sequence
        self.budget_tokens: list[int] | None = None  # the same on the host
        self.recent: torch.Tensor | None = None  # [B] of those, the protected recent window
        self.heads_aligned = True  # every KV head holds the same slots in sequence order
        # StreamingLLM's decode steps as a ring (PolicyCache._ring_step): the slot of the oldest token after the
        # sinks, on the host, or None when the layer is not a ring
        self.ring_next: int | None = None
        self.real_tokens: list[int] = []  # host mirror of valid.sum(-1) per sequence (equal for every KV head)
        self.new_real: list[int] = []  # of those, how many came with the last pass
        self.counted_nbytes = 0  # this layer's bytes in the cache's running total (PolicyCache.peak_nbytes)

    # -- storage -------------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, _ = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self._init_storage(key_states, value_states)
        self._index = torch.empty(b, h, 0, dtype=torch.long, device=self.device)
        self._valid = torch.empty(b, h, 0, dtype=torch.bool, device=self.device)
        self._scores = torch.empty(b, h, 0, dtype=torch.float32, device=self.device)
        self.is_initialized = True

    def _init_storage(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self._k = key_states.new_empty(b, h, 0, d)
        self._v = value_states.new_empty(b, h, 0, value_states.shape[-1])

    def _stored(self, which: int) -> torch.Tensor:
        """Keys (0) or values (1) of the slots in use."""
        return (self._k, self._v)[which][:, :, : self.length]

    def _refuse_assignment(self, value: torch.Tensor | None) -> None:
        if value is not None:
            raise AttributeError(f"{type(self).__name__} keys and values are managed by the cache; they cannot be assigned")

    keys = property(lambda self: self._stored(0) if self.is_initialized else None, _refuse_assignment)  # type: ignore[assignment]
    values = property(lambda self: self._stored(1) if self.is_initialized else None, _refuse_assignment)  # type: ignore[assignment]

    @property
    def index(self) -> torch.Tensor:
        return self._index[:, :, : self.length]

    @property
    def valid(self) -> torch.Tensor:
        return self._valid[:, :, : self.length]

    @property
    def scores(self) -> torch.Tensor:
        return self._scores[:, :, : self.length]

    def query_index(self, q: int) -> torch.Tensor:
        """``[B, q]`` logical positions of this pass's ``q`` queries (the last ``q`` tokens seen)."""
        return torch.arange(self.seen - q, self.seen, device=self.device).expand(self._valid.shape[0], q)

    def visible(self, q: int) -> torch.Tensor:
        """``[B, H_kv, q, T]``: which slot each of this pass's queries may attend (slot order)."""
        return visibility(self.index, self.valid, self.query_index(q))

    def alibi_bias(self, slopes: torch.Tensor) -> torch.Tensor:
        """``[B, H_q, T]``: the ALiBi logit bias of every slot in use for this pass's queries (``slopes [H_q]``), from
        each slot's logical position, so a kept token keeps its original distance after eviction
        (:func:`kvcache.attention.scoring.alibi_key_bias`)."""
        return alibi_key_bias(slopes, self.index, self.seen - 1)

    @property
    def all_valid(self) -> bool:
        """Every slot in use holds a real token (no padding, no empty slot), from the host mirror."""
        return all(n == self.length for n in self.real_tokens)

    def _count_appended(self, batch: int, q: int) -> None:
        """Host mirror of an append of ``q`` real tokens per sequence."""
        self.real_tokens = [n + q for n in self.real_tokens] if self.real_tokens else [q] * batch
        self.new_real = [q] * batch

    def _buffers(self) -> list[str]:
        return ["_k", "_v", "_index", "_valid", "_scores"]

    def _reserve(self, total: int) -> None:
        """Make room for ``total`` slots, growing in blocks of ``GROW_TOKENS``."""
        capacity = self._k.shape[2]
        if total <= capacity:
            return
        new_capacity = -(-total // GROW_TOKENS) * GROW_TOKENS
        for name in self._buffers():
            old = getattr(self, name)
            grown = old.new_zeros(*old.shape[:2], new_capacity, *old.shape[3:])
            grown[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, grown)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[2]
        start, stop = self.length, self.length + q
        self._reserve(stop)
        self._k[:, :, start:stop] = key_states
        self._v[:, :, start:stop] = value_states
        self._index[:, :, start:stop] = torch.arange(self.seen, self.seen + q, device=self.device)
        self._valid[:, :, start:stop].fill_(True)
        self._scores[:, :, start:stop].zero_()
        self.length, self.seen = stop, self.seen + q
        self._count_appended(key_states.shape[0], q)
        return self.keys, self.values

    def mark_padding(self, new_valid: torch.Tensor, real: list[int] | None = None) -> None:
        """Record which of the newest ``q`` slots are real tokens (``new_valid [B, q]``; ``real``: their
        count per sequence on the host, read from ``new_valid`` when not given)."""
        q = new_valid.shape[1]
        self._valid[:, :, self.length - q : self.length] = new_valid[:, None, :]
        real = new_valid.sum(dim=-1).tolist() if real is None else real
        self.real_tokens = [n - q + r for n, r in zip(self.real_tokens, real)]
        self.new_real = list(real)

    def keep(self, slots: torch.Tensor, slot_valid: torch.Tensor, headroom: int) -> None:
        """Keep only ``slots [B, H, C]`` (``slot_valid`` marks the real ones): the tensors shrink to C slots."""
        kept = slots.shape[-1]
        d_idx = slots[..., None]
        new_k = self._k.new_empty(*self._k.shape[:2], kept + headroom, self._k.shape[-1])
        new_v = self._v.new_empty(*self._v.shape[:2], kept + headroom, self._v.shape[-1])
        new_k[:, :, :kept] = self.keys.gather(2, d_idx.expand(-1, -1, -1, self._k.shape[-1]))
        new_v[:, :, :kept] = self.values.gather(2, d_idx.expand(-1, -1, -1, self._v.shape[-1]))
        self._k, self._v = new_k, new_v
        for name, current in (("_index", self.index), ("_scores", self.scores)):
            buf = current.new_zeros(*current.shape[:2], kept + headroom)
            buf[:, :, :kept] = current.gather(2, slots)
            setattr(self, name, buf)
        valid = torch.zeros(*slots.shape[:2], kept + headroom, dtype=torch.bool, device=self.device)
        valid[:, :, :kept] = self.valid.gather(2, slots) & slot_valid
        self._valid = valid
        # an empty slot (a sequence keeping fewer than the batch's widest) holds no position: -1 sorts it before
        # every real token, as left padding, so pooling along positions never puts it between two kept tokens
        self._index[:, :, :kept].masked_fill_(~valid[:, :, :kept], -1)
        self.length = kept
        self.heads_aligned = False
        self.ring_next = None

    def replace(self, victim: torch.Tensor) -> None:
        """Move the newest slot into ``victim [B, H]`` and drop the last slot (evicts one token in place)."""
        last = self.length - 1
        idx = victim[..., None]
        for name in self._buffers():
            buf = getattr(self, name)
            newest = buf[:, :, last : last + 1]
            if buf.dim() == 4:
                buf.scatter_(2, idx[..., None].expand(-1, -1, 1, buf.shape[-1]), newest)
            else:
                buf.scatter_(2, idx, newest)
        self.length = last
        self.heads_aligned = False
        self.ring_next = None

    def replace_at(self, victim: int) -> None:
        """:meth:`replace` with the same ``victim`` slot in every sequence and head, a host index: slice copies,
        no scatter. The caller keeps ``ring_next`` valid."""
        last = self.length - 1
        for name in self._buffers():
            buf = getattr(self, name)
            buf[:, :, victim] = buf[:, :, last]
        self.length = last

    # -- HF cache protocol ---------------------------------------------------------------------------
    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise ValueError(
            "beam search (num_beams > 1) is not supported with a KV policy: beams would share evicted slots; "
            "use greedy or sampled decoding"
        )

    def nbytes(self) -> int:
        """Bytes held by this layer's key and value tensors (allocated, not just used)."""
        if not self.is_initialized:
            return 0
        return self._k.numel() * self._k.element_size() + self._v.numel() * self._v.element_size()

    def bookkeeping_nbytes(self) -> int:
        """Bytes of the per-slot position, validity and score tensors."""
        if not self.is_initialized:
            return 0
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in ("_index", "_valid", "_scores"))

    def kept_tokens(self) -> list[float]:
        """Real tokens held per sequence, averaged over KV heads."""
        if not self.is_initialized:
            return []
        return self.valid.float().sum(dim=-1).mean(dim=-1).tolist()


class QuantPolicyLayer(PolicyLayer):
    """A :class:`PolicyLayer` whose keys and values live in a quantised :class:`~kvcache.quant.KVStore`.

    The per-slot metadata (``_index``, ``_valid``, ``_scores``) is kept exactly ``length`` slots long and
    mirrors the store's slot order: ``update`` appends (``store.append(..., flush=False)``), ``keep``
    gathers with the sorted kept slots (``store.keep`` keeps slots in relative order), ``replace`` is
    ``store.remove(victim)`` (the newest token, already appended, stays the last slot). Buffered tokens are
    quantised by :meth:`settle` after the layer's attention and eviction, so eviction decides first and the
    store only ever quantises tokens that are kept.
    """

    def __init__(self, codec: QuantCodec) -> None:
        super().__init__()
        self.codec = codec
        self.store = None
        self.evictions = 0  # keep/replace calls so far (the attention's statistics are stale after one)

    def _init_storage(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.store = KVStore(self.codec, key_states.shape[-1], key_states.dtype, key_states.device)

    def all_full_precision(self) -> bool:
        """True when every slot of every head sits, in slot order, in the store's full-precision buffer:
        no tier holds a row (then every head's slots are all buffered, ``fp_count == num_tokens``, so
        nothing needs reading from the device)."""
        store = self.store
        return store is not None and store.fp_count is not None and all(tier.rows == 0 for tier in store.tiers)

    def _stored(self, which: int) -> torch.Tensor:
        """Full-precision keys (0) or values (1) of every slot. Free while the store has quantised nothing
        (the prompt pass: they are still in the buffer), and that is when eviction scores with keys; at
        decode steps the every-step policies score with the attention's probabilities over the packed
        codes instead, and attention itself reads the codes block by block. Otherwise (HF code reading
        ``cache.layers[i].keys``) the store is dequantised."""
        if self.all_full_precision():
            return (self.store.fp_k, self.store.fp_v)[which]
        return self.store.dequantize()[which]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, h, q, _ = key_states.shape
        # copied into contiguous memory, as the dense cache copies them into its buffers
        self.store.append(key_states.contiguous(), value_states.contiguous(), flush=False)
        index = torch.arange(self.seen, self.seen + q, device=self.device).expand(b, h, q)
        self._index = torch.cat([self.index, index], 2)
        self._valid = torch.cat([self.valid, torch.ones(b, h, q, dtype=torch.bool, device=self.device)], 2)
        self._scores = torch.cat([self.scores, torch.zeros(b, h, q, device=self.device)], 2)
        self.length, self.seen = self.length + q, self.seen + q
        self._count_appended(b, q)
        # attention reads the store, not these; HF only passes them on to the attention function
        return key_states, value_states

    def keep(self, slots: torch.Tensor, slot_valid: torch.Tensor, headroom: int) -> None:
        order = slots.argsort(dim=-1)
        slots, slot_valid = slots.gather(2, order), slot_valid.gather(2, order)
        self.store.keep(slots)
        self._index = self.index.gather(2, slots)
        self._scores = self.scores.gather(2, slots)
        self._valid = self.valid.gather(2, slots) & slot_valid
        self.length = slots.shape[-1]
        self.heads_aligned = False
        self.evictions += 1

    def replace(self, victim: torch.Tensor) -> None:
        b, h, n = self._index.shape[0], self._index.shape[1], self.length
        self.store.remove(victim[..., None])
        dropped = torch.zeros(b, h, n, dtype=torch.uint8, device=self.device)
        dropped.scatter_(2, victim[..., None], 1)
        others = dropped.argsort(dim=-1, stable=True)[..., : n - 1]  # the other slots, in order (no host read)
        for name in ("_index", "_valid", "_scores"):
            setattr(self, name, getattr(self, name)[:, :, :n].gather(2, others))
        self.length = n - 1
        self.heads_aligned = False
        self.evictions += 1

    def settle(
        self, queries: torch.Tensor, scaling: float, lse: torch.Tensor | None, probs: torch.Tensor | None = None
    ) -> None:
        """Quantise the buffered tokens the codec says are due, after attention and eviction.

        ZipCache ranks them by normalised attention: at a decode step the current query's probabilities
        over the packed cache (``probs`` as eviction scored with them, or from the attention's
        log-sum-exp ``lse``; both only when no slot was evicted since), at a prompt pass ZipCache's probe
        queries (the last 5% and a random 5%) over the kept slots."""
        store = self.store
        if store is None or not store.will_flush(0):
            return
        if not self.codec.needs_saliency:
            store.flush()
            return
        q = queries.shape[2]
        visible = self.visible(q)
        if q > 1:
            probes = probe_positions(q, generator=torch.Generator().manual_seed(PROBE_SEED)).to(self.device)
            queries, visible, lse, probs = queries[:, :, probes], visible[:, :, probes], None, None
        if probs is None:
            probs = packed_probabilities(queries, store, visible, scaling, lse=lse)
        store.flush(normalized_attention(probs, visible=visible))

    def nbytes(self) -> int:
        """Bytes the quantised store holds (packed codes, parameters, full-precision buffer)."""
        return self.store.nbytes() if self.store is not None else 0


class PolicyCache(Cache):
    """A Cache of :class:`PolicyLayer` s that compresses each layer after its attention with a plan;
    with a ``codec`` the layers are :class:`QuantPolicyLayer` s (eviction and quantisation compose)."""

    def __init__(self, plan: CompressionPlan, codec: QuantCodec | None = None) -> None:
        layers = [PolicyLayer() if codec is None else QuantPolicyLayer(codec) for _ in range(plan.num_layers)]
        super().__init__(layers=layers)
        self.plan = plan
        self.codec = codec
        self._pass_real: tuple[int, list[int]] | None = None  # (tokens seen after the pass, its real tokens)
        self.prompt_end: int | None = None  # chunked prefill: logical length at the end of the prompt
        self.held_nbytes = 0  # K/V bytes the layers hold now (running total)
        self.peak_nbytes = 0  # the most they held at once, after any append or eviction

    def reset(self) -> None:
        super().reset()
        self._pass_real = None
        self.prompt_end = None
        self.held_nbytes = self.peak_nbytes = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        self._count_bytes(self.layers[layer_idx])
        return out

    def _count_bytes(self, layer: PolicyLayer) -> None:
        """Bring ``layer``'s share of the running byte total up to date (host arithmetic, no device read)."""
        now = layer.nbytes()
        self.held_nbytes += now - layer.counted_nbytes
        layer.counted_nbytes = now
        self.peak_nbytes = max(self.peak_nbytes, self.held_nbytes)

    def begin_prompt(
        self, attention_mask: torch.Tensor | None, batch: int, prompt_tokens: int, device: torch.device
    ) -> None:
        """Before the first chunk of a prompt of ``prompt_tokens`` positions (padding included): fix each
        sequence's budget from its whole prompt (``attention_mask [B, prompt_tokens]``, 1 for real tokens, or
        None: no padding), as a one-shot prompt pass does from its own mask. One host read per prompt."""
        positions = torch.arange(prompt_tokens, device=device)
        if attention_mask is None:
            real = [prompt_tokens] * batch
            first = torch.zeros(batch, dtype=torch.long, device=device)
        else:
            valid = attention_mask.to(device=device, dtype=torch.bool)
            real = valid.sum(dim=-1).tolist()
            first = torch.where(valid, positions, prompt_tokens).min(dim=-1).values
        self.plan.start(real, first)
        self.prompt_end = prompt_tokens

    def _mid_prompt(self, layer: PolicyLayer) -> bool:
        """A chunk of a chunked prompt that is not its last has just been appended to ``layer``."""
        return self.prompt_end is not None and layer.seen < self.prompt_end

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def bookkeeping_nbytes(self) -> int:
        return sum(layer.bookkeeping_nbytes() for layer in self.layers)

    def kept_tokens_per_layer(self) -> list[float]:
        """Real tokens kept per layer, averaged over sequences and KV heads."""
        return [sum(t) / max(1, len(t)) for t in (layer.kept_tokens() for layer in self.layers)]

    def pass_real_tokens(self, layer: PolicyLayer, new_valid: torch.Tensor) -> list[int]:
        """Real tokens per sequence among this forward pass's ``new_valid [B, q]``, on the host. The mask is
        the same for every layer of a pass, so it is read once per pass (a pass is identified by the
        tokens seen after it), not once per layer."""
        if self._pass_real is None or self._pass_real[0] != layer.seen:
            self._pass_real = (layer.seen, new_valid.sum(dim=-1).tolist())
        return self._pass_real[1]

    def observe(
        self,
        layer_idx: int,
        queries: torch.Tensor,
        scaling: float,
        probabilities: torch.Tensor | None = None,
        key_bias: torch.Tensor | None = None,
    ) -> None:
        """After layer ``layer_idx`` attended with ``queries``: score its slots and evict over budget.
        ``probabilities`` (``[B, H_q, q, T]`` over the slots, when attention already produced them) spare the
        policy reading the keys, which a quantised layer would have to dequantise. ``key_bias [B, H_q, T]`` is
        the positional bias the model's attention added to every query's logits over the slots (ALiBi, made
        from the slots' logical positions by :meth:`PolicyLayer.alibi_bias`); the policy's statistics add it too."""
        layer: PolicyLayer = self.layers[layer_idx]
        plan = self.plan
        q = queries.shape[2]
        if plan.prompt_len is None:
            valid_new = layer.valid[:, 0, -q:]
            first = torch.where(valid_new, layer.index[:, 0, -q:], layer.seen).min(dim=-1).values
            plan.start(layer.new_real, first)
        if q == 1 and self._ring_step(layer):
            layer.passes += 1
            return
        first_pass = layer.budget is None
        prompt_chunk = self.prompt_end is not None and layer.seen <= self.prompt_end  # chunked prefill
        if not (first_pass or prompt_chunk or plan.policy.every_step):  # nothing to score or evict at this pass
            layer.passes += 1
            return
        key_index, key_valid = layer.index, layer.valid
        if layer.heads_aligned and layer.length == layer.seen:  # every slot is its position, in every head
            key_index = torch.arange(layer.length, device=layer.device).expand(key_index.shape)
        if layer.all_valid:  # shared values, passed expanded: scoring masks [q, T] once, not per sequence and head
            key_valid = torch.ones((), dtype=torch.bool, device=layer.device).expand(key_valid.shape)
        # a quantised layer's keys and values would be dequantised: with probabilities given, policies go without
        stored = probabilities is None or not isinstance(layer, QuantPolicyLayer)
        obs = Observation(
            queries=queries,
            keys=layer.keys if stored else None,
            key_index=key_index,
            key_valid=key_valid,
            query_index=layer.query_index(q),
            scaling=scaling,
            step=layer.passes,
            max_new_tokens=plan.max_new_tokens,
            probabilities=probabilities,
            values=layer.values if stored else None,
            # a layer-wide selection (TOVA) evicts the same slot in every head of a dense layer: same layout
            heads_share_slots=layer.heads_aligned or (plan.policy.shares_layer_selection and type(layer) is PolicyLayer),
            key_bias=key_bias,
        )
        previous = None if first_pass else layer.scores[:, :, : layer.length - q]
        if prompt_chunk:
            layer._scores[:, :, : layer.length] = plan.plan.prompt_chunk_scores(obs, previous)
        else:
            layer._scores[:, :, : layer.length] = plan.policy.score(obs, previous)
        if first_pass:
            self._first_budget(layer_idx, obs)
        self._evict(layer, q)
        self._count_bytes(layer)
        if not self._mid_prompt(layer):  # every chunk of a prompt is step 0, as the one-shot prompt pass
            layer.passes += 1

    def _first_budget(self, layer_idx: int, obs: Observation) -> None:
        """Set layer ``layer_idx``'s budget at its first pass (CAKE: and shrink the layers before it)."""
        plan = self.plan
        if plan.layer_budgets is not None:
            assert plan.layer_budget_tokens is not None
            self._set_budget(self.layers[layer_idx], plan.layer_budgets[layer_idx], plan.layer_budget_tokens[layer_idx])
            return
        window = plan.layer_budget.window
        probs = window_probabilities(
            obs.queries, obs.keys, obs.key_index, obs.key_valid, obs.query_index, obs.scaling, window, obs.key_bias
        )
        prefix = obs.key_valid & (obs.key_index < (obs.query_index[:, -1:, None] + 1 - window))
        budgets = plan.cascade(plan.layer_budget.preference(probs, prefix))
        budget_tokens = budgets.tolist()  # prompt pass only: cascading budgets depend on attention
        for earlier in range(layer_idx):  # cascading: shrink the layers already compressed
            previous_layer: PolicyLayer = self.layers[earlier]
            self._set_budget(previous_layer, budgets[earlier], budget_tokens[earlier])
            self._evict(previous_layer, 0)
            self._count_bytes(previous_layer)
        self._set_budget(self.layers[layer_idx], budgets[layer_idx], budget_tokens[layer_idx])

    def _set_budget(self, layer: PolicyLayer, budget: torch.Tensor, budget_tokens: list[int]) -> None:
        """``budget [B]`` on the device and ``budget_tokens`` (the same values) on the host."""
        layer.budget = budget
        layer.budget_tokens = [int(c) for c in budget_tokens]
        recent = [self.plan.plan.recent(c) for c in layer.budget_tokens]
        layer.recent = torch.tensor(recent, device=layer.device)

    def _evict(self, layer: PolicyLayer, q: int) -> None:
        """Bring every sequence of ``layer`` back within its budget. Decided from the host mirrors: a
        sequence holding ``n`` real tokens per head over a budget ``c`` keeps ``min(n, c)`` (the selector
        keeps the top ``c`` and padding or empty slots never rank above a real token)."""
        plan = self.plan
        assert layer.budget_tokens is not None
        if all(n <= c for n, c in zip(layer.real_tokens, layer.budget_tokens)):
            return
        next_index = torch.full_like(plan.first_index, layer.seen)
        protected = protected_slots(layer.index, plan.first_index, next_index, plan.policy.sinks, layer.recent)
        if q == 1 and not layer.heads_aligned and self._replace_one(layer, protected):
            return
        kept = [min(n, c) for n, c in zip(layer.real_tokens, layer.budget_tokens)]
        # no room is reserved for a prompt's next chunk: the layers hold C each between chunks, and only the one
        # layer being fed holds C + chunk (it grows on the append), so the cache peaks at L * C + chunk tokens
        headroom = 1 if plan.policy.every_step and not self._mid_prompt(layer) else 0
        in_position_order = layer.heads_aligned
        slots, slot_valid = select_keep(layer.scores, layer.valid, protected, layer.budget, max(kept), layer.index)
        layer.keep(slots, slot_valid, headroom)
        layer.real_tokens = kept
        if in_position_order and type(layer) is PolicyLayer and self._evicts_oldest(layer) and layer.all_valid:
            # kept in position order: slots [0, sinks) the sinks, then the window, oldest first
            layer.ring_next = plan.policy.sinks

    def _evicts_oldest(self, layer: PolicyLayer) -> bool:
        """Whether each decode step of ``layer`` evicts exactly its oldest token after the sinks: a policy scoring
        by position alone (StreamingLLM) whose recent window is the whole budget after the sinks, the same
        budget for every sequence."""
        policy = self.plan.policy
        budgets = layer.budget_tokens or []
        return (
            policy.position_only and len(set(budgets)) == 1 and budgets[0] > policy.sinks
            and policy.sinks + self.plan.plan.recent(budgets[0]) == budgets[0]
        )

    def _ring_step(self, layer: PolicyLayer) -> bool:
        """A decode step of a ring layer (StreamingLLM after its prompt, nothing padded): every sequence holds one
        token over its budget, the oldest after the sinks leaves and the new one takes its slot, decided on
        the host (no scoring, no search). False (the general path) in any other state."""
        victim = layer.ring_next
        if victim is None:
            return False
        budget = layer.budget_tokens[0]  # type: ignore[index]
        if layer.length != budget + 1 or any(n != budget + 1 for n in layer.real_tokens):
            layer.ring_next = None  # padding arrived: the general path takes over for good
            return False
        layer.replace_at(victim)
        sinks = self.plan.policy.sinks  # the ring is slots [sinks, budget), oldest first from ring_next
        layer.ring_next = sinks + (victim + 1 - sinks) % (budget - sinks)
        layer.real_tokens = [budget] * len(layer.real_tokens)
        self._count_bytes(layer)
        return True

    @staticmethod
    def _replace_one(layer: PolicyLayer, protected: torch.Tensor) -> bool:
        """Decode fast path: the new token takes one slot in place, nothing else moves. Returns False when
        some sequence neither exceeds its budget nor has an empty slot among the older ones (the general
        path handles it)."""
        assert layer.budget_tokens is not None
        over = [n > c for n, c in zip(layer.real_tokens, layer.budget_tokens)]
        older_slots = layer.length - 1
        has_empty = [n - new < older_slots for n, new in zip(layer.real_tokens, layer.new_real)]
        if not all(o or e for o, e in zip(over, has_empty)):
            return False
        old = slice(0, older_slots)
        # every sequence over budget (the usual decode step): no need to find empty slots
        over_budget = True if all(over) else layer.valid.sum(dim=-1) > layer.budget[:, None]  # [B, H]
        victim = replacement_slot(layer.scores[:, :, old], layer.valid[:, :, old], protected[:, :, old], over_budget)
        layer.replace(victim)
        layer.real_tokens = [n - 1 if o else n for n, o in zip(layer.real_tokens, over)]
        return True
