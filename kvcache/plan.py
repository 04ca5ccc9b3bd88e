"""One compression plan for every engine: the user's settings turned into what each request may keep.

Both adapters ask this module, never their own arithmetic:

* :meth:`KVPlan.request` fixes a request's budget at its prompt: ``capacity`` C tokens per layer and KV
  head on average (``kvcache.budget.tokens_for``), the protected ``recent`` window and ``sinks``, and whether
  the prompt is compressed at all (a prompt whose budget cannot hold the policy's recent window and sinks is
  left whole, with a note saying so, instead of failing);
* :meth:`KVPlan.recent` is the recent window protected when a layer keeps ``target`` tokens (clamped so the
  sinks and the window fit);
* :meth:`KVPlan.layer_budgets` splits C across layers with the ``budget`` policy (uniform, PyramidKV, CAKE);
* :meth:`KVPlan.observed_queries` is how many of the prompt's last queries the policy scores with (its own
  declaration, :meth:`~kvcache.evict.base.EvictionPolicy.observed_prompt_queries`), capped where an engine
  cannot hold that many, and :meth:`KVPlan.observation_note` says when it is;
* :meth:`KVPlan.check_prefill_chunk` validates a chunked prefill's chunk size, and
  :meth:`KVPlan.prompt_chunk_scores` is how a prompt fed in chunks is scored after each chunk (every-query
  policies accumulate each chunk's pooled votes; windowed and position/key policies re-score from the chunk);
* :func:`blocks_for` rounds kept tokens up to an engine's cache blocks.

The HF adapter turns these into per-sequence tensors; the vLLM scheduler into per-request compactions.
Nothing here imports an engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from kvcache.budget.base import LayerBudget, check_budgets, tokens_for
from kvcache.evict.base import EvictionPolicy, Observation, accumulate
from kvcache.registry import PolicyConfigError, check_int

UNLIMITED = 1 << 60  # a layer budget that never evicts (budget 1.0, or a prompt left uncompressed)


@dataclass(frozen=True)
class RequestBudget:
    """What one request may keep, fixed at its prompt."""

    prompt_len: int
    capacity: int  # C: tokens per layer and KV head (on average over layers)
    recent: int  # recent tokens protected at a layer keeping C
    sinks: int  # first tokens protected
    compressed: bool  # False: kept whole, never evicted (budget 1.0, a policy that never compresses, or too short)
    note: str | None = None  # why a prompt the budget would have compressed is kept whole


class KVPlan:
    """The eviction policy, the user's budget and the layer-budget policy, asked the same way by every engine."""

    def __init__(
        self, policy: EvictionPolicy, budget: float | int | Sequence[float | int], layer_budget: LayerBudget | None = None
    ) -> None:
        rows = check_budgets(budget)
        self.policy = policy
        self.budget = budget if rows is None else rows
        self.row_budgets = rows  # one budget per batch row (a batch whose rows chose their own), or None
        self.layer_budget = layer_budget
        self.keeps_everything = not policy.compresses or all(_full(value) for value in rows or (budget,))

    def check_rows(self, batch_rows: int) -> None:
        """A per-row budget list must have one budget per row of the batch."""
        if self.row_budgets is not None and len(self.row_budgets) != batch_rows:
            raise PolicyConfigError(
                f"budget lists {len(self.row_budgets)} per-row budgets but the batch has {batch_rows} rows; pass one "
                "budget per row (or one budget for all)"
            )

    def budget_of(self, row: int | None = None) -> float | int:
        """The budget of batch row ``row`` (the one budget when there is no per-row list)."""
        if self.row_budgets is None:
            return self.budget
        if row is None:
            raise PolicyConfigError("budget is a per-row list: the batch row must be given")
        return self.row_budgets[row]

    # -- one request -------------------------------------------------------------------------------
    def request(self, prompt_len: int, row: int | None = None) -> RequestBudget:
        """The budget of a request whose prompt has ``prompt_len`` real tokens (batch row ``row`` where the
        budget is a per-row list)."""
        sinks = self.policy.sinks
        budget = self.budget_of(row)
        if self.keeps_everything or _full(budget):
            return RequestBudget(prompt_len, prompt_len, self.policy.recent_tokens(prompt_len), sinks, False)
        capacity = tokens_for(budget, prompt_len)
        if self.policy.protected_tokens(capacity) > capacity:  # the window and sinks alone overflow the budget
            note = None
            if prompt_len > capacity:
                note = (
                    f"a prompt of {prompt_len} tokens at budget {budget} keeps {capacity} tokens, fewer than "
                    f"{self.policy.registry_name}'s recent window ({self.policy.recent_tokens(capacity)}) + sinks "
                    f"({sinks}); left uncompressed"
                )
            return RequestBudget(prompt_len, prompt_len, self.policy.recent_tokens(prompt_len), sinks, False, note)
        return RequestBudget(prompt_len, capacity, self.recent(capacity), sinks, True)

    def recent(self, target: int, extra: int = 0) -> int:
        """Recent tokens protected when a layer keeps ``target`` slots, ``extra`` of which were appended
        uncompressed since the budget was set (a prompt-only policy's decode tokens): the policy's window
        for a budget of ``target - extra`` plus those, never more than what fits after the sinks."""
        window = self.policy.recent_tokens(max(0, target - extra)) + extra
        return max(0, min(window, target - min(self.policy.sinks, target)))

    # -- layers ----------------------------------------------------------------------------------------
    def layer_budgets(
        self, requests: list[RequestBudget], num_layers: int, preferences: torch.Tensor | None = None,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """Tokens each layer keeps per request, ``[num_layers, B]`` (``[m, B]`` for the first m layers of a
        cascading policy, given their ``preferences``); requests kept whole get :data:`UNLIMITED`."""
        if self.layer_budget is None:
            raise ValueError("this plan has no layer-budget policy; engines with one length per request use capacity")
        capacity = torch.tensor([r.capacity for r in requests], device=device)
        recent = torch.tensor([r.recent for r in requests], device=device)
        prompt_len = torch.tensor([r.prompt_len for r in requests], device=device)
        budgets = self.layer_budget.allocate(capacity, recent, prompt_len, num_layers, preferences)
        whole = [i for i, r in enumerate(requests) if not r.compressed]
        if whole:
            budgets = budgets.clone()
            budgets[:, whole] = UNLIMITED
        return budgets

    # -- observation -----------------------------------------------------------------------------------
    def observed_queries(self, prompt_len: int, limit: int | None = None) -> int:
        """How many of the prompt's last queries to score with: the policy's declaration, at most ``limit``
        (an engine's cap on the queries it can hold)."""
        wanted = self.policy.observed_prompt_queries(prompt_len)
        return wanted if limit is None else min(wanted, limit)

    def observation_note(self, limit: int) -> str | None:
        """A line for the log when an engine holding ``limit`` queries cannot observe what the policy asks."""
        if self.policy.observed_prompt_queries(limit + 1) <= limit:
            return None
        return (
            f"{self.policy.registry_name} scores with every prompt query; this engine keeps the last {limit} of each "
            "prompt, so its prompt scores differ from the Hugging Face adapter's"
        )

    # -- chunked prefill ---------------------------------------------------------------------------------
    @property
    def accumulates_prompt_chunks(self) -> bool:
        """Whether a prompt fed in chunks carries its scores from chunk to chunk: policies where every prompt
        query votes and scores accumulate over passes (H2O, Keyformer: S <- [S_prev, 0] + s_chunk). The others
        re-score all held slots from each chunk alone: SnapKV and Expected Attention from the chunk's last w
        queries (the chunk's tail, not the question at the prompt's end), TOVA from its last query,
        StreamingLLM and KNorm from positions and keys (for those the result equals the one-shot prompt's)."""
        return self.policy.every_step and self.policy.observed_prompt_queries(UNLIMITED) == UNLIMITED

    def prompt_chunk_scores(self, obs: Observation, previous: torch.Tensor | None) -> torch.Tensor:
        """Scores ``[B, H_kv, T]`` of every held slot after one chunk of a chunked prompt. Each chunk is scored as
        a prompt pass (``policy.score(obs, None)``: H2O and Keyformer pool it as they pool a one-shot prompt);
        accumulating policies add the kept slots' ``previous`` totals (:attr:`accumulates_prompt_chunks`)."""
        fresh = self.policy.score(obs, None)
        if previous is None or not self.accumulates_prompt_chunks:
            return fresh
        return accumulate(previous, fresh)

    def check_prefill_chunk(self, chunk: int) -> None:
        """Raise :class:`PolicyConfigError` when prompts cannot be fed ``chunk`` tokens at a time under this plan:
        a chunk must be a positive int and, for a policy scoring with an observation window (SnapKV's w), at
        least that window, so every chunk's scores see the full window."""
        check_int("prefill_chunk (tokens per prompt chunk)", chunk, 1)
        if not self.policy.compresses:
            return
        window = self.policy.observed_prompt_queries(UNLIMITED)
        if window < UNLIMITED and chunk < window:
            raise PolicyConfigError(
                f"prefill_chunk {chunk} is smaller than {self.policy.registry_name}'s observation window of {window} "
                f"queries; use prefill_chunk >= {window} or a smaller window"
            )
        fixed = self.policy.window
        if isinstance(fixed, int) and not isinstance(fixed, bool) and chunk < fixed:
            raise PolicyConfigError(
                f"prefill_chunk {chunk} is smaller than {self.policy.registry_name}'s protected recent window of "
                f"{fixed} tokens; use prefill_chunk >= {fixed} or a smaller window"
            )

    def describe(self) -> dict[str, Any]:
        return {
            "policy": self.policy.registry_name,
            "budget": self.budget,
            "layer_budget": getattr(self.layer_budget, "registry_name", None),
        }


def _full(budget: float | int) -> bool:
    """Budget 1.0: the whole prompt (a token count never means "everything")."""
    return isinstance(budget, float) and budget == 1.0


def blocks_for(tokens: int, block_size: int) -> int:
    """Cache blocks of ``block_size`` tokens that ``tokens`` kept tokens occupy."""
    return -(-tokens // block_size)
