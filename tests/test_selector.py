"""The shared selector: property tests over random shapes, scores, padding and budgets."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcache.selector import protected_slots, replacement_slot, select_keep


@st.composite
def selection_case(draw):
    b = draw(st.integers(1, 3))
    h = draw(st.integers(1, 3))
    t = draw(st.integers(2, 24))
    seed = draw(st.integers(0, 10_000))
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(b, h, t, generator=gen)
    pads = [draw(st.integers(0, t - 1)) for _ in range(b)]
    index = torch.arange(t).expand(b, h, t)
    valid = torch.stack([torch.arange(t) >= p for p in pads])[:, None, :].expand(b, h, t)
    real = [t - p for p in pads]
    budget = torch.tensor([draw(st.integers(1, n)) for n in real])
    sinks = draw(st.integers(0, 2))
    recent = draw(st.integers(0, 3))
    return scores, index, valid, torch.tensor(pads), budget, sinks, recent, real


@settings(max_examples=60, deadline=None)
@given(selection_case())
def test_selection_keeps_budget_protected_and_top_scores(case):
    scores, index, valid, first, budget, sinks, recent, real = case
    b, h, t = scores.shape
    next_index = torch.full((b,), t)
    protected = protected_slots(index, first, next_index, sinks, recent)
    capacity = int(budget.max())
    slots, keep_valid = select_keep(scores, valid, protected, budget, capacity)
    for row in range(b):
        n_protected = int((protected[row, 0] & valid[row, 0]).sum())
        if n_protected > int(budget[row]):
            continue  # callers refuse budgets below the protected tokens
        for head in range(h):
            kept = set(slots[row, head][keep_valid[row, head]].tolist())
            assert len(kept) == int(budget[row])
            assert all(bool(valid[row, head, s]) for s in kept)
            must = {s for s in range(t) if protected[row, head, s] and valid[row, head, s]}
            assert must <= kept
            rest = [s for s in range(t) if valid[row, head, s] and s not in must]
            chosen = kept - must
            dropped = [s for s in rest if s not in kept]
            if chosen and dropped:
                assert min(scores[row, head, s] for s in chosen) >= max(scores[row, head, s] for s in dropped)
        assert slots[row].diff(dim=-1).ge(0).all()  # ascending slot order


def test_replacement_takes_an_empty_slot_or_the_lowest_unprotected():
    scores = torch.tensor([[[0.5, 0.1, 0.9, 0.0]]])
    valid = torch.tensor([[[True, True, True, False]]])
    protected = torch.tensor([[[False, True, False, False]]])
    over = torch.tensor([[True]])
    assert replacement_slot(scores, valid, protected, over).item() == 0  # 0.1 is protected
    assert replacement_slot(scores, valid, protected, ~over).item() == 3  # not over budget: the empty slot


def test_equal_scores_go_to_the_most_recent_token_wherever_the_slot_sits():
    scores = torch.tensor([[[1.0, 1.0, 1.0, 1.0]]])
    index = torch.tensor([[[7, 2, 9, 4]]])  # slots out of sequence order
    valid = torch.ones(1, 1, 4, dtype=torch.bool)
    none = torch.zeros(1, 1, 4, dtype=torch.bool)
    slots, keep_valid = select_keep(scores, valid, none, torch.tensor([2]), 2, key_index=index)
    assert slots[keep_valid].tolist() == [0, 2]  # positions 7 and 9
