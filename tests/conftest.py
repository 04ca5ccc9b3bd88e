"""Shared fixtures: tiny random-config models of every supported architecture (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

VOCAB = 96


def tiny_model(family: str) -> torch.nn.Module:
    """A 2-3 layer random model of ``family`` with GQA where the architecture has it."""
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, max_position_embeddings=256)
    if family in ("llama", "mistral", "qwen2", "qwen3"):
        config_cls = {
            "llama": tf.LlamaConfig,
            "mistral": tf.MistralConfig,
            "qwen2": tf.Qwen2Config,
            "qwen3": tf.Qwen3Config,
        }[family]
        config = config_cls(
            hidden_size=96, intermediate_size=128, num_hidden_layers=3, num_attention_heads=6,
            num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, **common,
        )
        model_cls = {
            "llama": tf.LlamaForCausalLM,
            "mistral": tf.MistralForCausalLM,
            "qwen2": tf.Qwen2ForCausalLM,
            "qwen3": tf.Qwen3ForCausalLM,
        }[family]
    elif family == "gpt2":
        config = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2)
        model_cls = tf.GPT2LMHeadModel
    elif family == "gptj":
        config = tf.GPTJConfig(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=256, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2)
        model_cls = tf.GPTJForCausalLM
    elif family == "mpt":
        # 6 heads: ALiBi slopes of a non-power-of-two head count (interleaved); use_cache false as MPT checkpoints ship;
        # a wider init than the default 0.02, whose tiny model repeats one token
        config = tf.MptConfig(d_model=96, n_layers=2, n_heads=6, expansion_ratio=2, max_seq_len=256, vocab_size=VOCAB,
                              initializer_range=0.2, bos_token_id=1, eos_token_id=2)
        model_cls = tf.MptForCausalLM
    else:
        raise ValueError(family)
    config._attn_implementation = "eager"  # HF eager attention is the reference
    model = model_cls(config).eval()
    model.generation_config.pad_token_id = 0
    return model


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gpt2", "gptj", "mpt"]


@pytest.fixture(scope="session")
def models() -> dict:
    return {}


@pytest.fixture
def make_model(models):
    def get(family: str) -> torch.nn.Module:
        if family not in models:
            models[family] = tiny_model(family)
        return models[family]

    return get


def padded_batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random token ids and attention mask for prompts of the given lengths."""
    gen = torch.Generator().manual_seed(seed)
    longest = max(lengths)
    ids = torch.randint(3, VOCAB, (len(lengths), longest), generator=gen)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, longest - n :] = 1
        ids[row, : longest - n] = 0
    return ids, mask
