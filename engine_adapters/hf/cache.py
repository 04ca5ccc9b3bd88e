"""A ``transformers`` Cache that really holds only the kept tokens.

Each layer stores ``[B, H_kv, C_l, D]`` keys and values plus, per slot, its logical position, whether
it is a real token, and its policy score. Slots need not be in sequence order and may differ per KV
head. Two lengths are kept apart: ``seen`` (logical: tokens the sequence has seen, what RoPE and
``generate`` count) and ``length`` (physical: slots held).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from attention.scoring import window_probabilities
from kvcache.budget import LayerBudget, tokens_for
from kvcache.evict.base import EvictionPolicy, Observation
from kvcache.selector import protected_slots, replacement_slot, select_keep

UNLIMITED = 1 << 60  # a layer budget that never evicts (budget=1.0)
GROW_TOKENS = 16  # capacity grows in blocks of this many tokens, like vLLM's paged blocks


@dataclass
class CompressionPlan:
    """What to keep and how many: one eviction policy, one layer budget, the user's budget."""

    policy: EvictionPolicy
    layer_budget: LayerBudget
    budget: float | int
    num_layers: int
    max_new_tokens: int | None = None
    # Filled at the prompt pass, shared by all layers: [B] tensors and per-layer budgets [N, B].
    prompt_len: torch.Tensor | None = None
    first_index: torch.Tensor | None = None
    layer_budgets: torch.Tensor | None = None
    preferences: list[torch.Tensor] = field(default_factory=list)

    def start(self, new_valid: torch.Tensor, first_index: torch.Tensor) -> None:
        """Fix per-sequence budgets from the prompt (``new_valid [B, q]``: real tokens of the prompt pass)."""
        self.prompt_len = new_valid.sum(dim=-1)
        self.first_index = first_index
        lengths = self.prompt_len.tolist()
        capacity = torch.tensor([tokens_for(self.budget, n) for n in lengths], device=new_valid.device)
        recent = torch.tensor([self.policy.recent_tokens(c) for c in capacity.tolist()], device=new_valid.device)
        for n, c in zip(lengths, capacity.tolist()):
            if n > c:
                self.policy.check_budget(c)
        self.capacity, self.recent = capacity, recent
        if isinstance(self.budget, float) and self.budget == 1.0:  # the whole sequence, prompt and generated tokens: scored, never evicted
            self.layer_budgets = torch.full((self.num_layers, len(lengths)), UNLIMITED, device=new_valid.device)
        elif not self.layer_budget.cascading:
            self.layer_budgets = self.layer_budget.allocate(capacity, recent, self.prompt_len, self.num_layers)

    def cascade(self, preference: torch.Tensor) -> torch.Tensor:
        """CAKE: add layer ``len(preferences)``'s preference; budgets ``[m + 1, B]`` for the layers seen so far."""
        self.preferences.append(preference)
        return self.layer_budget.allocate(
            self.capacity, self.recent, self.prompt_len, self.num_layers, torch.stack(self.preferences)
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
        self.heads_aligned = True  # every KV head holds the same slots in sequence order

    # -- storage -------------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self._k = key_states.new_empty(b, h, 0, d)
        self._v = value_states.new_empty(b, h, 0, value_states.shape[-1])
        self._index = torch.empty(b, h, 0, dtype=torch.long, device=self.device)
        self._valid = torch.empty(b, h, 0, dtype=torch.bool, device=self.device)
        self._scores = torch.empty(b, h, 0, dtype=torch.float32, device=self.device)
        self.is_initialized = True

    @property
    def keys(self) -> torch.Tensor | None:  # type: ignore[override]
        return self._k[:, :, : self.length] if self.is_initialized else None

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        if value is not None:
            raise AttributeError("PolicyLayer keys are managed by the cache; they cannot be assigned")

    @property
    def values(self) -> torch.Tensor | None:  # type: ignore[override]
        return self._v[:, :, : self.length] if self.is_initialized else None

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        if value is not None:
            raise AttributeError("PolicyLayer values are managed by the cache; they cannot be assigned")

    @property
    def index(self) -> torch.Tensor:
        return self._index[:, :, : self.length]

    @property
    def valid(self) -> torch.Tensor:
        return self._valid[:, :, : self.length]

    @property
    def scores(self) -> torch.Tensor:
        return self._scores[:, :, : self.length]

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
        self._valid[:, :, start:stop] = True
        self._scores[:, :, start:stop] = 0
        self.length, self.seen = stop, self.seen + q
        return self.keys, self.values

    def mark_padding(self, new_valid: torch.Tensor) -> None:
        """Record which of the newest ``q`` slots are real tokens (``new_valid [B, q]``)."""
        q = new_valid.shape[1]
        self._valid[:, :, self.length - q : self.length] = new_valid[:, None, :]

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
        self.length = kept
        self.heads_aligned = False

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


class PolicyCache(Cache):
    """A Cache of :class:`PolicyLayer` s that compresses each layer after its attention with a plan."""

    def __init__(self, plan: CompressionPlan) -> None:
        super().__init__(layers=[PolicyLayer() for _ in range(plan.num_layers)])
        self.plan = plan

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def bookkeeping_nbytes(self) -> int:
        return sum(layer.bookkeeping_nbytes() for layer in self.layers)

    def kept_tokens_per_layer(self) -> list[float]:
        """Real tokens kept per layer, averaged over sequences and KV heads."""
        return [sum(t) / max(1, len(t)) for t in (layer.kept_tokens() for layer in self.layers)]

    def observe(self, layer_idx: int, queries: torch.Tensor, scaling: float) -> None:
        """After layer ``layer_idx`` attended with ``queries``: score its slots and evict over budget."""
        layer: PolicyLayer = self.layers[layer_idx]
        plan = self.plan
        q = queries.shape[2]
        if plan.prompt_len is None:
            valid_new = layer.valid[:, 0, -q:]
            first = torch.where(valid_new, layer.index[:, 0, -q:], layer.seen).min(dim=-1).values
            plan.start(valid_new, first)
        query_index = torch.arange(layer.seen - q, layer.seen, device=queries.device).expand(queries.shape[0], q)
        obs = Observation(
            queries=queries,
            keys=layer.keys,
            key_index=layer.index,
            key_valid=layer.valid,
            query_index=query_index,
            scaling=scaling,
            step=layer.passes,
            max_new_tokens=plan.max_new_tokens,
        )
        first_pass = layer.budget is None
        if first_pass or plan.policy.every_step:
            previous = layer.scores[:, :, : layer.length - q] if not first_pass else None
            layer._scores[:, :, : layer.length] = plan.policy.score(obs, previous)
        if first_pass:
            layer.budget = self._first_budget(layer_idx, obs)
        if first_pass or plan.policy.every_step:
            self._evict(layer, q)
        layer.passes += 1

    def _first_budget(self, layer_idx: int, obs: Observation) -> torch.Tensor:
        plan = self.plan
        if plan.layer_budgets is not None:
            return plan.layer_budgets[layer_idx]
        window = plan.layer_budget.window
        probs = window_probabilities(
            obs.queries, obs.keys, obs.key_index, obs.key_valid, obs.query_index, obs.scaling, window
        )
        prefix = obs.key_valid & (obs.key_index < (obs.query_index[:, -1:, None] + 1 - window))
        budgets = plan.cascade(plan.layer_budget.preference(probs, prefix))
        for earlier in range(layer_idx):  # cascading: shrink the layers already compressed
            previous_layer: PolicyLayer = self.layers[earlier]
            previous_layer.budget = budgets[earlier]
            self._evict(previous_layer, 0)
        return budgets[layer_idx]

    def _evict(self, layer: PolicyLayer, q: int) -> None:
        """Bring every sequence of ``layer`` back within its budget."""
        plan = self.plan
        counts = layer.valid[:, 0].sum(dim=-1) if layer.heads_aligned else layer.valid.sum(dim=-1).max(dim=-1).values
        if not bool((counts > layer.budget).any()):
            return
        recent = torch.tensor([plan.policy.recent_tokens(int(c)) for c in layer.budget.tolist()], device=layer.device)
        next_index = torch.full_like(plan.first_index, layer.seen)
        protected = protected_slots(layer.index, plan.first_index, next_index, plan.policy.sinks, recent)
        if q == 1 and not layer.heads_aligned and self._replace_one(layer, protected, counts):
            return
        capacity = int(torch.minimum(counts, layer.budget).max())
        headroom = 1 if plan.policy.every_step else 0
        slots, slot_valid = select_keep(layer.scores, layer.valid, protected, layer.budget, capacity, layer.index)
        layer.keep(slots, slot_valid, headroom)

    @staticmethod
    def _replace_one(layer: PolicyLayer, protected: torch.Tensor, counts: torch.Tensor) -> bool:
        """Decode fast path: the new token takes one slot in place, nothing else moves. Returns False when
        some sequence neither exceeds its budget nor has an empty slot (the general path handles it)."""
        old = slice(0, layer.length - 1)
        over_budget = (layer.valid.sum(dim=-1) > layer.budget[:, None])  # [B, H]
        has_empty = (~layer.valid[:, :, old]).any(dim=-1)
        if not bool((over_budget | has_empty).all()):
            return False
        victim = replacement_slot(layer.scores[:, :, old], layer.valid[:, :, old], protected[:, :, old], over_budget)
        layer.replace(victim)
        return True
