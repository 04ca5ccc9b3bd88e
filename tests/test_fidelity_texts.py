"""``kvcache fidelity``'s offline texts and paired comparisons (no model: a whitespace tokenizer stands in)."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from kvcache.eval import fidelity


class WordTokenizer:
    """One id per whitespace-separated word (the fidelity helpers only need ``input_ids``)."""

    def __call__(self, text: str, add_special_tokens: bool = False):
        return type("Encoding", (), {"input_ids": list(range(len(text.split())))})()


@pytest.mark.parametrize("kind", ["licenses", "docstrings"])
def test_documents_are_distinct_texts_cut_to_length(kind: str) -> None:
    docs = fidelity.documents(WordTokenizer(), kind, 2, 300)
    assert [d["kind"] for d in docs] == [kind, kind]
    assert all(len(d["ids"]) == 300 for d in docs)
    assert docs[0]["name"] != docs[1]["name"]


def test_too_few_documents_name_the_fix() -> None:
    with pytest.raises(SystemExit, match="lower --docs or --prefix-tokens"):
        fidelity.documents(WordTokenizer(), "docstrings", 1, 10**7)


def test_docstring_text_starts_with_the_module_docstring() -> None:
    import argparse
    import inspect

    name, text = next(fidelity.docstring_texts())
    assert name == "argparse" and text.startswith(inspect.getdoc(argparse))
    assert "ArgumentParser: " in text


def test_paired_differences_against_scipy() -> None:
    a, b = [0.5, 0.7, 0.2, 0.9], [0.4, 0.8, 0.1, 0.6]
    out = fidelity.paired(a, b)
    diff = [x - y for x, y in zip(a, b)]
    mean = sum(diff) / 4
    ci = stats.t.interval(0.95, 3, loc=mean, scale=stats.sem(diff))
    assert out["mean"] == pytest.approx(mean)
    assert out["ci95"] == pytest.approx(list(ci))
    assert (out["a_higher"], out["b_higher"], out["n"]) == (3, 1, 4)


def test_comparisons_pair_policies_at_the_same_budget() -> None:
    rows = [
        {"policy": "full", "budget": 1.0, "rougeL_per_doc": [1.0, 1.0], "ppl_per_doc": [10.0, 20.0]},
        {"policy": "keyformer", "budget": 0.5, "rougeL_per_doc": [0.6, 0.4], "ppl_per_doc": [11.0, 22.0]},
        {"policy": "h2o", "budget": 0.5, "rougeL_per_doc": [0.5, 0.5], "ppl_per_doc": [12.0, 21.0]},
        {"policy": "h2o", "budget": 0.25, "rougeL_per_doc": [0.3, 0.3], "ppl_per_doc": [13.0, 25.0]},
    ]
    (pair,) = fidelity.comparisons(rows)
    assert (pair["a"], pair["b"], pair["budget"]) == ("keyformer", "h2o", 0.5)
    assert pair["rougeL_a_minus_b"]["mean"] == pytest.approx(0.0)
    assert pair["nll_a_minus_b"]["mean"] == pytest.approx((math.log(11 / 12) + math.log(22 / 21)) / 2)
