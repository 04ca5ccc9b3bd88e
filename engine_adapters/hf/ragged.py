"""Head-adaptive budgets that really save memory: a ragged per-head layout for the Hugging Face cache.

With Ada-KV's split (:func:`kvcache.budget.heads.adaptive_head_budgets`, arXiv 2407.11550) the KV heads of
a layer keep different numbers of tokens. kvpress only masks the dropped ones (no memory saved); a
``[B, H_kv, C, D]`` tensor would have to be padded to the largest head. Here a layer stores its keys and
values as **one packed buffer of rows** ``[R, D]``: each kept token of each (sequence, KV head) is one row,
so the bytes held are the kept-token count (plus growth headroom, in blocks of ``GROW_TOKENS`` tokens per
head as the dense layer grows). The per-slot metadata stays ``[B, H_kv, T]`` as in
:class:`~kvcache.engine_adapters.hf.cache.PolicyLayer` (logical position, validity, score) plus ``_row``,
each slot's row in the packed buffer; T is the largest head's slot count, and a shorter head's extra slots
are marked invalid (they point at row 0 and are never attended).

Attention gathers the slots into a transient ``[B, H_kv, T, D]`` tensor for the layer's pass (freed after
the layer's eviction) and attends with the invalid slots masked, which is HF eager attention with the
evicted positions masked. Slot order obeys the dense layer's rule, so every eviction policy works
unchanged: a pass's new tokens are the last slots of every head.

When heads split (:class:`RaggedPolicyCache`): a sequence's split is made when it first exceeds its layer
budget C (the prompt pass for prompt-only policies such as SnapKV, KNorm, ExpectedAttention; re-made when
CAKE's cascade changes C). After that every-step policies (H2O, Keyformer, TOVA, StreamingLLM) keep each
head's count fixed: the new token replaces that head's lowest-scoring unprotected slot in place (one row
copy per head, no compaction); prompt-only policies append decode tokens to every head.
"""

from __future__ import annotations

import torch

from kvcache.budget.heads import HeadBudget, adaptive_head_budgets
from kvcache.engine_adapters.hf.cache import GROW_TOKENS, CompressionPlan, PolicyCache, PolicyLayer
from kvcache.selector import protected_slots, replacement_slot, select_keep_per_head


class RaggedPolicyLayer(PolicyLayer):
    """A :class:`PolicyLayer` whose KV heads may hold different numbers of tokens, packed row by row
    (see the module docstring). Host mirrors per (sequence, head): ``head_real`` real tokens held, and
    once a sequence's budget is split, ``head_budget_tokens`` the tokens each head may keep."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads = 0
        self.rows_used = 0  # rows of the packed buffers holding a token (real or padding)
        self.head_real: list[list[int]] = []  # [B][H] real tokens per head (host)
        self.head_budget_tokens: list[list[int] | None] = []  # [B][H] each head's budget once split (host)
        self.split_for: list[int | None] = []  # the layer budget each sequence's split was made for
        self._view: tuple[torch.Tensor, torch.Tensor] | None = None  # this pass's padded keys/values

    # -- storage -------------------------------------------------------------------------------------
    def _init_storage(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.num_heads = h
        self._k = key_states.new_zeros(0, d)
        self._v = value_states.new_zeros(0, value_states.shape[-1])
        self._row = torch.empty(b, h, 0, dtype=torch.long, device=key_states.device)
        self.head_budget_tokens = [None] * b
        self.split_for = [None] * b

    def _slot_buffers(self) -> list[str]:
        return ["_index", "_valid", "_scores", "_row"]

    def _reserve_slots(self, total: int) -> None:
        """Room for ``total`` slots per head in the metadata, grown in blocks of ``GROW_TOKENS``."""
        if total <= self._index.shape[2]:
            return
        new_capacity = -(-total // GROW_TOKENS) * GROW_TOKENS
        for name in self._slot_buffers():
            old = getattr(self, name)
            grown = old.new_zeros(*old.shape[:2], new_capacity)
            grown[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, grown)

    def _reserve_rows(self, total: int) -> None:
        """Room for ``total`` rows in the packed buffers, grown by ``GROW_TOKENS`` tokens per head at a time."""
        if total <= self._k.shape[0]:
            return
        block = GROW_TOKENS * self._index.shape[0] * self.num_heads
        new_capacity = -(-total // block) * block
        for name in ("_k", "_v"):
            old = getattr(self, name)
            grown = old.new_zeros(new_capacity, old.shape[-1])
            grown[: self.rows_used] = old[: self.rows_used]
            setattr(self, name, grown)

    def _gather(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The slots as padded ``[B, H, T, D]`` keys and values (a transient copy)."""
        rows = self._row[:, :, : self.length]
        flat = rows.reshape(-1)
        shape = (*rows.shape, -1)
        return self._k.index_select(0, flat).view(shape), self._v.index_select(0, flat).view(shape)

    def _stored(self, which: int) -> torch.Tensor:
        return (self._view if self._view is not None else self._gather())[which]

    def drop_view(self) -> None:
        """Free this pass's padded keys and values (after the layer's attention and eviction)."""
        self._view = None

    def visible(self, q: int) -> torch.Tensor:
        """As :meth:`PolicyLayer.visible`; a decode query (the last slot, just appended) sees every real slot,
        all of them older, and itself: the validity itself, two ops instead of the position comparisons."""
        if q > 1:
            return super().visible(q)
        seen = self.valid[:, :, None, :].clone()
        seen[..., -1].fill_(True)  # fill_, not = True: no tensor made from host data
        return seen

    @property
    def all_valid(self) -> bool:
        return all(n == self.length for heads in self.head_real for n in heads)

    def _count_appended(self, batch: int, q: int) -> None:
        super()._count_appended(batch, q)
        if self.head_real:
            self.head_real = [[n + q for n in heads] for heads in self.head_real]
        else:
            self.head_real = [[q] * self.num_heads for _ in range(batch)]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, h, q, _ = key_states.shape
        start, stop = self.length, self.length + q
        first, new_rows = self.rows_used, b * h * q
        self._reserve_slots(stop)
        self._reserve_rows(first + new_rows)
        self._k[first : first + new_rows] = key_states.reshape(new_rows, -1)
        self._v[first : first + new_rows] = value_states.reshape(new_rows, -1)
        self._row[:, :, start:stop] = torch.arange(first, first + new_rows, device=self.device).view(b, h, q)
        self._index[:, :, start:stop] = torch.arange(self.seen, self.seen + q, device=self.device)
        self._valid[:, :, start:stop].fill_(True)
        self._scores[:, :, start:stop].zero_()
        self.rows_used += new_rows
        self.length, self.seen = stop, self.seen + q
        self._count_appended(b, q)
        # the first pass's slots are exactly this pass's tensors; later passes gather the kept rows
        self._view = (key_states, value_states) if start == 0 else self._gather()
        return self._view

    def mark_padding(self, new_valid: torch.Tensor, real: list[int] | None = None) -> None:
        q = new_valid.shape[1]
        real = new_valid.sum(dim=-1).tolist() if real is None else real
        super().mark_padding(new_valid, real)
        self.head_real = [[n - q + r for n in heads] for heads, r in zip(self.head_real, real)]

    def keep(self, slots: torch.Tensor, slot_valid: torch.Tensor, headroom: int, kept_rows: int | None = None) -> None:
        """Keep only ``slots [B, H, C]`` (``slot_valid`` marks the real ones, which may differ in number per
        head): the packed buffers shrink to the ``kept_rows`` real slots (read from the device when not
        given) plus ``headroom`` tokens per head; each head's rows stay contiguous, in slot order."""
        b, h, kept = slots.shape
        kept_valid = self.valid.gather(2, slots) & slot_valid
        old_rows = self._row[:, :, : self.length].gather(2, slots)
        flat_valid = kept_valid.reshape(-1)
        n_rows = int(flat_valid.sum()) if kept_rows is None else kept_rows
        source = old_rows.reshape(-1)[flat_valid.logical_not().to(torch.uint8).argsort(stable=True)[:n_rows]]
        capacity = max(1, n_rows + headroom * b * h)
        for name in ("_k", "_v"):
            old = getattr(self, name)
            packed = old.new_zeros(capacity, old.shape[-1])
            packed[:n_rows] = old.index_select(0, source)
            setattr(self, name, packed)
        new_row = torch.where(kept_valid, (flat_valid.long().cumsum(0) - 1).view(b, h, kept), 0)
        for name, current in (("_index", self.index), ("_scores", self.scores)):
            buf = current.new_zeros(b, h, kept + headroom)
            buf[:, :, :kept] = current.gather(2, slots)
            setattr(self, name, buf)
        self._valid = torch.zeros(b, h, kept + headroom, dtype=torch.bool, device=self.device)
        self._valid[:, :, :kept] = kept_valid
        self._row = torch.zeros(b, h, kept + headroom, dtype=torch.long, device=self.device)
        self._row[:, :, :kept] = new_row
        self.rows_used = n_rows
        self.length = kept
        self.heads_aligned = False
        self._view = None

    def replace(self, victim: torch.Tensor) -> None:
        """The newest token of each (sequence, head) takes slot ``victim [B, H]``, a real token's slot, in
        place: its key and value rows are copied over the victim's rows, the newest rows (the last ``B * H``
        rows, appended by this pass) are freed, and the last slot is dropped."""
        last = self.length - 1
        b, h = victim.shape
        victim_rows = self._row[:, :, :last].gather(2, victim[..., None]).reshape(-1)
        newest_rows = self._row[:, :, last].reshape(-1)
        for name in ("_k", "_v"):
            buf = getattr(self, name)
            buf.index_copy_(0, victim_rows, buf.index_select(0, newest_rows))
        idx = victim[..., None]
        for name in ("_index", "_valid", "_scores"):
            buf = getattr(self, name)
            buf.scatter_(2, idx, buf[:, :, last : last + 1])
        self.rows_used -= b * h
        self.length = last
        self.heads_aligned = False
        self._view = None

    def bookkeeping_nbytes(self) -> int:
        """Bytes of the per-slot position, validity, score and row tensors."""
        if not self.is_initialized:
            return 0
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in self._slot_buffers())

    def head_tokens(self) -> list[list[int]]:
        """Real tokens held per sequence and KV head (host mirror)."""
        return [list(heads) for heads in self.head_real]


class RaggedPolicyCache(PolicyCache):
    """A :class:`PolicyCache` of :class:`RaggedPolicyLayer` s whose layer budgets split over KV heads with
    Ada-KV (``head_budget``); dense quantised storage is not combined with it."""

    def __init__(self, plan: CompressionPlan, head_budget: HeadBudget) -> None:
        super().__init__(plan)
        self.layers = [RaggedPolicyLayer() for _ in range(plan.num_layers)]
        self.head_budget = head_budget

    def head_tokens_per_layer(self) -> list[list[list[int]]]:
        """Real tokens held per layer, sequence and KV head."""
        return [layer.head_tokens() for layer in self.layers]

    def observe(
        self,
        layer_idx: int,
        queries: torch.Tensor,
        scaling: float,
        probabilities: torch.Tensor | None = None,
        key_bias: torch.Tensor | None = None,
    ) -> None:
        try:
            super().observe(layer_idx, queries, scaling, probabilities, key_bias)
        finally:
            self.layers[layer_idx].drop_view()

    def _evict(self, layer: PolicyLayer, q: int) -> None:  # type: ignore[override]
        """Bring every (sequence, head) back within its budget; decided from the host mirrors.

        A sequence over its layer budget C (``sum_h n_h > C * H``) whose split was not made for C is split
        now (Ada-KV); a split sequence's head h keeps ``min(n_h, C_h)``; others keep everything."""
        assert isinstance(layer, RaggedPolicyLayer) and layer.budget_tokens is not None
        h = layer.num_heads
        real, budgets = layer.head_real, layer.budget_tokens
        split = [layer.split_for[b] != c and sum(real[b]) > c * h for b, c in enumerate(budgets)]
        target: list[list[int]] = []
        for b, c in enumerate(budgets):
            heads_budget = layer.head_budget_tokens[b]
            if layer.split_for[b] == c and heads_budget is not None:
                target.append([min(n, m) for n, m in zip(real[b], heads_budget)])
            else:
                target.append(list(real[b]))
        if not any(split) and target == real:
            return
        plan = self.plan
        next_index = torch.full_like(plan.first_index, layer.seen)
        protected = protected_slots(layer.index, plan.first_index, next_index, plan.policy.sinks, layer.recent)
        if not any(split) and q == 1 and all(n == m + 1 for t, r in zip(target, real) for n, m in zip(r, t)):
            # decode, every head exactly one over its budget: the new token replaces a slot in place
            old = slice(0, layer.length - 1)
            victim = replacement_slot(layer.scores[:, :, old], layer.valid[:, :, old], protected[:, :, old], True)
            layer.replace(victim)
            layer.head_real = target
            return
        if any(split):
            counts = adaptive_head_budgets(
                layer.scores, layer.valid, protected, layer.budget, self.head_budget.alpha, layer.index
            ).tolist()  # one read per layer where a split is made (it depends on the scores)
            for b, c in enumerate(budgets):
                if split[b]:
                    target[b] = counts[b]
                    layer.head_budget_tokens[b] = counts[b]
                    layer.split_for[b] = c
        counts_t = torch.tensor(target, device=layer.device)
        capacity = max(1, max(max(t) for t in target))
        slots, slot_valid = select_keep_per_head(layer.scores, layer.valid, protected, counts_t, capacity, layer.index)
        headroom = 1 if plan.policy.every_step else 0
        layer.keep(slots, slot_valid, headroom, kept_rows=sum(map(sum, target)))
        layer.head_real = target
        layer.real_tokens = [max(t) for t in target]
